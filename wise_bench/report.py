"""``python -m wise_bench.report <run or multirun dirs> [--out DIR]``: tables and plots of finished runs.

Every directory below the given paths that holds a results.json is one run (runs still in progress
have none and are left out). Its numbers are read into one pandas DataFrame, a row per run and
evaluation protocol: ``teacher_forced`` (results.json's top-level metrics) and each entry of its
``protocols`` (``generation``, ``generation/qa``, ...).

Numbers are only compared under the same setup: model, dataset, edit mode, batch size, scope and,
for single and paper_chunks runs, the number of requests; inside a setup, each evaluation protocol
and set of scorer names has its own table. A run's T is the number of edits one model receives:
num_edits for sequential and batch runs, the chunk size for paper_chunks runs (the WISE paper's
Table 2), 1 for single runs. Runs of one method that differ in method.* or model.* overrides
(Hydra's .hydra/overrides.yaml) are separate rows, so only seeds are ever averaged.

Outputs:
- ``results.csv``: one row per run and evaluation protocol, with ``<metric>_ci95`` (bootstrap
  half-widths), ``retention_<metric>`` and ``collapse_at`` where the run recorded them;
- ``results.md``: per setup and evaluation protocol, a table laid out like the WISE paper (method rows,
  Rel/Gen/Loc/... under each T; one run: value ± 95% CI half-width, several seeds: mean ± std over
  seeds), the gap teacher-forced minus generation per metric, seconds per edit, retention and collapse;
- ``<setup>.png``: each metric against the number of edits (teacher-forced solid, other protocols
  dashed; on the avg panel, a dotted line at each run's collapse_at);
- ``<setup>_retention.png``: final score ÷ score right after the request's own edit, against edit age.
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import re
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from wise_bench.errors import UserError

SETUP = ["model", "dataset", "edit_mode", "batch", "requests", "scope"]
METRICS = ["rel", "rel_f1", "gen", "gen_f1", "loc", "avg", "portability", "portability_f1", "ppl", "ood"]
UNBOUNDED = {"ppl", "s_per_edit"}  # every other metric is a share in [0, 1]
TEACHER_FORCED = "teacher_forced"
RETAINED = ["rel", "gen", "portability"]  # scores that may carry <metric>_at_edit in samples.jsonl
CHUNKED = ("single", "paper_chunks")  # modes whose T is not the number of requests
IDENTITY = ["label", "T", "run_dir", *SETUP]  # what each point of a curve or retention row carries
CELL_NOTE = ("Cells: one run: value ± 95% bootstrap CI half-width over requests (where the run recorded "
             "it); several seeds of one configuration: mean ± std over seeds (n = runs). Gap: "
             "teacher-forced minus the other protocol, same runs.")


def find_runs(paths: list[Path]) -> list[Path]:
    runs = []
    for p in paths:
        runs += [f.parent for f in sorted(Path(p).rglob("results.json"))]
    return runs


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None


def read_jsonl(path: Path) -> list[dict]:
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise UserError(f"{path}, line {number}: not valid JSON ({e})") from None
    return rows


def variant(run: Path) -> str:
    """The run's method.* and model.* overrides: a configuration of its own, never averaged with others."""
    path = run / ".hydra" / "overrides.yaml"
    if not path.exists():
        return ""
    overrides = yaml.safe_load(path.read_text(encoding="utf-8")) or []
    kept = [o.lstrip("+~") for o in overrides if o.lstrip("+~").startswith(("method.", "model."))]
    return ", ".join(o.removeprefix("method.") for o in kept)


def run_columns(run: Path, r: dict) -> dict:
    """What identifies a run and its setup, from its results.json ``r``."""
    for key in ("method", "model", "dataset", "num_edits", "edit_mode"):
        if key not in r:
            raise UserError(f"{run / 'results.json'}: no '{key}' (not a wise-bench results.json?)")
    mode = r["edit_mode"]
    T = {"paper_chunks": r.get("chunk_size"), "single": 1}.get(mode, r["num_edits"])
    overrides = variant(run)
    label = f"{r['method']} ({overrides})" if overrides else r["method"]
    # MEMIT-MASS edits the whole chunk in one step: batch_size "T" puts its runs of every T in one table.
    batch = "T" if T and T > 1 and r.get("batch_size") == T else str(r.get("batch_size"))
    # collapse_at: an n_edits value; "never" where the run recorded none; empty where it predates the field.
    collapse = ("never" if r["collapse_at"] is None else r["collapse_at"]) if "collapse_at" in r else None
    return {
        "method": r["method"], "label": label, "T": T, "num_edits": r["num_edits"], "seed": r.get("seed"),
        "model": r["model"], "dataset": r["dataset"], "edit_mode": mode, "batch_size": r.get("batch_size"),
        "chunk_size": r.get("chunk_size"), "batch": batch, "requests": r["num_edits"] if mode in CHUNKED else None,
        "scope": r.get("scope"),
        **{f"retention_{m}": v for m, v in (r.get("retention") or {}).items()},
        "collapse_at": collapse,
        "edit_s_per_edit": r.get("timing", {}).get("edit_s_per_edit"),
        "run_dir": str(run),
    }


