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

    def log_point(self, n_edits: int, metrics: dict[str, float], elapsed_s: float) -> dict[str, Any]:
        row = {"n_edits": n_edits, **metrics, **self.protocol, "elapsed_s": round(elapsed_s, 3)}
        _append_jsonl(self.run_dir / "metrics.jsonl", [row])
        return row

    def write_samples(self, rows: list[dict]) -> None:
        _append_jsonl(self.run_dir / "samples.jsonl", rows)

    def write_results(self, results: dict[str, Any]) -> Path:
        path = self.run_dir / "results.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
        tmp.replace(path)
        return path
