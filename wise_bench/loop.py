"""The lifelong-editing loop: load, measure the unedited model, edit, evaluate, record.

Every user input is checked (config, data files, target tokenisation, module paths) before the
model's weights load. The loop only talks to a method through ``wise_bench.methods.base.Method``.

Two shapes of run:
- a stream (``sequential``, ``batch``): edit steps on one model, never restored; evaluation of all
  edits so far after every ``eval_every`` edits; checkpoints allow ``resume``;
- chunks (``single`` = chunks of 1, ``paper_chunks``): each chunk is edited from the unedited model
  and evaluated at its end, then the method restores the model.
"""
from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from tqdm.auto import tqdm
from transformers import set_seed

from wise_bench.config import EditModeKind
from wise_bench.data import load_dataset
from wise_bench.errors import UserError
from wise_bench.loggers import make_logger
from wise_bench.methods import METHODS, EditContext, Method
from wise_bench.metrics import SCORERS, Evaluator, aggregate
from wise_bench.models import check_module_paths, input_device, load_model, load_tokenizer, pick_device
from wise_bench.results import RunRecorder

log = logging.getLogger(__name__)

SCOPES = {
    EditModeKind.single: "each_after_own_edit",  # edit one, score it, restore
    EditModeKind.paper_chunks: "chunk_end",  # each chunk scored after its last edit, then restored
    EditModeKind.sequential: "all_seen",
    EditModeKind.batch: "all_seen",
}
CHECKPOINT = "checkpoint.pt"
# Keys that may differ between a run and its resumption.
RESUME_FREE_KEYS = {"resume", "logger", "checkpoint_every", "eval", "device", "data_dir"}


def edit_steps(num_edits: int, step_size: int, eval_every: int, start: int = 0) -> Iterator[tuple[int, int, bool]]:
    """(start, stop, evaluate_after) for each edit step; the last step always evaluates."""
    for begin in range(start, num_edits, step_size):
        stop = min(begin + step_size, num_edits)
        yield begin, stop, stop == num_edits or stop // eval_every > begin // eval_every


def method_config(cfg: DictConfig) -> tuple[type[Method], DictConfig]:
    """The registered method class and ``cfg.method`` validated against its ``Config`` dataclass."""
    name = cfg.method.get("name")
    if name not in METHODS:
        raise UserError(f"method.name={name!r} is not registered; known methods: {', '.join(sorted(METHODS))}")
    cls = METHODS[name]
    try:
        typed = OmegaConf.merge(OmegaConf.structured(cls.Config), OmegaConf.to_container(cfg.method, resolve=True))
    except OmegaConfBaseException as e:
        raise UserError(f"method={name}: {e}".replace("\n", " ")) from None
    return cls, typed


def check_numbers(cfg: DictConfig, mode: EditModeKind) -> None:
    for key in ("num_edits", "eval_every", "edit_mode.batch_size", "edit_mode.chunk_size"):
        if OmegaConf.select(cfg, key) < 1:
            raise UserError(f"{key} must be >= 1")
    if mode is EditModeKind.paper_chunks and cfg.num_edits % cfg.edit_mode.chunk_size:
        raise UserError(f"num_edits={cfg.num_edits} is not a multiple of edit_mode.chunk_size={cfg.edit_mode.chunk_size}")
    if cfg.checkpoint_every and mode not in (EditModeKind.sequential, EditModeKind.batch):
        raise UserError("checkpoint_every / resume apply to the sequential and batch edit modes")


@dataclass
class Timing:
    edit_s: float = 0.0
    eval_s: float = 0.0
    elapsed_before: float = 0.0  # wall time spent before a resume
    started: float = field(default_factory=time.perf_counter)

    def elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.started


def run_names(cfg: DictConfig) -> tuple[str, str]:
    """(run name, group) for trackers: the run's method/dataset/model/T; the sweep groups a multirun."""
    name = f"{cfg.method.name}-{cfg.dataset.name}-{cfg.model.name}-T{cfg.num_edits}"
    group = f"{cfg.dataset.name}-{cfg.model.name}"
    if HydraConfig.initialized() and HydraConfig.get().mode is RunMode.MULTIRUN:
        group = f"sweep-{Path(HydraConfig.get().sweep.dir).name}"
    return name, group


# --- checkpoints ----------------------------------------------------------------------------------


def comparable_config(cfg: DictConfig) -> dict:
    return {k: v for k, v in OmegaConf.to_container(cfg, resolve=True).items() if k not in RESUME_FREE_KEYS}


