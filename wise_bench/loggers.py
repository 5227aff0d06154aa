"""Experiment trackers. ``logger=none`` writes only the run directory; ``logger=wandb`` mirrors it to W&B.

A tracker failure is reported once and never stops the run: the run directory is the record.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from wise_bench.config import LoggerKind

log = logging.getLogger(__name__)


class NullLogger:
    def log(self, metrics: dict[str, Any], step: int) -> None:
        pass

    def log_samples(self, rows: list[dict]) -> None:
        pass

    def finish(self, summary: dict[str, Any]) -> None:
        pass


class WandbLogger(NullLogger):
    """W&B run with step = number of edits; offline by default, its files inside the run directory."""

    def __init__(self, cfg, run_dir: Path, config: dict[str, Any], default_name: str, default_group: str):
        self.run = None
        try:
            import wandb

            os.environ.setdefault("WANDB_SILENT", "true")
            self.run = wandb.init(
                project=cfg.project,
                entity=cfg.entity,
                mode=cfg.mode,
                group=cfg.group or default_group,
                name=cfg.name or default_name,
                tags=list(cfg.tags),
                config=config,
                dir=str(run_dir),
            )
        except Exception as e:  # noqa: BLE001 - any tracker failure must not stop a run
            self._failed("init", e)

    def _failed(self, what: str, e: Exception) -> None:
        log.warning("W&B %s failed (%s: %s); the run goes on, results stay in the run directory", what, type(e).__name__, e)
        self.run = None

    def log(self, metrics: dict[str, Any], step: int) -> None:
        if self.run is None:
            return
        try:
            self.run.log({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step=step)
        except Exception as e:  # noqa: BLE001
            self._failed("log", e)

    def log_samples(self, rows: list[dict]) -> None:
        if self.run is None or not rows:
            return
        try:
            import wandb

            columns = sorted({k for r in rows for k in r})
            self.run.log({"samples": wandb.Table(columns=columns, data=[[r.get(c) for c in columns] for r in rows])})
        except Exception as e:  # noqa: BLE001
            self._failed("table upload", e)

    def finish(self, summary: dict[str, Any]) -> None:
        if self.run is None:
            return
        try:
            for key, value in summary.items():
                self.run.summary[key] = value
            self.run.finish()
        except Exception as e:  # noqa: BLE001
            self._failed("finish", e)


def make_logger(cfg, run_dir: Path, config: dict[str, Any], default_name: str, default_group: str):
    if LoggerKind(cfg.kind) is LoggerKind.wandb:
        return WandbLogger(cfg, run_dir, config, default_name, default_group)
    return NullLogger()