def evaluation_protocols(r: dict) -> dict[str, dict]:
    """Scores per evaluation protocol: the top level is teacher-forced; ``protocols`` may add others."""
    protocols = dict(r.get("protocols") or {})
    teacher_forced = {**r, **protocols.pop(TEACHER_FORCED, {})}
    return {TEACHER_FORCED: teacher_forced, **protocols}


def scorer_names(r: dict, protocol: str, scores: dict) -> str:
    """'scorer (metrics); ...' for one protocol's metrics, from ``scorers`` (``{protocol: {metric: name}}``,
    or ``{metric: name}`` for teacher forcing, or older runs' ``scorer`` of rel), and the generation
    settings of a generation context: numbers measured differently never share a table."""
    scorers = r.get("scorers") or {}
    if isinstance(scorers.get(protocol), dict):
        named = scorers[protocol]
    elif protocol == TEACHER_FORCED:
        named = scorers or {"rel": r.get("scorer")}
    else:
        named = {}
    by_scorer: dict[str, list[str]] = {}
    for metric, scorer in named.items():
        if metric in scores and isinstance(scorer, str):
            by_scorer.setdefault(scorer, []).append(metric)
    parts = [f"{scorer} ({', '.join(metrics)})" for scorer, metrics in by_scorer.items()]
    if protocol != TEACHER_FORCED and r.get("generation_settings"):
        parts.append(generation_settings(r["generation_settings"], protocol))
    return "; ".join(parts)


def generation_settings(settings: dict, protocol: str) -> str:
    """How a context's answers were generated. max_new_tokens is left out: it follows the longest target
    of the run's records (answers are never cut to the target), so it differs between T of one sweep."""
    template = (settings.get("contexts") or {}).get(protocol)
    shown = {"template": template, **{k: v for k, v in settings.items() if k not in ("contexts", "max_new_tokens")}}
    return ", ".join(f"{k}={json.dumps(v)}" for k, v in shown.items() if v is not None)


def load_results(runs: list[Path]) -> pd.DataFrame:
    rows = []
    for run in runs:
        r = read_json(run / "results.json")
        info = run_columns(run, r)
        for protocol, scores in evaluation_protocols(r).items():
            rows.append({**info, "eval_protocol": protocol, "scorers": scorer_names(r, protocol, scores),
                         **{m: scores[m] for m in METRICS if m in scores},
                         **{f"{m}_ci95": hw for m, hw in (scores.get("ci95") or {}).items()}})
    return pd.DataFrame(rows)


def load_curves(runs: list[Path]) -> pd.DataFrame:
    """Every evaluation point of every run, a row per evaluation protocol. A run without metrics.jsonl
    contributes its final numbers as one point, so that every run appears in the figures."""
    rows = []
    for run in runs:
        r = read_json(run / "results.json")
        info = {k: v for k, v in run_columns(run, r).items() if k in IDENTITY}
        path = run / "metrics.jsonl"
        points = read_jsonl(path) if path.exists() else [{**r, "n_edits": r.get("num_edits_done", r["num_edits"])}]
        for point in points:
            for protocol, scores in evaluation_protocols(point).items():
                rows.append({**info, "n_edits": point["n_edits"], "edit_s": point.get("edit_s"),
                             "eval_protocol": protocol, **{m: scores[m] for m in METRICS if m in scores}})
    return pd.DataFrame(rows)