def save_checkpoint(run_dir: Path, cfg: DictConfig, method: Method, n_edits: int, timing: Timing, counts: dict) -> None:
    state = {
        "n_edits": n_edits,
        "config": comparable_config(cfg),
        "method": method.state_dict(),
        "rng": {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
        "timing": {"edit_s": timing.edit_s, "eval_s": timing.eval_s, "elapsed": timing.elapsed()},
        "counts": dict(counts),
    }
    tmp = run_dir / (CHECKPOINT + ".tmp")
    torch.save(state, tmp)
    tmp.replace(run_dir / CHECKPOINT)  # atomic: a kill never leaves a half-written checkpoint


def load_checkpoint(resume_dir: str, cfg: DictConfig) -> dict:
    path = Path(resume_dir) / CHECKPOINT
    if not path.is_file():
        raise UserError(f"resume={resume_dir}: no {CHECKPOINT} there (was the run started with checkpoint_every > 0?)")
    state = torch.load(path, weights_only=False)
    now = comparable_config(cfg)
    differ = sorted(k for k in now.keys() | state["config"].keys() if now.get(k) != state["config"].get(k))
    if differ:
        raise UserError(f"resume={resume_dir}: the config differs from the checkpointed run in: {', '.join(differ)}")
    return state


def restore_rng(rng: dict) -> None:
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    if rng.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


# --- the run --------------------------------------------------------------------------------------


def run(cfg: DictConfig, run_dir: str | Path) -> dict[str, Any]:
    run_dir = Path(run_dir)
    mode = EditModeKind(cfg.edit_mode.kind)
    check_numbers(cfg, mode)
    cls, method_cfg = method_config(cfg)
    checkpoint = load_checkpoint(cfg.resume, cfg) if cfg.resume else None

    # --- checks that need no model weights ---
    dataset = load_dataset(cfg.dataset, cfg.data_dir, cfg.num_edits)
    tokenizer = load_tokenizer(cfg.model)
    evaluator = Evaluator(tokenizer, dataset.requests, cfg.dataset.format, cfg.dataset.metrics, cfg.eval.batch_size)
    check_module_paths(cfg.model, len(tokenizer), cls.module_paths(method_cfg))

    set_seed(cfg.seed)
    model = load_model(cfg.model, len(tokenizer), pick_device(cfg.device))
    device = input_device(model)
    method = cls(method_cfg, model, EditContext(tokenizer, dataset.train_texts, device, cfg.seed))

    # Requests per edit step; in paper_chunks a step never crosses a chunk (batch_size = chunk_size: MEMIT-MASS).
    step_size = cfg.edit_mode.batch_size if mode in (EditModeKind.batch, EditModeKind.paper_chunks) else 1
    protocol = {
        "scope": SCOPES[mode],
        "scorer": SCORERS["rel"],
        "scorers": {m: SCORERS[m] for m in SCORERS if m in evaluator.metrics},
        "edit_mode": mode.value,
        "batch_size": step_size,
    }
    if mode is EditModeKind.paper_chunks:
        protocol["chunk_size"] = cfg.edit_mode.chunk_size
    recorder = RunRecorder(run_dir, protocol)
    tracker = make_logger(cfg.logger, run_dir, OmegaConf.to_container(cfg, resolve=True), *run_names(cfg))

    timing = Timing()
    evaluator.record_unedited_locality(model)
    pre, _ = evaluator.evaluate(model, range(len(dataset.requests)))
    log.info("pre-edit: %s", _fmt(pre))

    counts: dict[str, int] = {}
    shared = dict(method=method, model=model, evaluator=evaluator, requests=dataset.requests, cfg=cfg,
                  recorder=recorder, tracker=tracker, timing=timing, counts=counts)
    if mode in (EditModeKind.single, EditModeKind.paper_chunks):
        chunk = cfg.edit_mode.chunk_size if mode is EditModeKind.paper_chunks else 1
        rows, final = run_chunks(chunk_size=chunk, step_size=step_size, **shared)
    else:
        rows, final = run_stream(step_size=step_size, checkpoint=checkpoint, run_dir=run_dir, **shared)

    recorder.write_samples(rows, cfg.num_edits)
    tracker.log_samples(rows)
    results = {
        **final,
        **protocol,
        "pre": pre,
        "method": cfg.method.name,
        "model": cfg.model.name,
        "dataset": cfg.dataset.name,
        "num_edits": cfg.num_edits,
        "seed": cfg.seed,
        "timing": {
            "edit_s_total": round(timing.edit_s, 3),
            "edit_s_per_edit": round(timing.edit_s / cfg.num_edits, 4),
            "eval_s_total": round(timing.eval_s, 3),
        },
    }
    if counts:
        results["skipped"] = counts
    if checkpoint is not None:
        results["resumed_from"] = {"run_dir": str(cfg.resume), "n_edits": checkpoint["n_edits"]}
    path = recorder.write_results(results)
    tracker.finish({k: v for k, v in results.items() if isinstance(v, (int, float, str))})
    print(summary_table(results, path))
    return results


def run_stream(method, model, evaluator, requests, cfg, recorder, tracker, timing, counts, step_size, checkpoint, run_dir):
    """Sequential / batch editing of one model; evaluation of all edits so far at each point."""
    start = 0
    if checkpoint is not None:
        start = checkpoint["n_edits"]
        method.load_state_dict(checkpoint["method"])
        restore_rng(checkpoint["rng"])
        timing.edit_s, timing.eval_s = checkpoint["timing"]["edit_s"], checkpoint["timing"]["eval_s"]
        timing.elapsed_before = checkpoint["timing"]["elapsed"]
        counts.update(checkpoint["counts"])
        recorder.copy_points_from(Path(cfg.resume), upto=start)
        log.info("resumed from %s after %d edits", cfg.resume, start)

    rows: list[dict] = []
    final: dict[str, float] = {}
    steps = edit_steps(cfg.num_edits, step_size, cfg.eval_every, start)
    bar = tqdm(steps, total=-(-(cfg.num_edits - start) // step_size), desc="editing", unit="step")
    for begin, stop, evaluate_now in bar:
        t0 = time.perf_counter()
        stats = method.edit(requests[begin:stop])
        timing.edit_s += time.perf_counter() - t0
        tally(counts, stats)
        bar.set_postfix({k: f"{v:.3g}" for k, v in stats.items()})
        if evaluate_now:
            t0 = time.perf_counter()
            rows = evaluator.score(model, range(stop))
            final = aggregate(rows)
            tracker.log(recorder.log_point(stop, final, timing.elapsed(), timing.edit_s), step=stop)
            log.info("after %d edits: %s", stop, _fmt(final))
            timing.eval_s += time.perf_counter() - t0
        if cfg.checkpoint_every and stop // cfg.checkpoint_every > begin // cfg.checkpoint_every and stop < cfg.num_edits:
            save_checkpoint(run_dir, cfg, method, stop, timing, counts)
    return rows, final


def run_chunks(method, model, evaluator, requests, cfg, recorder, tracker, timing, counts, chunk_size, step_size):
    """Each chunk edited from the unedited model, scored after its last edit, then restored."""
    rows: list[dict] = []
    final: dict[str, float] = {}
    bar = tqdm(range(len(requests)), desc="editing", unit="edit")
    for begin in range(0, len(requests), chunk_size):
        stop = begin + chunk_size
        for i in range(begin, stop, step_size):
            step = requests[i:min(i + step_size, stop)]
            t0 = time.perf_counter()
            stats = method.edit(step)
            timing.edit_s += time.perf_counter() - t0
            tally(counts, stats)
            bar.update(len(step))
            bar.set_postfix({k: f"{v:.3g}" for k, v in stats.items()})
        t0 = time.perf_counter()
        chunk_rows = evaluator.score(model, range(begin, stop))
        method.restore()
        rows += chunk_rows
        if chunk_size > 1:
            recorder.log_chunk(begin // chunk_size, begin, stop, aggregate(chunk_rows))
        if stop == len(requests) or stop // cfg.eval_every > begin // cfg.eval_every:
            # Chunks are equal-sized, so the mean over requests is the mean over chunks.
            final = aggregate(rows)
            tracker.log(recorder.log_point(stop, final, timing.elapsed(), timing.edit_s), step=stop)
            log.info("after %d edits: %s", stop, _fmt(final))
        timing.eval_s += time.perf_counter() - t0
    bar.close()
    return rows, final


def tally(counts: dict[str, int], stats: dict[str, float]) -> None:
    """Sum the per-step counts a method reports as ``skipped_*`` (e.g. requests it could not edit)."""
    for key, value in stats.items():
        if key.startswith("skipped_"):
            counts[key] = counts.get(key, 0) + int(value)


def _fmt(metrics: dict[str, float]) -> str:
    return " ".join(f"{k}={v:.3f}" for k, v in metrics.items())


def summary_table(results: dict[str, Any], path: Path) -> str:
    keys = [k for k in ("rel", "gen", "loc", "portability", "ood", "ppl", "avg") if k in results]
    t = results["timing"]
    lines = [
        "",
        f"wise-bench: {results['method']} on {results['model']} / {results['dataset']}, "
        f"{results['edit_mode']} (batch {results['batch_size']}), T={results['num_edits']}, seed {results['seed']}",
        f"scorer {results['scorer']}, scope {results['scope']}",
        f"{'metric':<12}{'pre-edit':>10}{'final':>10}",
    ]
    lines += [f"{k:<12}{results['pre'].get(k, float('nan')):>10.3f}{results[k]:>10.3f}" for k in keys]
    lines.append(f"edit {t['edit_s_total']:.1f}s ({t['edit_s_per_edit']:.3f}s/edit), eval {t['eval_s_total']:.1f}s")
    lines.append(f"results: {path}")
    return "\n".join(lines)
