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

import copy
import logging
import math
import pickle
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import torch
from torch import nn
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from tqdm.auto import tqdm
from transformers import set_seed

from wise_bench.config import EditModeKind, MetricName, OnNonFinite, OnTooLong
from wise_bench.data import load_dataset
from wise_bench.errors import UserError
from wise_bench.generation import GenerationEvaluator, generation_evaluator
from wise_bench.limits import TokenLimit, model_max_length
from wise_bench.loggers import make_logger
from wise_bench.methods import METHODS, EditContext, Method
from wise_bench.metrics import SCORERS, Evaluator, aggregate, collapse_point, protocol_summary, retention
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
EDITED = "edited.pt"  # save_edited=true: the method's state after the last edit
RETAINED = ("rel", "gen", "portability")  # scores of an edit whose retention is measured
# Keys that may differ between a run and its resumption.
RESUME_FREE_KEYS = {"resume", "logger", "checkpoint_every", "save_edited", "eval", "device", "data_dir"}


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
    for key in ("num_edits", "eval_every", "edit_mode.batch_size", "edit_mode.chunk_size", "eval.batch_size", "eval.max_batch_tokens"):
        if OmegaConf.select(cfg, key) < 1:
            raise UserError(f"{key} must be >= 1")
    if mode is EditModeKind.paper_chunks and cfg.num_edits % cfg.edit_mode.chunk_size:
        raise UserError(f"num_edits={cfg.num_edits} is not a multiple of edit_mode.chunk_size={cfg.edit_mode.chunk_size}")
    if cfg.checkpoint_every and mode not in (EditModeKind.sequential, EditModeKind.batch):
        raise UserError("checkpoint_every / resume apply to the sequential and batch edit modes")
    if cfg.save_edited and mode not in (EditModeKind.sequential, EditModeKind.batch):
        raise UserError("save_edited applies to the sequential and batch edit modes (the others restore the model)")


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
    # Enums as their names: a checkpoint holds only types that torch.load(weights_only=True) accepts.
    config = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    return {k: v for k, v in config.items() if k not in RESUME_FREE_KEYS}


