"""The lifelong-editing loop: load, measure the unedited model, edit, evaluate, record.

Every user input is checked (config, data files, target tokenisation, module paths) before the
model's weights load. The loop only talks to a method through ``wise_bench.methods.base.Method``.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Iterator

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from tqdm.auto import tqdm
from transformers import set_seed

from wise_bench.config import EditModeKind
from wise_bench.data import load_dataset
from wise_bench.errors import UserError
from wise_bench.loggers import make_logger
from wise_bench.methods import METHODS, EditContext
from wise_bench.metrics import SCORERS, Evaluator, aggregate
from wise_bench.models import check_module_paths, load_model, load_tokenizer, pick_device
from wise_bench.results import RunRecorder

log = logging.getLogger(__name__)

SCOPES = {
    EditModeKind.single: "each_after_own_edit",  # edit one, score it, restore
    EditModeKind.sequential: "all_seen",
    EditModeKind.batch: "all_seen",
}


def edit_steps(num_edits: int, step_size: int, eval_every: int) -> Iterator[tuple[int, int, bool]]:
    """(start, stop, evaluate_after) for each edit step; the last step always evaluates."""
    for start in range(0, num_edits, step_size):
        stop = min(start + step_size, num_edits)
        yield start, stop, stop == num_edits or stop // eval_every > start // eval_every


def method_config(cfg: DictConfig) -> tuple[type, DictConfig]:
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


def run(cfg: DictConfig, run_dir: str | Path) -> dict[str, Any]:
    if cfg.num_edits < 1 or cfg.eval_every < 1 or cfg.edit_mode.batch_size < 1:
        raise UserError("num_edits, eval_every and edit_mode.batch_size must be >= 1")
    run_dir = Path(run_dir)
    mode = EditModeKind(cfg.edit_mode.kind)
    step_size = cfg.edit_mode.batch_size if mode is EditModeKind.batch else 1
    cls, method_cfg = method_config(cfg)

    # --- checks that need no model weights ---
    dataset = load_dataset(cfg.dataset, cfg.data_dir, cfg.num_edits)
    tokenizer = load_tokenizer(cfg.model)
    evaluator = Evaluator(tokenizer, dataset.requests, cfg.dataset.format, cfg.dataset.metrics, cfg.eval.batch_size)
    check_module_paths(cfg.model, len(tokenizer), cls.module_paths(method_cfg))

    set_seed(cfg.seed)
    device = pick_device(cfg.device)
    model = load_model(cfg.model, len(tokenizer), device)
    method = cls(method_cfg, model, EditContext(tokenizer, dataset.train_texts, device, cfg.seed))

    protocol = {
        "scope": SCOPES[mode],
        "scorer": SCORERS["rel"],
        "scorers": {m: SCORERS[m] for m in ["rel", "gen", "loc", "portability", "ppl", "ood"] if m in evaluator.metrics},
        "edit_mode": mode.value,
        "batch_size": step_size,
    }
    recorder = RunRecorder(run_dir, protocol)
    name = f"{cfg.method.name}-{cfg.dataset.name}-{cfg.model.name}-T{cfg.num_edits}"
    tracker = make_logger(cfg.logger, run_dir, OmegaConf.to_container(cfg, resolve=True), name)

    t_start = time.perf_counter()
    evaluator.record_unedited_locality(model)
    pre, _ = evaluator.evaluate(model, range(len(dataset.requests)))
    log.info("pre-edit: %s", _fmt(pre))

    edit_s = eval_s = 0.0
    rows: list[dict] = []  # single mode: each request's scores right after its own edit
    final: dict[str, float] = {}
    bar = tqdm(edit_steps(cfg.num_edits, step_size, cfg.eval_every), total=-(-cfg.num_edits // step_size), desc="editing", unit="step")
    for start, stop, evaluate_now in bar:
        t0 = time.perf_counter()
        stats = method.edit(dataset.requests[start:stop])
        edit_s += time.perf_counter() - t0
        bar.set_postfix({k: f"{v:.3g}" for k, v in stats.items()})

        t0 = time.perf_counter()
        if mode is EditModeKind.single:
            rows += evaluator.score(model, range(start, stop))
            method.restore()
        if evaluate_now:
            if mode is not EditModeKind.single:
                rows = evaluator.score(model, range(stop))
            final = aggregate(rows)
            point = recorder.log_point(stop, final, time.perf_counter() - t_start)
            tracker.log(point, step=stop)
            log.info("after %d edits: %s", stop, _fmt(final))
        eval_s += time.perf_counter() - t0

    recorder.write_samples(rows)
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
            "edit_s_total": round(edit_s, 3),
            "edit_s_per_edit": round(edit_s / cfg.num_edits, 4),
            "eval_s_total": round(eval_s, 3),
        },
    }
    path = recorder.write_results(results)
    tracker.finish({k: v for k, v in results.items() if isinstance(v, (int, float, str))})
    print(summary_table(results, path))
    return results


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
    lines.append(
        f"edit {t['edit_s_total']:.1f}s ({t['edit_s_per_edit']:.3f}s/edit), eval {t['eval_s_total']:.1f}s"
    )
    lines.append(f"results: {path}")
    return "\n".join(lines)
