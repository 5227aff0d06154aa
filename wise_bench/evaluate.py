"""``python -m wise_bench.evaluate <run_dir> [overrides]``: evaluate a saved edited model again, without editing.

A run with ``save_edited=true`` leaves ``edited.pt`` (the method's state after its last edit) in its
run directory, beside Hydra's ``.hydra/overrides.yaml``. The run's config is composed again from
those overrides plus the ones given here (``'eval.protocols=[generation]'``, ``dataset=counterfact_1k``,
``eval.count_lone_space=true`` ...); the unedited model is loaded, the saved state applied, and the
first ``num_edits`` requests scored. The results go to ``<run_dir>/evaluate/<date>_<time>/``
(results.json and samples.jsonl, with the protocol keys as in a run).

Exit codes as for a run: 2 for bad input (no edited.pt, a state saved by another method or model).
"""
from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Any

import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

from wise_bench.config import REPO_ROOT, register_configs
from wise_bench.errors import UserError

log = logging.getLogger("wise_bench.evaluate")


def run_config(run_dir: Path, overrides: list[str]) -> DictConfig:
    """The config of the run in ``run_dir`` (its Hydra overrides) with ``overrides`` on top."""
    saved = run_dir / ".hydra" / "overrides.yaml"
    if not saved.is_file():
        raise UserError(f"{run_dir}: no .hydra/overrides.yaml; is this the directory of a wise_bench run?")
    register_configs()
    with initialize_config_dir(config_dir=str(REPO_ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=[*OmegaConf.load(saved), *overrides])


def evaluate_saved(run_dir: str | Path, cfg: DictConfig, out_dir: str | Path) -> dict[str, Any]:
    """Scores of the edited model saved in ``run_dir`` under ``cfg``'s evaluation settings."""
    from wise_bench.loop import EDITED, build, comparable_config, prepare, run_protocol, score_point
    from wise_bench.metrics import aggregate, protocol_summary
    from wise_bench.results import RunRecorder

    path = Path(run_dir) / EDITED
    if not path.is_file():
        raise UserError(f"{run_dir}: no {EDITED}; run with save_edited=true (sequential or batch mode) to keep the "
                        "edited model's state, then evaluate that run's directory")
    saved = torch.load(path, weights_only=True)
    now, then = comparable_config(cfg), saved["config"]
    for key in ("method", "model"):
        if now[key] != then[key]:
            raise UserError(f"{path}: saved by {key}={then[key]['name']} with other settings than this config's "
                            f"{key}={now[key]['name']}; evaluate with the run's own {key} settings")
    setup = prepare(cfg)
    model, method = build(cfg, setup)
    setup.evaluator.record_unedited_locality(model)
    if setup.generation is not None:
        setup.generation.record_unedited(model)
    method.load_state_dict(saved["method"])
    step_size = cfg.edit_mode.batch_size if cfg.edit_mode.kind == "batch" else 1
    protocol = run_protocol(cfg, setup, step_size)
    recorder = RunRecorder(out_dir, protocol)
    t0 = time.perf_counter()
    rows = score_point(setup.evaluator, setup.generation, model, range(len(setup.dataset.requests)))
    results = {
        **aggregate(rows),
        **protocol_summary(rows),
        **protocol,
        "method": cfg.method.name,
        "model": cfg.model.name,
        "dataset": cfg.dataset.name,
        "num_edits": saved["n_edits"],
        "seed": cfg.seed,
        "evaluated_from": str(run_dir),
        "timing": {"eval_s_total": round(time.perf_counter() - t0, 3)},
    }
    recorder.write_samples(rows, saved["n_edits"])
    recorder.write_results(results)
    return results


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0].startswith("-"):
        print(__doc__)
        return 0 if args and args[0] in ("-h", "--help") else 2
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    run_dir = Path(args[0])
    try:
        cfg = run_config(run_dir, args[1:])
        out_dir = run_dir / "evaluate" / time.strftime("%Y-%m-%d_%H-%M-%S")
        results = evaluate_saved(run_dir, cfg, out_dir)
    except UserError as e:
        log.error("%s", e)
        return 2
    keys = [k for k in ("rel", "gen", "loc", "portability", "avg") if k in results]
    print(" ".join(f"{k}={results[k]:.3f}" for k in keys), f"-> {out_dir / 'results.json'}")
    for name, scores in results.get("protocols", {}).items():
        if name != "teacher_forced":
            print(f"  {name}: " + " ".join(f"{k}={v:.3f}" for k, v in scores.items() if isinstance(v, float)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