def load_retention(runs: list[Path]) -> pd.DataFrame:
    """Per request of runs whose samples.jsonl carries ``<metric>_at_edit``: its edit age (edits made
    since its own) and ``<metric>_ratio`` = final score ÷ score right after its edit (left out where
    that score was 0). Rows with no ratio are dropped."""
    frames = []
    for run in runs:
        path = run / "samples.jsonl"
        if not path.exists():
            continue
        samples = pd.DataFrame(read_jsonl(path))
        probed = [m for m in RETAINED if f"{m}_at_edit" in samples and m in samples]
        if not probed:
            continue
        info = run_columns(run, read_json(run / "results.json"))
        frame = pd.DataFrame({"age": samples["n_edits"] - samples["index"]})
        for m in probed:
            at_edit = samples[f"{m}_at_edit"]
            frame[f"{m}_ratio"] = (samples[m] / at_edit).where(at_edit > 0)
        frame = frame.dropna(how="all", subset=[f"{m}_ratio" for m in probed])
        if frame.empty:  # every request scored 0 right after its edit
            continue
        frames.append(frame.assign(**{k: info[k] for k in IDENTITY}))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def cell(values: pd.Series, half_widths: pd.Series | None) -> str:
    """One table cell: mean ± std over seeds, or one run's value ± its CI half-width."""
    values = values.dropna()
    if values.empty:
        return ""
    if len(values) > 1:
        return f"{values.mean():.3f} ± {values.std():.3f} (n={len(values)})"
    half_width = half_widths.loc[values.index].dropna() if half_widths is not None else pd.Series(dtype=float)
    return f"{values.iloc[0]:.3f} ± {half_width.iloc[0]:.3f}" if len(half_width) else f"{values.iloc[0]:.3f}"


def paper_table(rows: pd.DataFrame, metrics: list[str]) -> pd.DataFrame:
    """Method rows; (T, metric) columns, T ascending; seeds combined in each cell."""
    present = [m for m in metrics if m in rows and rows[m].notna().any()]
    cells: dict[tuple, dict[str, str]] = {}
    for (label, T), runs in rows.groupby(["label", "T"]):
        for m in present:
            cells.setdefault((T, m), {})[label] = cell(runs[m], runs.get(f"{m}_ci95"))
    order = [(T, m) for T in sorted({T for T, _ in cells}) for m in present if (T, m) in cells]
    table = pd.DataFrame({f"T={T:g} {m.capitalize()}": cells[(T, m)] for T, m in order}).fillna("")
    table.index.name = "method"
    return table


def gap_table(group: pd.DataFrame, metrics: list[str]) -> pd.DataFrame:
    """Evaluation protocols side by side: a row per method, T and metric scored under teacher forcing,
    a column per protocol (mean over seeds) and ``gap <protocol>`` = teacher-forced minus it. Only runs
    scored under another protocol too, so that both sides are the same runs."""
    both = group[group["run_dir"].isin(group.loc[group["eval_protocol"] != TEACHER_FORCED, "run_dir"])]
    present = [m for m in metrics if m in both and both[m].notna().any()]
    means = (both.melt(id_vars=["label", "T", "eval_protocol"], value_vars=present, var_name="metric")
             .groupby(["label", "T", "metric", "eval_protocol"], sort=False)["value"].mean().unstack("eval_protocol"))
    others = [p for p in means if p != TEACHER_FORCED]
    for other in others:
        means[f"gap {other}"] = means[TEACHER_FORCED] - means[other]
    means = means.dropna(subset=[TEACHER_FORCED]).dropna(how="all", subset=others)
    order = {m: i for i, m in enumerate(present)}
    means = means.sort_index(key=lambda level: level.map(order) if level.name == "metric" else level)
    columns = [TEACHER_FORCED, *others, *(f"gap {o}" for o in others)]
    return means[columns].reset_index().rename(columns={"label": "method"})


def retention_table(runs: pd.DataFrame) -> pd.DataFrame:
    """Per run: retention of each metric and collapse_at (runs that recorded neither are left out)."""
    columns = [c for c in runs if c.startswith("retention_")] + ["collapse_at"]
    recorded = runs[runs[columns].notna().any(axis=1)]
    return recorded[["label", "T", "seed", *columns]].rename(columns={"label": "method"}).round(3)


def setup_title(key: tuple) -> str:
    named = {name: f"{value:g}" if isinstance(value, float) else value
             for name, value in zip(SETUP, key) if not pd.isna(value)}
    named["batch"] = "one batch of T" if named["batch"] == "T" else named["batch"]
    return ", ".join(f"{'batch_size' if name == 'batch' else name}={value}" for name, value in named.items())