def save_checkpoint(run_dir: Path, cfg: DictConfig, method: Method, n_edits: int, timing: Timing, counts: dict,
                    progress: "Progress") -> None:
    state = {
        "n_edits": n_edits,
        "config": comparable_config(cfg),
        "method": method.state_dict(),
        "rng": {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": numpy_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
        "timing": {"edit_s": timing.edit_s, "eval_s": timing.eval_s, "elapsed": timing.elapsed()},
        "counts": dict(counts),
        "skipped_requests": list(progress.skipped_requests),
        "at_edit": dict(progress.at_edit),
    }
    save_atomically(state, run_dir / CHECKPOINT)


def save_atomically(state: dict, path: Path) -> None:
    """torch.save through a temporary file: a kill never leaves a half-written file at ``path``."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def load_checkpoint(resume_dir: str, cfg: DictConfig) -> dict:
    path = Path(resume_dir) / CHECKPOINT
    if not path.is_file():
        raise UserError(f"resume={resume_dir}: no {CHECKPOINT} there (was the run started with checkpoint_every > 0?)")
    try:
        state = torch.load(path, weights_only=True)  # tensors and plain containers only: no code runs on load
    except pickle.UnpicklingError:
        raise UserError(f"resume={resume_dir}: {CHECKPOINT} holds objects other than tensors and plain containers "
                        "(written by an older wise-bench?); start the run again") from None
    now = comparable_config(cfg)
    differ = sorted(k for k in now.keys() | state["config"].keys() if now.get(k) != state["config"].get(k))
    if differ:
        raise UserError(f"resume={resume_dir}: the config differs from the checkpointed run in: {', '.join(differ)}")
    return state


def numpy_rng_state() -> tuple:
    """numpy's global RNG state with its key array as a tensor (weights_only loads no ndarray)."""
    kind, key, pos, has_gauss, gauss = np.random.get_state()
    return kind, torch.from_numpy(key.astype(np.int64)), pos, has_gauss, gauss


def restore_rng(rng: dict) -> None:
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    kind, key, pos, has_gauss, gauss = rng["numpy"]
    np.random.set_state((kind, key.numpy().astype(np.uint32), pos, has_gauss, gauss))
    if rng.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


# --- the run --------------------------------------------------------------------------------------


@dataclass
class Setup:
    """Everything a run needs besides the model, built and checked before any weights load."""

    method_cls: type[Method]
    method_cfg: DictConfig
    tokenizer: Any
    dataset: Any
    evaluator: Evaluator
    generation: Optional[GenerationEvaluator]


def prepare(cfg: DictConfig) -> Setup:
    """Config, data files, text lengths, targets and module paths, all checked without weights."""
    cls, method_cfg = method_config(cfg)
    load_dataset(cfg.dataset, cfg.data_dir, cfg.num_edits)  # files, records and fields, before any model file is read
    tokenizer = load_tokenizer(cfg.model)
    limit = TokenLimit(tokenizer, model_max_length(cfg.model, len(tokenizer)), cls.prefix_tokens(method_cfg, tokenizer),
                       frozenset(MetricName(m).value for m in cfg.dataset.metrics))
    dataset = load_dataset(cfg.dataset, cfg.data_dir, cfg.num_edits, limit, OnTooLong(cfg.data.on_too_long) is OnTooLong.skip)
    evaluator = Evaluator(tokenizer, dataset.requests, cfg.dataset.format, cfg.dataset.metrics, cfg.eval.batch_size,
                          cfg.eval.max_batch_tokens, cfg.eval.count_lone_space)
    generation = generation_evaluator(tokenizer, dataset.requests, cfg.dataset.metrics, cfg.eval)
    cls.check_modules(method_cfg, check_module_paths(cfg.model, len(tokenizer), cls.module_paths(method_cfg)))
    return Setup(cls, method_cfg, tokenizer, dataset, evaluator, generation)


def build(cfg: DictConfig, setup: Setup) -> tuple[nn.Module, Method]:
    """The unedited model, loaded, and the method around it."""
    set_seed(cfg.seed)
    model = load_model(cfg.model, len(setup.tokenizer), pick_device(cfg.device))
    ctx = EditContext(setup.tokenizer, setup.dataset.train_texts, input_device(model), cfg.seed)
    return model, setup.method_cls(setup.method_cfg, model, ctx)


def run_protocol(cfg: DictConfig, setup: Setup, step_size: int) -> dict[str, Any]:
    """The keys stored with every metric value: how it was measured."""
    mode = EditModeKind(cfg.edit_mode.kind)
    evaluator, generation = setup.evaluator, setup.generation
    protocol = {
        "scope": SCOPES[mode],
        "scorer": evaluator.scorers["rel"],
        "scorers": protocol_scorers({m: evaluator.scorers[m] for m in SCORERS if m in evaluator.metrics}, generation),
        "edit_mode": mode.value,
        "batch_size": step_size,
    }
    if mode is EditModeKind.paper_chunks:
        protocol["chunk_size"] = cfg.edit_mode.chunk_size
    if generation is not None:
        protocol["generation_settings"] = generation.settings()
    return protocol


def save_edited(run_dir: Path, cfg: DictConfig, method: Method, n_edits: int) -> None:
    """The method's state at the end of the run, for ``python -m wise_bench.evaluate`` (no pickled objects)."""
    save_atomically({"method": method.state_dict(), "n_edits": n_edits, "config": comparable_config(cfg)}, run_dir / EDITED)


def run(cfg: DictConfig, run_dir: str | Path) -> dict[str, Any]:
    run_dir = Path(run_dir)
    mode = EditModeKind(cfg.edit_mode.kind)
    check_numbers(cfg, mode)
    checkpoint = load_checkpoint(cfg.resume, cfg) if cfg.resume else None
    setup = prepare(cfg)
    evaluator, generation, dataset = setup.evaluator, setup.generation, setup.dataset
    model, method = build(cfg, setup)

    # Requests per edit step; in paper_chunks a step never crosses a chunk (batch_size = chunk_size: MEMIT-MASS).
    step_size = cfg.edit_mode.batch_size if mode in (EditModeKind.batch, EditModeKind.paper_chunks) else 1
    protocol = run_protocol(cfg, setup, step_size)
    recorder = RunRecorder(run_dir, protocol)
    tracker = make_logger(cfg.logger, run_dir, OmegaConf.to_container(cfg, resolve=True), *run_names(cfg))

    timing = Timing()
    evaluator.record_unedited_locality(model)
    if generation is not None:
        generation.record_unedited(model)
    pre_rows = score_point(evaluator, generation, model, range(len(dataset.requests)))
    pre = aggregate(pre_rows)
    log.info("pre-edit: %s", _fmt(pre))
    pre |= protocol_summary(pre_rows)

    counts: dict[str, int] = {}
    if dataset.skipped_too_long:
        counts["skipped_too_long"] = len(dataset.skipped_too_long)
    progress = Progress()
    shared = dict(method=method, model=model, evaluator=evaluator, generation=generation, requests=dataset.requests, cfg=cfg,
                  recorder=recorder, tracker=tracker, timing=timing, counts=counts, progress=progress)
    try:
        if mode in (EditModeKind.single, EditModeKind.paper_chunks):
            chunk = cfg.edit_mode.chunk_size if mode is EditModeKind.paper_chunks else 1
            run_chunks(chunk_size=chunk, step_size=step_size, **shared)
        else:
            run_stream(step_size=step_size, checkpoint=checkpoint, run_dir=run_dir, **shared)
    except NonFiniteStop as stop:
        progress.stopped = str(stop)
        log.error("stopped: %s (on_nonfinite=stop); the points computed so far are kept", stop)

    rows, final = progress.rows, progress.final
    rows = [{**row, **{f"{k}_at_edit": v for k, v in progress.at_edit.get(row["index"], {}).items()}} for row in rows]
    recorder.write_samples(rows, progress.last_point)
    tracker.log_samples(rows)
    results = {
        **final,
        **protocol_summary(rows),
        **protocol,
        "pre": pre,
        "method": cfg.method.name,
        "model": cfg.model.name,
        "dataset": cfg.dataset.name,
        "num_edits": cfg.num_edits,
        "seed": cfg.seed,
        "timing": {
            "edit_s_total": round(timing.edit_s, 3),
            "edit_s_per_edit": round(timing.edit_s / max(progress.edits_done, 1), 4),
            "eval_s_total": round(timing.eval_s, 3),
        },
    }
    if progress.at_edit:
        results["retention"] = {k: retention(rows, k) for k in RETAINED if any(f"{k}_at_edit" in r for r in rows)}
    results["collapse_at"] = collapse_point(recorder.points(), cfg.eval.collapse_fraction)
    if counts:
        results["skipped"] = counts
    if progress.skipped_requests:
        results["skipped_requests"] = progress.skipped_requests  # on_nonfinite=skip: left unedited
    if dataset.skipped_too_long:
        results["skipped_too_long"] = dataset.skipped_too_long
    if progress.stopped:
        results["stopped"] = progress.stopped
        results["num_edits_done"] = progress.edits_done
    if checkpoint is not None:
        results["resumed_from"] = {"run_dir": str(cfg.resume), "n_edits": checkpoint["n_edits"]}
    if cfg.save_edited and not progress.stopped:
        save_edited(run_dir, cfg, method, progress.edits_done)
    path = recorder.write_results(results)
    tracker.finish({k: v for k, v in results.items() if isinstance(v, (int, float, str))})
    print(summary_table(results, path))
    return results


class NonFiniteStop(Exception):
    """A non-finite loss or edited tensor under on_nonfinite=stop."""


@dataclass
class Progress:
    """What a run has computed so far: all of it is kept when the run stops early."""

    rows: list[dict] = field(default_factory=list)  # per-request scores at the last evaluation point
    final: dict[str, float] = field(default_factory=dict)
    last_point: int = 0  # edits made before the last evaluation point
    edits_done: int = 0
    skipped_requests: list[int] = field(default_factory=list)  # on_nonfinite=skip: steps rolled back
    stopped: Optional[str] = None
    # eval.probe_after_edit: each request's scores right after its own edit step (for retention).
    at_edit: dict[int, dict[str, float]] = field(default_factory=dict)


def edit_step(method: Method, step: list, begin: int, policy: OnNonFinite, timing: Timing, counts: dict,
              progress: Progress) -> dict[str, float]:
    """One edit step, checked for non-finite values; stops the run or rolls the step back (policy)."""
    before = copy.deepcopy(method.state_dict()) if policy is OnNonFinite.skip else None
    t0 = time.perf_counter()
    stats = method.edit(step)
    timing.edit_s += time.perf_counter() - t0
    progress.edits_done += len(step)
    fault = nonfinite(stats, method)
    if fault is None:
        tally(counts, stats)
        return stats
    where = f"edit {begin + 1}" if len(step) == 1 else f"edits {begin + 1}-{begin + len(step)}"
    if policy is OnNonFinite.stop:
        raise NonFiniteStop(f"{fault} at {where}")
    method.load_state_dict(before)
    progress.skipped_requests += [begin + i for i in range(len(step))]
    counts["skipped_nonfinite"] = counts.get("skipped_nonfinite", 0) + len(step)
    log.warning("%s at %s: step rolled back, request(s) left unedited (on_nonfinite=skip)", fault, where)
    return stats


def probed(row: dict) -> dict[str, float]:
    """The scores kept from the probe right after an edit: those whose loss over time retention measures."""
    return {k: row[k] for k in RETAINED if k in row}


def nonfinite(stats: dict[str, float], method: Method) -> Optional[str]:
    """What is non-finite after a step: a loss the method reports, or a tensor it edited; None if nothing."""
    for key, value in stats.items():
        if "loss" in key and not math.isfinite(value):
            return f"non-finite {key}"
    tensors = method.edited_tensors()
    if tensors and not torch.stack([torch.isfinite(t).all().to(tensors[0].device) for t in tensors]).all():
        return "non-finite edited weights"
    return None


def run_stream(method, model, evaluator, generation, requests, cfg, recorder, tracker, timing, counts, progress,
               step_size, checkpoint, run_dir) -> None:
    """Sequential / batch editing of one model; evaluation of all edits so far at each point."""
    start = 0
    if checkpoint is not None:
        start = checkpoint["n_edits"]
        method.load_state_dict(checkpoint["method"])
        restore_rng(checkpoint["rng"])
        timing.edit_s, timing.eval_s = checkpoint["timing"]["edit_s"], checkpoint["timing"]["eval_s"]
        timing.elapsed_before = checkpoint["timing"]["elapsed"]
        counts.update(checkpoint["counts"])
        progress.skipped_requests = list(checkpoint["skipped_requests"])
        progress.at_edit = dict(checkpoint["at_edit"])
        progress.edits_done = start
        recorder.copy_points_from(Path(cfg.resume), upto=start)
        log.info("resumed from %s after %d edits", cfg.resume, start)

    steps = edit_steps(cfg.num_edits, step_size, cfg.eval_every, start)
    bar = tqdm(steps, total=-(-(cfg.num_edits - start) // step_size), desc="editing", unit="step")
    for begin, stop, evaluate_now in bar:
        stats = edit_step(method, requests[begin:stop], begin, OnNonFinite(cfg.on_nonfinite), timing, counts, progress)
        bar.set_postfix({k: f"{v:.3g}" for k, v in stats.items()})
        if cfg.eval.probe_after_edit:
            t0 = time.perf_counter()
            progress.at_edit.update((row["index"], probed(row)) for row in evaluator.score(model, range(begin, stop)))
            timing.eval_s += time.perf_counter() - t0
        if evaluate_now:
            t0 = time.perf_counter()
            progress.rows = score_point(evaluator, generation, model, range(stop))
            progress.final, progress.last_point = aggregate(progress.rows), stop
            record_point(recorder, tracker, timing, progress)
            timing.eval_s += time.perf_counter() - t0
        if cfg.checkpoint_every and stop // cfg.checkpoint_every > begin // cfg.checkpoint_every and stop < cfg.num_edits:
            save_checkpoint(run_dir, cfg, method, stop, timing, counts, progress)


def run_chunks(method, model, evaluator, generation, requests, cfg, recorder, tracker, timing, counts, progress,
               chunk_size, step_size) -> None:
    """Each chunk edited from the unedited model, scored after its last edit, then restored."""
    rows: list[dict] = []
    bar = tqdm(range(len(requests)), desc="editing", unit="edit")
    for begin in range(0, len(requests), chunk_size):
        stop = begin + chunk_size
        for i in range(begin, stop, step_size):
            step = requests[i:min(i + step_size, stop)]
            stats = edit_step(method, step, i, OnNonFinite(cfg.on_nonfinite), timing, counts, progress)
            bar.update(len(step))
            bar.set_postfix({k: f"{v:.3g}" for k, v in stats.items()})
        t0 = time.perf_counter()
        chunk_rows = score_point(evaluator, generation, model, range(begin, stop))
        method.restore()
        rows += chunk_rows
        if chunk_size > 1:
            recorder.log_chunk(begin // chunk_size, begin, stop, {**aggregate(chunk_rows), **protocol_summary(chunk_rows)})
        if stop == len(requests) or stop // cfg.eval_every > begin // cfg.eval_every:
            # Chunks are equal-sized, so the mean over requests is the mean over chunks.
            progress.rows, progress.final, progress.last_point = list(rows), aggregate(rows), stop
            record_point(recorder, tracker, timing, progress)
        timing.eval_s += time.perf_counter() - t0
    bar.close()


def score_point(evaluator: Evaluator, generation: Optional[GenerationEvaluator], model, indices) -> list[dict]:
    """Per-request scores under every protocol of the run: teacher-forced at the top level, the others
    nested under "protocols". Generation runs here only (evaluation points), never per edit."""
    rows = evaluator.score(model, indices)
    if generation is not None:
        for row, nested in zip(rows, generation.score(model, indices)):
            row["protocols"] = nested
    return rows


def record_point(recorder: RunRecorder, tracker, timing: Timing, progress: "Progress") -> None:
    """Write the evaluation point just scored (every protocol, with intervals) and log it."""
    summary = protocol_summary(progress.rows)
    row = recorder.log_point(progress.last_point, {**progress.final, **summary}, timing.elapsed(), timing.edit_s)
    tracker.log(row, step=progress.last_point)
    log.info("after %d edits: %s", progress.last_point, _fmt(progress.final))
    for name, scores in summary["protocols"].items():
        if name != "teacher_forced":
            log.info("  %s: %s", name, _fmt({k: v for k, v in scores.items() if k != "ci95"}))


def protocol_scorers(teacher_forced: dict[str, str], generation: Optional[GenerationEvaluator]) -> dict[str, Any]:
    """The scorer of every value: the teacher-forced ones at the top level (as before protocols
    existed) and again under "teacher_forced", each generation context's under its own key."""
    return {**teacher_forced, "teacher_forced": dict(teacher_forced), **(generation.scorers() if generation else {})}


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
        f"{'metric':<18}{'pre-edit':>10}{'final':>10}{'+-95%':>8}",
    ]

    def line(label: str, pre: Optional[float], final: float, half_width: Optional[float]) -> str:
        nan = float("nan")
        return f"{label:<18}{nan if pre is None else pre:>10.3f}{final:>10.3f}{nan if half_width is None else half_width:>8.3f}"

    lines += [line(k, results["pre"].get(k), results[k], results.get("ci95", {}).get(k)) for k in keys]
    for name, scores in results.get("protocols", {}).items():
        if name != "teacher_forced":  # the rows above
            pre = results["pre"].get("protocols", {}).get(name, {})
            lines.append(name)
            lines += [line(f"  {k}", pre.get(k), v, scores["ci95"].get(k)) for k, v in scores.items() if k != "ci95"]
    lines.append(f"edit {t['edit_s_total']:.1f}s ({t['edit_s_per_edit']:.3f}s/edit), eval {t['eval_s_total']:.1f}s")
    lines.append(f"results: {path}")
    return "\n".join(lines)
