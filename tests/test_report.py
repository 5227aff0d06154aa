import json
import re

import numpy as np
import pandas as pd
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg

from wise_bench.report import (find_runs, load_curves, load_results, load_retention, main, plot_bars, plot_curves,
                               plot_retention, retention_curve, seconds_per_edit, write_report)

TF_SCORERS = {"rel": "teacher_forced_token_acc", "gen": "teacher_forced_token_acc", "loc": "argmax_agreement_with_unedited"}


def write_run(root, name, method, T, rel, gen=0.5, loc=1.0, seed=0, edit_mode="sequential", batch_size=1,
              chunk_size=None, points=None, extra=None, overrides=None, samples=None):
    """A finished run directory as the loop writes it: results.json and metrics.jsonl (``points``: n_edits ->
    metrics; default: halfway perfect, then the final numbers), optionally samples.jsonl and Hydra overrides."""
    run = root / name
    run.mkdir(parents=True)
    protocol = {"scope": "each_after_own_edit" if edit_mode == "single" else "all_seen", "scorer": TF_SCORERS["rel"],
                "scorers": TF_SCORERS, "edit_mode": edit_mode, "batch_size": batch_size}
    if chunk_size is not None:
        protocol["chunk_size"] = chunk_size
    final = {"rel": rel, "gen": gen, "loc": loc, "avg": round((rel + gen + loc) / 3, 6)}
    results = {**final, **protocol, "method": method, "model": "tiny", "dataset": "zsre", "num_edits": T, "seed": seed,
               "timing": {"edit_s_total": T * 0.5, "edit_s_per_edit": 0.5, "eval_s_total": 1.0}, **(extra or {})}
    (run / "results.json").write_text(json.dumps(results))
    if points is None:
        points = {T // 2: {"rel": 1.0, "gen": 1.0, "loc": 1.0, "avg": 1.0}, T: final}
    (run / "metrics.jsonl").write_text("".join(
        json.dumps({"n_edits": n, **m, **protocol, "edit_s": n * 0.5}) + "\n" for n, m in points.items()))
    if overrides:
        (run / ".hydra").mkdir()
        (run / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    if samples:
        (run / "samples.jsonl").write_text("".join(json.dumps({**s, "n_edits": T, **protocol}) + "\n" for s in samples))
    return run


def md_tables(md: str) -> dict[tuple[str, str], pd.DataFrame]:
    """Every markdown table of a report, keyed by (its '## ' section, the line just above it)."""
    tables, section, above, lines = {}, None, None, md.splitlines()
    i = 0
    while i < len(lines):
        if lines[i].startswith("|"):
            block = []
            while i < len(lines) and lines[i].startswith("|"):
                block.append([c.strip() for c in lines[i].strip("|").split("|")])
                i += 1
            tables[(section, above)] = pd.DataFrame(block[2:], columns=block[0]).set_index(block[0][0])
            continue
        if lines[i].startswith("## "):
            section = lines[i][3:]
        if lines[i].strip():
            above = lines[i]
        i += 1
    return tables


def only_table(tables, section_part: str, above_pattern: str) -> pd.DataFrame:
    """The one table in the section containing ``section_part`` whose line above matches ``above_pattern``."""
    found = [t for (section, above), t in tables.items() if section_part in section and re.search(above_pattern, above)]
    assert len(found) == 1, (section_part, above_pattern, list(tables))
    return found[0]


@pytest.fixture
def paper_chunks(tmp_path):
    """+experiment=table2_zsre: num_edits=1000 in chunks of 1/10/100/1000, and what must not share its table."""
    root = tmp_path / "multirun"
    for i, (chunk, rel) in enumerate([(1, 0.9), (10, 0.8), (100, 0.7), (1000, 0.6)]):
        write_run(root, f"wise{i}", "wise", 1000, rel, gen=rel - 0.1, edit_mode="paper_chunks", chunk_size=chunk, points={1000: {}})
    write_run(root, "grace", "grace", 1000, 0.95, gen=0.2, edit_mode="paper_chunks", chunk_size=10, points={1000: {}})
    # MEMIT-MASS, one batch per chunk: another protocol, with its own T=100 column
    write_run(root, "mass", "memit", 1000, 0.3, edit_mode="paper_chunks", chunk_size=100, batch_size=100, points={1000: {}})
    # the same chunk size on fewer requests: another table
    write_run(root, "short", "wise", 100, 0.1, edit_mode="paper_chunks", chunk_size=10, points={100: {}})
    return root


def test_paper_chunks_runs_fill_one_column_per_chunk_size(paper_chunks, tmp_path):
    write_report([paper_chunks], tmp_path / "report")
    tables = md_tables((tmp_path / "report" / "results.md").read_text())
    table = only_table(tables, "edit_mode=paper_chunks, batch_size=1, requests=1000", "teacher-forced")
    expected = {"wise": {"T=1 Rel": "0.900", "T=1 Gen": "0.800", "T=1 Loc": "1.000", "T=1 Avg": "0.900",
                         "T=10 Rel": "0.800", "T=10 Gen": "0.700", "T=10 Loc": "1.000", "T=10 Avg": "0.833",
                         "T=100 Rel": "0.700", "T=100 Gen": "0.600", "T=100 Loc": "1.000", "T=100 Avg": "0.767",
                         "T=1000 Rel": "0.600", "T=1000 Gen": "0.500", "T=1000 Loc": "1.000", "T=1000 Avg": "0.700"},
                "grace": {"T=1 Rel": "", "T=1 Gen": "", "T=1 Loc": "", "T=1 Avg": "",
                          "T=10 Rel": "0.950", "T=10 Gen": "0.200", "T=10 Loc": "1.000", "T=10 Avg": "0.717",
                          **{f"T={T} {m}": "" for T in (100, 1000) for m in ("Rel", "Gen", "Loc", "Avg")}}}
    assert table.to_dict(orient="index") == expected
    mass = only_table(tables, "batch_size=one batch of T, requests=1000", "teacher-forced")
    assert mass.to_dict(orient="index") == {"memit": {"T=100 Rel": "0.300", "T=100 Gen": "0.500", "T=100 Loc": "1.000", "T=100 Avg": "0.600"}}
    short = only_table(tables, "batch_size=1, requests=100,", "teacher-forced")
    assert short.loc["wise", "T=10 Rel"] == "0.100" and list(short.index) == ["wise"]


def test_single_point_setups_are_drawn_as_bars(paper_chunks, tmp_path):
    df = load_results(find_runs([paper_chunks]))
    wise = df[(df["method"] == "wise") & (df["requests"] == 1000)]
    fig = plot_bars(wise, ["rel", "gen"], tmp_path / "bars.png")
    rel_panel = fig.axes[0]
    assert [round(bar.get_height(), 3) for bar in rel_panel.patches] == [0.9, 0.8, 0.7, 0.6]  # T = 1, 10, 100, 1000
    assert [t.get_text() for t in rel_panel.get_xticklabels()] == ["1", "10", "100", "1000"]


def test_both_evaluation_protocols_side_by_side_with_the_gap(tmp_path):
    root = tmp_path / "runs"

    def scored(rel, gen, loc, half_width, **more):
        return {"rel": rel, "gen": gen, "loc": loc, **more, "ci95": {"rel": half_width, "gen": half_width}}

    for method, tf, generation in [("wise", (0.9, 0.7, 1.0), (0.4, 0.2, 0.9)), ("grace", (0.95, 0.2, 1.0), (0.85, 0.05, 1.0))]:
        extra = {"ci95": {"rel": 0.05, "gen": 0.04},
                 "protocols": {"teacher_forced": scored(*tf, 0.05), "generation": scored(*generation, 0.03, rel_f1=generation[0] + 0.1),
                               "generation/qa": scored(*generation, 0.02)}}
        write_run(root, method, method, 100, tf[0], gen=tf[1], loc=tf[2], extra=extra)
    write_run(root, "ft_m", "ft_m", 100, 0.8)  # teacher-forced only: in its table, in no gap
    out = tmp_path / "report"
    write_report([root], out)
    tables = md_tables((out / "results.md").read_text())
    teacher_forced = only_table(tables, "sequential", "### teacher-forced")
    assert teacher_forced.loc["wise", "T=100 Rel"] == "0.900 ± 0.050" and teacher_forced.loc["ft_m", "T=100 Rel"] == "0.800"
    generation = only_table(tables, "sequential", "^### generation$")
    assert generation.loc["wise", "T=100 Rel"] == "0.400 ± 0.030" and generation.loc["wise", "T=100 Rel_f1"] == "0.500"
    assert "ft_m" not in generation.index
    gap = only_table(tables, "sequential", "side by side").reset_index()
    assert list(gap.columns) == ["method", "T", "metric", "teacher_forced", "generation", "generation/qa",
                                 "gap generation", "gap generation/qa"]
    wise = gap[gap["method"] == "wise"].set_index("metric")
    assert wise.index.tolist() == ["rel", "gen", "loc"]  # scored under both; rel_f1 has no teacher-forced side
    assert wise["gap generation"].tolist() == ["0.500", "0.500", "0.100"]
    assert gap.set_index(["method", "metric"]).loc[("grace", "gen"), "gap generation/qa"] == "0.150"
    assert "ft_m" not in gap["method"].tolist()
    csv = pd.read_csv(out / "results.csv")
    assert sorted(csv.groupby("eval_protocol").size().items()) == [("generation", 2), ("generation/qa", 2), ("teacher_forced", 3)]
    assert csv.set_index(["method", "eval_protocol"]).loc[("wise", "generation"), "rel_ci95"] == 0.03


def test_seeds_give_mean_and_std_and_other_configurations_their_own_row(tmp_path):
    root = tmp_path / "runs"
    write_run(root, "s0", "wise", 100, 0.9, seed=0)
    write_run(root, "s1", "wise", 100, 0.7, seed=1)
    write_run(root, "lr", "wise", 100, 0.2, overrides=["method=wise", "seed=0", "method.edit_lr=2.0"])
    write_report([root], tmp_path / "report")
    table = only_table(md_tables((tmp_path / "report" / "results.md").read_text()), "sequential", "teacher-forced")
    assert table.loc["wise", "T=100 Rel"] == f"0.800 ± {np.std([0.9, 0.7], ddof=1):.3f} (n=2)"
    assert table.loc["wise (edit_lr=2.0)", "T=100 Rel"] == "0.200"


def test_runs_under_other_scorers_or_generation_settings_get_their_own_tables(tmp_path):
    root = tmp_path / "runs"
    settings = {"max_new_tokens": 20, "stop_strings": ["\n"], "contexts": {"generation": "{prompt}"}}
    generation = {"rel": 0.4, "gen": 0.3, "loc": 1.0}
    write_run(root, "a", "wise", 100, 0.9, extra={"protocols": {"generation": generation}, "generation_settings": settings})
    # another template, and (T=1000: a longer longest target) another max_new_tokens, which is not a key
    write_run(root, "b", "wise", 1000, 0.7, extra={"protocols": {"generation": {**generation, "rel": 0.2}},
                                                   "generation_settings": {**settings, "max_new_tokens": 40, "contexts": {"generation": "Q: {prompt}"}}})
    write_run(root, "c", "wise", 100, 0.5, extra={"scorers": {**TF_SCORERS, "rel": "teacher_forced_token_acc_lone_space"}})
    write_report([root], tmp_path / "report")
    tables = md_tables((tmp_path / "report" / "results.md").read_text())
    default = only_table(tables, "sequential", r"^### teacher-forced \(teacher_forced_token_acc \(rel, gen\)")
    assert default.loc["wise"].to_dict() == {"T=100 Rel": "0.900", "T=100 Gen": "0.500", "T=100 Loc": "1.000", "T=100 Avg": "0.800",
                                            "T=1000 Rel": "0.700", "T=1000 Gen": "0.500", "T=1000 Loc": "1.000", "T=1000 Avg": "0.733"}
    lone_space = only_table(tables, "sequential", "teacher_forced_token_acc_lone_space")
    assert lone_space.loc["wise", "T=100 Rel"] == "0.500"  # not averaged with run a's 0.900
    assert only_table(tables, "sequential", r'template="\{prompt\}"').loc["wise"].tolist() == ["0.400", "0.300", "1.000"]
    assert only_table(tables, "sequential", r'template="Q: \{prompt\}"').loc["wise", "T=1000 Rel"] == "0.200"


def test_retention_curve_and_collapse(tmp_path):
    root = tmp_path / "runs"
    # 4 requests: the oldest (index 0, age 4) kept half its score, the newest everything; one scored 0 at its edit
    samples = [{"index": 0, "rel": 0.5, "rel_at_edit": 1.0}, {"index": 1, "rel": 0.3, "rel_at_edit": 0.6},
               {"index": 2, "rel": 0.2, "rel_at_edit": 0.0}, {"index": 3, "rel": 0.8, "rel_at_edit": 0.8}]
    points = {1: {"avg": 0.9}, 2: {"avg": 0.5}, 3: {"avg": 0.4}, 4: {"avg": 0.3}}
    write_run(root, "wise", "wise", 4, 0.45, samples=samples, points=points,
              extra={"retention": {"rel": 0.667}, "collapse_at": 3})
    write_run(root, "grace", "grace", 4, 0.9, extra={"retention": {"rel": 1.0}, "collapse_at": None})
    write_run(root, "old", "ft_l", 4, 0.1)  # before both fields existed
    retention = load_retention(find_runs([root]))
    assert sorted(retention["run_dir"].str.rsplit("/", n=1).str[1].unique()) == ["wise"]  # only runs with the probe
    curve = retention_curve(retention, "rel", np.array([0, 2, 4]))
    assert curve.to_dict() == {1.0: 1.0, 3.0: 0.5}  # ages 1-2: index 3 (1.0), index 2 left out; ages 3-4: 0.5, 0.5
    out = tmp_path / "report"
    df = write_report([root], out)
    csv = pd.read_csv(out / "results.csv", dtype={"collapse_at": str}).set_index("method")
    assert csv.loc["wise", "collapse_at"] == "3" and csv.loc["grace", "collapse_at"] == "never"
    assert pd.isna(csv.loc["ft_l", "collapse_at"])  # recorded nothing: neither a point nor "never"
    table = only_table(md_tables((out / "results.md").read_text()), "sequential", "Retention")
    assert table.index.tolist() == ["grace", "wise"] and table["collapse_at"].tolist() == ["never", "3"]
    fig = plot_curves(load_curves(find_runs([root])), df, ["avg"], tmp_path / "curves.png")
    avg = fig.axes[0]
    vertical = [line for line in avg.lines if len(set(line.get_xdata())) == 1 and line.get_linestyle() == ":"]
    assert [line.get_xdata()[0] for line in vertical] == [3]
    assert "![tiny_zsre_sequential retention](tiny_zsre_sequential_retention.png)" in (out / "results.md").read_text()
    fig = plot_retention(retention, tmp_path / "retention.png")  # 4 bins of one edit each
    (wise_line,) = [line for line in fig.axes[0].lines if len(line.get_xdata()) > 2]  # the other is y = 1
    assert (list(wise_line.get_xdata()), list(wise_line.get_ydata())) == ([0.5, 2.5, 3.5], [1.0, 0.5, 0.5])


def test_figures_grid_axes_legend_and_every_run(tmp_path):
    root = tmp_path / "runs"
    write_run(root / "multirun", "ft_m", "ft_m", 100, 0.5)
    write_run(root / "multirun", "grace", "grace", 100, 0.9)
    wise = write_run(root / "outputs", "wise", "wise", 100, 0.7)  # a separate run, its metrics.jsonl lost
    (wise / "metrics.jsonl").unlink()
    write_run(root / "outputs", "rome", "rome", 100, 0.3, points={100: {"rel": 0.3, "gen": 0.5, "loc": 1.0, "avg": 0.6}})
    runs = find_runs([root / "multirun", root / "outputs"])
    df = load_results(runs)
    fig = plot_curves(load_curves(runs), df, ["rel", "gen", "loc", "avg", "ppl"], tmp_path / "curves.png")
    panels = {ax.get_title(): ax for ax in fig.axes if ax.get_visible()}
    assert list(panels) == ["rel", "gen", "loc", "avg", "seconds per edit"]
    assert len({round(ax.get_position().x0, 3) for ax in panels.values()}) == 3  # 3 panels per row, 2 rows
    assert all(panels[m].get_ylim() == (0, 1) for m in ("rel", "gen", "loc", "avg"))
    assert panels["seconds per edit"].get_ylim() != (0, 1)
    legend = fig.legends[0]
    assert {t.get_text() for t in legend.get_texts()} >= {"ft_m", "grace", "rome", "wise", "T=100"}
    renderer = FigureCanvasAgg(fig).get_renderer()  # the figure was closed after saving
    assert legend.get_window_extent(renderer).x0 >= max(ax.get_window_extent(renderer).x1 for ax in panels.values())
    rel_points = sorted((tuple(line.get_xdata()), tuple(line.get_ydata())) for line in panels["rel"].lines)
    assert rel_points == [((50, 100), (1.0, 0.5)), ((50, 100), (1.0, 0.9)), ((100,), (0.3,)), ((100,), (0.7,))]


def test_setups_that_share_model_dataset_and_mode_get_their_own_figure(tmp_path):
    root = tmp_path / "runs"
    write_run(root, "seq1", "wise", 100, 0.9)
    write_run(root, "seq10", "wise", 100, 0.6, batch_size=10)  # once overwrote the figure of batch_size=1
    write_report([root], tmp_path / "report")
    md = (tmp_path / "report" / "results.md").read_text()
    figures = sorted(line[line.index("(") + 1:-1] for line in md.splitlines() if line.startswith("!["))
    assert figures == ["tiny_zsre_sequential.png", "tiny_zsre_sequential_b10.png"]
    assert (tmp_path / "report" / figures[0]).read_bytes() != (tmp_path / "report" / figures[1]).read_bytes()


def test_seconds_per_edit_between_points(tmp_path):
    write_run(tmp_path, "run", "wise", 100, 0.6)  # edit_s 25 after 50 edits, 50 after 100
    curves = load_curves(find_runs([tmp_path]))
    assert seconds_per_edit(curves).tolist() == [0.5, 0.5]
    curves.loc[1, "edit_s"] = 100.0
    assert seconds_per_edit(curves).tolist() == [0.5, 1.5]


def test_report_cli_defaults_to_a_report_dir_inside_the_first_path(tmp_path, capsys):
    write_run(tmp_path / "multirun", "0", "wise", 10, 0.9)
    write_run(tmp_path / "multirun", "1", "ft_m", 10, 0.5)
    assert main([str(tmp_path / "multirun")]) == 0
    assert "2 runs" in capsys.readouterr().out
    write_report([tmp_path / "multirun"], tmp_path / "direct")
    for name in ("results.md", "results.csv"):  # what write_report writes for the same runs
        assert (tmp_path / "multirun" / "report" / name).read_text() == (tmp_path / "direct" / name).read_text()


def test_bad_input_is_one_line_naming_the_file(tmp_path, capsys):
    run = write_run(tmp_path / "runs", "0", "wise", 10, 0.9)
    (run / "results.json").write_text('{"rel": 0.9,')
    assert main([str(tmp_path / "runs")]) == 2
    assert f"{run / 'results.json'}: not valid JSON" in capsys.readouterr().err
    (run / "results.json").write_text('{"rel": 0.9}')
    assert main([str(tmp_path / "runs")]) == 2
    assert "no 'method'" in capsys.readouterr().err
    assert main([str(tmp_path / "empty")]) == 2
    assert "no results.json under" in capsys.readouterr().err
