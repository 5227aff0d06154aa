"""What a run writes into its directory: metrics.jsonl, samples.jsonl and results.json.

metrics.jsonl is appended and flushed at every evaluation point, so a run that dies keeps every
point it computed. Every row carries its protocol (scorer, scope, edit mode, batch size).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def _append_jsonl(path: Path, rows: list[dict]) -> None:
    with path.open("a", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


class RunRecorder:
    def __init__(self, run_dir: str | Path, protocol: dict[str, Any]):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.protocol = protocol

    def log_point(self, n_edits: int, metrics: dict[str, float], elapsed_s: float, edit_s: float) -> dict[str, Any]:
        """One evaluation point; ``edit_s`` is the time spent editing so far (per-edit cost over T)."""
        row = {"n_edits": n_edits, **metrics, **self.protocol, "elapsed_s": round(elapsed_s, 3), "edit_s": round(edit_s, 3)}
        _append_jsonl(self.run_dir / "metrics.jsonl", [row])
        return row

    def log_chunk(self, chunk: int, start: int, stop: int, metrics: dict[str, float]) -> None:
        """Per-chunk numbers of edit_mode=paper_chunks (requests start..stop-1)."""
        row = {"chunk": chunk, "start": start, "stop": stop, "n_edits": stop - start, **metrics, **self.protocol}
        _append_jsonl(self.run_dir / "chunks.jsonl", [row])

    def points(self) -> list[dict[str, Any]]:
        """The evaluation points written so far (after a resume, the earlier run's included)."""
        path = self.run_dir / "metrics.jsonl"
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()] if path.exists() else []

    def copy_points_from(self, other_run: Path, upto: int) -> None:
        """On resume: keep the evaluation points of ``other_run`` up to its checkpoint, drop later ones."""
        source = Path(other_run) / "metrics.jsonl"
        lines = source.read_text(encoding="utf-8").splitlines() if source.exists() else []
        kept = [line for line in lines if line and json.loads(line)["n_edits"] <= upto]
        target = self.run_dir / "metrics.jsonl"
        tmp = target.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        tmp.replace(target)

    def write_samples(self, rows: list[dict], n_edits: int) -> None:
        """Per-request scores of the final evaluation (after ``n_edits`` edits), with the protocol."""
        _append_jsonl(self.run_dir / "samples.jsonl", [{**row, "n_edits": n_edits, **self.protocol} for row in rows])

    def write_results(self, results: dict[str, Any]) -> Path:
        path = self.run_dir / "results.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
        tmp.replace(path)
        return path