def file_name(key: tuple, taken: set[str]) -> str:
    """A file name per setup; setups that differ only in a key the name omits still get their own file."""
    model, dataset, mode, batch, requests, _ = key
    parts = [model, dataset, mode] + ([f"b{batch}"] if batch != "1" else [])
    parts += [] if pd.isna(requests) else [f"n{requests:g}"]
    name = re.sub(r"[^A-Za-z0-9_.=-]+", "-", "_".join(map(str, parts)))
    unique, i = name, 2
    while unique in taken:
        unique, i = f"{name}_{i}", i + 1
    taken.add(unique)
    return unique


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def panel_grid(count: int, max_columns: int = 3):
    """A figure with ``count`` panels, at most ``max_columns`` per row; unused cells hidden."""
    columns = min(count, max_columns)
    rows = math.ceil(count / columns)
    fig, axes = pyplot().subplots(rows, columns, figsize=(4.2 * columns, 3.3 * rows), squeeze=False)
    for ax in axes.flat[count:]:
        ax.set_visible(False)
    return fig, list(axes.flat[:count])


class Styles:
    """One colour per method, one marker per T, one line style (bars: hatch) per evaluation protocol,
    the same in every panel of a figure."""

    def __init__(self, frame: pd.DataFrame):
        labels = sorted(frame["label"].unique())
        cmap = pyplot().get_cmap("tab10" if len(labels) <= 10 else "tab20")
        self.color = {label: cmap(i % cmap.N) for i, label in enumerate(labels)}
        self.marker = dict(zip(sorted(frame["T"].unique()), itertools.cycle("osD^v<>ph*")))
        protocols = dict.fromkeys([TEACHER_FORCED, *(frame["eval_protocol"] if "eval_protocol" in frame else [])])
        self.line = dict(zip(protocols, itertools.cycle(["-", "--", ":", "-."])))
        self.hatch = dict(zip(protocols, itertools.cycle(["", "//", "..", "xx"])))

    def legend(self, bars: bool = False) -> list:
        from matplotlib.lines import Line2D
        from matplotlib.patches import Patch

        handles = [Patch(color=color, label=label) for label, color in self.color.items()]
        if not bars:
            handles += [Line2D([], [], color="gray", marker=marker, linestyle="", label=f"T={T:g}")
                        for T, marker in self.marker.items()]
        if len(self.line) > 1:
            handles += [Patch(facecolor="white", edgecolor="gray", hatch=self.hatch[p], label=p) if bars else
                        Line2D([], [], color="gray", linestyle=self.line[p], label=p) for p in self.line]
        return handles


def finish(fig, handles: list, path: Path) -> None:
    """Legend to the right of the panels, outside them; save and close."""
    fig.tight_layout()
    fig.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8, frameon=False)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    pyplot().close(fig)


def style_panel(ax, metric: str, xlabel: str) -> None:
    if metric not in UNBOUNDED:
        ax.set_ylim(0, 1)
    ax.set_title("seconds per edit" if metric == "s_per_edit" else metric)
    ax.set_xlabel(xlabel)
    ax.grid(alpha=0.3)


def plot_curves(curves: pd.DataFrame, runs: pd.DataFrame, metrics: list[str], path: Path,
                xlabel: str = "number of edits"):
    """Each metric against the number of edits, a line per method, T and evaluation protocol (a marker
    for a run with one point); on the avg panel, a dotted line at each run's collapse_at."""
    from matplotlib.lines import Line2D

    curves = curves.copy()
    teacher_forced = curves["eval_protocol"] == TEACHER_FORCED
    curves.loc[teacher_forced, "s_per_edit"] = seconds_per_edit(curves[teacher_forced])  # is the cost per edit flat?
    panels = [m for m in [*metrics, "s_per_edit"] if m in curves and curves[m].notna().any()]
    if not panels:
        return None
    styles = Styles(curves)
    collapse = runs.assign(at=pd.to_numeric(runs["collapse_at"], errors="coerce")).dropna(subset=["at"])
    fig, axes = panel_grid(len(panels))
    for ax, metric in zip(axes, panels):
        for (label, T, protocol), run in curves.groupby(["label", "T", "eval_protocol"]):
            mean = run.groupby("n_edits")[metric].mean().dropna()  # over seeds
            if mean.empty:
                continue
            ax.plot(mean.index, mean.values, styles.line[protocol], color=styles.color[label],
                    marker=styles.marker[T], ms=7 if len(mean) == 1 else 4, clip_on=False)
        if metric == "avg":
            for _, run in collapse.iterrows():
                ax.axvline(run["at"], color=styles.color[run["label"]], linestyle=":", lw=1.5)
        style_panel(ax, metric, xlabel)
    extra = [Line2D([], [], color="gray", linestyle=":", label="collapse_at (avg)")] if not collapse.empty else []
    finish(fig, styles.legend() + extra, path)
    return fig


