"""``python -m wise_bench.report <run or multirun dirs> [--out DIR]``: tables and plots of finished runs.

Every run directory holding a results.json is gathered into one pandas DataFrame. Runs are only
compared within the same protocol (model, dataset, edit mode, batch size, scope, scorer), so
numbers measured differently never share a table. Outputs:
- ``results.csv``: one row per run;
- ``results.md``: per protocol, a table laid out like the WISE paper (method rows, T columns,
  Rel/Gen/Loc/Avg under each T; mean over seeds);
- ``<model>_<dataset>_<edit_mode>.png``: each metric against the number of edits, a line per method.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pandas as pd

PROTOCOL = ["model", "dataset", "edit_mode", "batch_size", "scope", "scorer"]
METRICS = ["rel", "gen", "loc", "avg", "portability", "ppl", "ood"]


def find_runs(paths: list[Path]) -> list[Path]:
    runs = []
    for p in paths:
        runs += [f.parent for f in sorted(Path(p).rglob("results.json"))]
    return runs


def load_results(runs: list[Path]) -> pd.DataFrame:
    rows = []
    for run in runs:
        r = json.loads((run / "results.json").read_text())
        rows.append({
            **{k: r.get(k) for k in ["method", "num_edits", "seed", *PROTOCOL, *METRICS]},
            "edit_s_per_edit": r.get("timing", {}).get("edit_s_per_edit"),
            "run_dir": str(run),
        })
    return pd.DataFrame(rows)


def load_curves(runs: list[Path]) -> pd.DataFrame:
    """Every evaluation point of every run, with the run's method and protocol."""
    frames = []
    for run in runs:
        path = run / "metrics.jsonl"
        if not path.exists():
            continue
        r = json.loads((run / "results.json").read_text())
        points = pd.read_json(path, lines=True)
        for key in ["method", "num_edits", "seed", "model", "dataset"]:
            points[key] = r.get(key)
        points["run_dir"] = str(run)
        frames.append(points)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def paper_table(df: pd.DataFrame, metrics: list[str]) -> pd.DataFrame:
    """Method rows; (T, metric) columns; mean over seeds."""
    present = [m for m in metrics if m in df and df[m].notna().any()]
    table = df.pivot_table(index="method", columns="num_edits", values=present, aggfunc="mean")
    table = table.swaplevel(0, 1, axis=1)
    order = [(t, m) for t in sorted(df["num_edits"].unique()) for m in present if (t, m) in table.columns]
    table = table[order]
    table.columns = [f"T={t} {m.capitalize()}" for t, m in order]
    return table.round(3)


def protocol_title(key: tuple) -> str:
    return ", ".join(f"{name}={value}" for name, value in zip(PROTOCOL, key))


def seconds_per_edit(curves: pd.DataFrame) -> pd.Series:
    """Editing seconds per edit between consecutive evaluation points of each run (from ``edit_s``)."""
    ordered = curves.sort_values(["run_dir", "n_edits"])
    by_run = ordered.groupby("run_dir")
    edit_s = by_run["edit_s"].diff().fillna(ordered["edit_s"])
    edits = by_run["n_edits"].diff().fillna(ordered["n_edits"])
    return (edit_s / edits).reindex(curves.index)


def plot_curves(curves: pd.DataFrame, metrics: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if "edit_s" in curves:  # is the cost per edit flat over the sequence?
        curves = curves.assign(s_per_edit=seconds_per_edit(curves))
        metrics = [*metrics, "s_per_edit"]
    present = [m for m in metrics if m in curves and curves[m].notna().any()]
    fig, axes = plt.subplots(1, len(present), figsize=(4 * len(present), 3.2), squeeze=False)
    for ax, metric in zip(axes[0], present):
        for (method, T), run in curves.groupby(["method", "num_edits"]):
            mean = run.groupby("n_edits")[metric].mean()  # over seeds
            ax.plot(mean.index, mean.values, marker="o", ms=3, label=f"{method} (T={T})")
        ax.set_title("seconds per edit" if metric == "s_per_edit" else metric)
        ax.set_xlabel("number of edits")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(paths: list[Path], out: Path, metrics: list[str] = METRICS) -> pd.DataFrame:
    runs = find_runs(paths)
    if not runs:
        raise SystemExit(f"no results.json under {', '.join(map(str, paths))}")
    out.mkdir(parents=True, exist_ok=True)
    df = load_results(runs)
    df.to_csv(out / "results.csv", index=False)
    curves = load_curves(runs)

    sections = [f"# wise-bench report\n\n{len(df)} runs from {', '.join(map(str, paths))}.\n"]
    for key, group in df.groupby(PROTOCOL, dropna=False):
        sections.append(f"## {protocol_title(key)}\n\n{paper_table(group, metrics).to_markdown()}\n")
        per_edit = group.groupby(["method", "num_edits"])["edit_s_per_edit"].mean().unstack().round(4)
        sections.append(f"Seconds per edit:\n\n{per_edit.to_markdown()}\n")
        if not curves.empty:
            name = "_".join(str(v) for v in key[:3]).replace("/", "-")
            selected = curves[curves["run_dir"].isin(group["run_dir"])]
            plot_curves(selected, metrics, out / f"{name}.png")
            sections.append(f"![{name}]({name}.png)\n")
    (out / "results.md").write_text("\n".join(sections))
    return df


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m wise_bench.report", description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+", type=Path, help="run or multirun directories (searched recursively)")
    parser.add_argument("--out", type=Path, default=None, help="output directory (default: <first path>/report)")
    parser.add_argument("--metrics", default=",".join(METRICS), help="comma-separated metric columns")
    args = parser.parse_args(argv)
    out = args.out or args.paths[0] / "report"
    df = write_report(args.paths, out, args.metrics.split(","))
    print(f"{len(df)} runs -> {out}/results.md, results.csv and plots")
    return 0


if __name__ == "__main__":
    sys.exit(main())
