import json

import pandas as pd
import pytest

from wise_bench.report import main, write_report

PROTOCOL = {"model": "tiny", "dataset": "zsre", "scope": "all_seen", "scorer": "teacher_forced_token_acc", "batch_size": 1}


def fake_run(root, name, method, T, seed, rel, gen, loc, edit_mode="sequential"):
    run = root / name
    run.mkdir(parents=True)
    final = {"rel": rel, "gen": gen, "loc": loc, "avg": (rel + gen + loc) / 3}
    results = {**final, **PROTOCOL, "edit_mode": edit_mode, "method": method, "num_edits": T, "seed": seed,
               "pre": {"rel": 0.1}, "timing": {"edit_s_total": T * 0.5, "edit_s_per_edit": 0.5, "eval_s_total": 1.0}}
    (run / "results.json").write_text(json.dumps(results))
    # two evaluation points: halfway (perfect) and final
    points = [{"n_edits": T // 2, "rel": 1.0, "gen": 1.0, "loc": 1.0, "avg": 1.0, "edit_s": T * 0.25},
              {"n_edits": T, **final, "edit_s": T * 1.0}]
    (run / "metrics.jsonl").write_text("".join(json.dumps({**p, **PROTOCOL, "edit_mode": edit_mode}) + "\n" for p in points))


@pytest.fixture
def multirun(tmp_path):
    root = tmp_path / "multirun"
    fake_run(root, "0", "wise", 10, 0, 0.9, 0.8, 1.0)
    fake_run(root, "1", "wise", 10, 1, 0.7, 0.6, 1.0)  # seed average: rel 0.8, gen 0.7
    fake_run(root, "2", "wise", 100, 0, 0.6, 0.5, 0.9)
    fake_run(root, "3", "ft_m", 10, 0, 0.5, 0.4, 0.2)
    fake_run(root, "4", "memit", 100, 0, 0.7, 0.6, 0.6, edit_mode="batch")  # another protocol
    return root


def test_report_tables_csv_and_plots(multirun, tmp_path):
    out = tmp_path / "report"
    df = write_report([multirun], out)
    assert len(df) == 5 and len(pd.read_csv(out / "results.csv")) == 5
    md = (out / "results.md").read_text()
    batch, sequential = md.split("## model=tiny, dataset=zsre, edit_mode=")[1:]  # sorted by protocol
    # Paper layout: method rows, (T, metric) columns; seeds averaged.
    assert "T=10 Rel" in sequential and "T=100 Avg" in sequential
    wise_row = next(line for line in sequential.splitlines() if line.startswith("| wise"))
    cells = [c.strip() for c in wise_row.strip("|").split("|")]
    assert cells[1:4] == ["0.8", "0.7", "1"]  # T=10: rel, gen, loc (mean of two seeds)
    assert cells[5:8] == ["0.6", "0.5", "0.9"]  # T=100
    assert "memit" not in sequential and "memit" in batch  # protocols are never mixed
    for protocol in ("sequential", "batch"):  # one figure per protocol, a real PNG with something drawn
        png = (out / f"tiny_zsre_{protocol}.png").read_bytes()
        assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 1000


def test_seconds_per_edit_between_points(multirun):
    from wise_bench.report import find_runs, load_curves, seconds_per_edit

    curves = load_curves(find_runs([multirun]))
    run = curves[curves["run_dir"].str.endswith("/2")]  # T=100: edit_s 25 after 50 edits, 100 after 100
    assert seconds_per_edit(curves)[run.index].tolist() == [0.5, 1.5]


def test_report_cli_defaults_to_a_report_dir_inside_the_first_path(multirun, tmp_path, capsys):
    assert main([str(multirun)]) == 0
    assert "5 runs" in capsys.readouterr().out
    write_report([multirun], tmp_path / "direct")
    for name in ("results.md", "results.csv"):  # what write_report writes for the same runs
        assert (multirun / "report" / name).read_text() == (tmp_path / "direct" / name).read_text()