def plot_bars(rows: pd.DataFrame, metrics: list[str], path: Path):
    """Setups where every run is one point (single edits, paper chunks scored once): a bar per method,
    T and evaluation protocol, with the cell's uncertainty (std over seeds, or the run's CI) as error bar."""
    rows = rows.assign(s_per_edit=rows["edit_s_per_edit"].where(rows["eval_protocol"] == TEACHER_FORCED))
    panels = [m for m in [*metrics, "s_per_edit"] if m in rows and rows[m].notna().any()]
    if not panels:
        return None
    styles = Styles(rows)
    configs = sorted(rows.groupby(["label", "T"]).groups)
    width = 0.8 / len(styles.hatch)
    fig, axes = panel_grid(len(panels))
    for ax, metric in zip(axes, panels):
        for x, (label, T) in enumerate(configs):
            for i, protocol in enumerate(styles.hatch):
                runs = rows[(rows["label"] == label) & (rows["T"] == T) & (rows["eval_protocol"] == protocol)]
                values = runs[metric].dropna()
                if values.empty:
                    continue
                half_width = runs.get(f"{metric}_ci95", pd.Series(dtype=float)).dropna()
                error = values.std() if len(values) > 1 else (half_width.iloc[0] if len(half_width) else None)
                ax.bar(x + (i - (len(styles.hatch) - 1) / 2) * width, values.mean(), width, yerr=error, capsize=2,
                       color=styles.color[label], hatch=styles.hatch[protocol], edgecolor="white")
        several_T = len(styles.marker) > 1
        ax.set_xticks(range(len(configs)), [f"{T:g}" for _, T in configs] if several_T else [], fontsize=7)
        style_panel(ax, metric, "T" if several_T else f"T={configs[0][1]:g}")
    finish(fig, styles.legend(bars=True), path)
    return fig


def retention_curve(samples: pd.DataFrame, metric: str, edges: np.ndarray) -> pd.Series:
    """Mean of ``<metric>_ratio`` per edit-age bin, indexed by the bin's centre."""
    bins = pd.cut(samples["age"], edges)
    mean = samples.groupby(bins, observed=True)[f"{metric}_ratio"].mean().dropna()
    return pd.Series(mean.values, index=[interval.mid for interval in mean.index])


def plot_retention(retention: pd.DataFrame, path: Path, bins: int = 10):
    """Per retained metric, final score ÷ score right after the edit against edit age, a line per method and T."""
    panels = [m for m in RETAINED if f"{m}_ratio" in retention and retention[f"{m}_ratio"].notna().any()]
    if not panels:
        return None
    oldest = retention["age"].max()
    edges = np.linspace(0, oldest, min(bins, oldest) + 1)
    styles = Styles(retention)
    fig, axes = panel_grid(len(panels))
    for ax, metric in zip(axes, panels):
        highest = 1.0  # a ratio can exceed 1 (an edit that took hold later)
        for (label, T), samples in retention.groupby(["label", "T"]):
            curve = retention_curve(samples, metric, edges)
            if curve.empty:
                continue
            ax.plot(curve.index, curve.values, color=styles.color[label], marker=styles.marker[T], ms=4, clip_on=False)
            highest = max(highest, curve.max())
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_ylim(0, highest * 1.05)
        ax.set_title(f"{metric}: final ÷ right after its edit", fontsize=10)
        ax.set_xlabel("edit age (edits since the request's own)")
        ax.grid(alpha=0.3)
    finish(fig, styles.legend(), path)
    return fig


def seconds_per_edit(curves: pd.DataFrame) -> pd.Series:
    """Editing seconds per edit between consecutive evaluation points of each run (from ``edit_s``)."""
    ordered = curves.sort_values(["run_dir", "n_edits"])
    by_run = ordered.groupby("run_dir")
    edit_s = by_run["edit_s"].diff().fillna(ordered["edit_s"])
    edits = by_run["n_edits"].diff().fillna(ordered["n_edits"])
    return (edit_s / edits).reindex(curves.index)


def setup_section(group: pd.DataFrame, metrics: list[str]) -> list[str]:
    """The markdown tables of one setup."""
    sections = []
    for (protocol, scorers), rows in group.groupby(["eval_protocol", "scorers"], sort=False):
        heading = protocol.replace("_", "-") + (f" ({scorers})" if scorers else "")
        sections.append(f"### {heading}\n\n{paper_table(rows, metrics).to_markdown(disable_numparse=True)}\n")
    if (group["eval_protocol"] != TEACHER_FORCED).any():
        gaps = gap_table(group, metrics).to_markdown(index=False, floatfmt=".3f", missingval="")
        sections.append(f"Evaluation protocols side by side (gap = teacher-forced − the other):\n\n{gaps}\n")
    runs = group[group["eval_protocol"] == TEACHER_FORCED]
    per_edit = runs.groupby(["label", "T"])["edit_s_per_edit"].mean().unstack().round(4).rename_axis("method")
    sections.append(f"Seconds per edit:\n\n{per_edit.to_markdown(missingval='')}\n")
    if runs.filter(regex="^retention_|^collapse_at$").notna().any().any():
        retention = retention_table(runs).to_markdown(index=False, floatfmt=".3f", missingval="")
        sections.append("Retention (mean over requests of final ÷ right-after-edit score) and collapse_at (first "
                        f"point where avg < fraction × its first point):\n\n{retention}\n")
    return sections


def setup_figures(group: pd.DataFrame, curves: pd.DataFrame, retention: pd.DataFrame, metrics: list[str],
                  out: Path, name: str) -> list[str]:
    """The figures of one setup (none where nothing of ``metrics`` was measured), as markdown image links."""
    points = curves[curves["run_dir"].isin(group["run_dir"])]
    if points.groupby(["run_dir", "eval_protocol"]).size().max() == 1:  # no run has a curve to draw
        figure = plot_bars(group, metrics, out / f"{name}.png")
    else:
        chunked = group["edit_mode"].iloc[0] in CHUNKED
        xlabel = "requests scored (model restored between chunks)" if chunked else "number of edits"
        runs = group[group["eval_protocol"] == TEACHER_FORCED]
        figure = plot_curves(points, runs, metrics, out / f"{name}.png", xlabel)
    links = [f"![{name}]({name}.png)\n"] if figure else []
    probed = retention[retention["run_dir"].isin(group["run_dir"])] if not retention.empty else retention
    if not probed.empty and plot_retention(probed, out / f"{name}_retention.png"):
        links.append(f"![{name} retention]({name}_retention.png)\n")
    return links


def write_report(paths: list[Path], out: Path, metrics: list[str] = METRICS) -> pd.DataFrame:
    runs = find_runs(paths)
    if not runs:
        raise UserError(f"no results.json under {', '.join(map(str, paths))} (finished runs write one)")
    out.mkdir(parents=True, exist_ok=True)
    df = load_results(runs)
    df.to_csv(out / "results.csv", index=False)
    curves, retention = load_curves(runs), load_retention(runs)

    sources = ", ".join(map(str, paths))
    sections = [f"# wise-bench report\n\n{df['run_dir'].nunique()} runs from {sources}.\n\n{CELL_NOTE}\n"]
    taken: set[str] = set()
    for key, group in df.groupby(SETUP, dropna=False):
        name = file_name(key, taken)
        sections.append(f"## {setup_title(key)}\n")
        sections += setup_section(group, metrics)
        sections += setup_figures(group, curves, retention, metrics, out, name)
    (out / "results.md").write_text("\n".join(sections), encoding="utf-8")
    return df


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m wise_bench.report", description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+", type=Path, help="run or multirun directories (searched recursively)")
    parser.add_argument("--out", type=Path, default=None, help="output directory (default: <first path>/report)")
    parser.add_argument("--metrics", default=",".join(METRICS), help="comma-separated metric columns")
    args = parser.parse_args(argv)
    out = args.out or args.paths[0] / "report"
    try:
        df = write_report(args.paths, out, args.metrics.split(","))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{df['run_dir'].nunique()} runs -> {out}/results.md, results.csv and plots")
    return 0


if __name__ == "__main__":
    sys.exit(main())
