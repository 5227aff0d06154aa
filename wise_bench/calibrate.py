"""``python -m wise_bench.calibrate model=<m> method=<name>``: a method's scale-dependent
hyperparameters for a model, measured on a tuning split.

Some hyperparameters are absolute numbers tied to the size of a model's activations (WISE's margins,
GRACE's radius, ...): the reference values are right for LLaMA-2-7B and wrong elsewhere. Each such
method measures what the value is compared against on requests that reported runs never evaluate
(``dataset=zsre_tune`` by default) and returns the values; they are written to
``conf/calibration/<model>.yaml`` (one block per method, the measurements as comments), which the
model's config composes into ``model.hparams``.
"""
from __future__ import annotations

import datetime
import logging
import re
import sys
from pathlib import Path
from typing import Sequence

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from wise_bench.config import REPO_ROOT, register_configs
from wise_bench.errors import UserError

log = logging.getLogger("wise_bench.calibrate")
register_configs()


def method_block(method: str, values: dict, measured: dict, command: str) -> str:
    lines = [f"# --- {method} ---", f"# {command}  ({datetime.date.today().isoformat()})"]
    lines += [f"#   {k}: {v:.4g}" if isinstance(v, float) else f"#   {k}: {v}" for k, v in measured.items()]
    lines.append(OmegaConf.to_yaml(OmegaConf.create(values)).rstrip())
    return "\n".join(lines) + "\n"


def write_block(path: Path, method: str, block: str) -> None:
    """Replace ``method``'s block in the calibration file (or add it); other methods' blocks stay."""
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    blocks = re.split(r"(?m)^(?=# --- )", text)
    header = "" if blocks and blocks[0].startswith("# --- ") else blocks.pop(0)
    if not header:
        header = "# Written by `python -m wise_bench.calibrate`; composed into model.hparams by the model's config.\n\n"
    kept = [b for b in blocks if not b.startswith(f"# --- {method} ---")]
    body = sorted(kept + [block + "\n"], key=lambda b: b.splitlines()[0])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(header + "".join(b if b.endswith("\n\n") else b + "\n" for b in body).rstrip() + "\n", encoding="utf-8")


def calibrate(cfg: DictConfig, settings: Sequence[str] = ()) -> dict:
    """Measure, write ``cfg.out`` and return the values; ``settings`` are the command line's method and
    model overrides, recorded with the values since they change what is measured."""
    from wise_bench.data import load_dataset
    from wise_bench.loop import method_config
    from wise_bench.methods import METHODS, EditContext
    from wise_bench.models import check_module_paths, input_device, load_model, load_tokenizer, pick_device

    cls, method_cfg = method_config(cfg)
    if cls.calibrate is None:
        able = sorted(name for name, c in METHODS.items() if c.calibrate is not None)
        raise UserError(f"method={cfg.method.name} has no scale-dependent hyperparameter to calibrate "
                        f"(calibrated methods: {', '.join(able)}); tune it with a sweep instead")
    dataset = load_dataset(cfg.dataset, cfg.data_dir, cfg.num_edits)
    tokenizer = load_tokenizer(cfg.model)
    cls.check_modules(method_cfg, check_module_paths(cfg.model, len(tokenizer), cls.module_paths(method_cfg)))
    model = load_model(cfg.model, len(tokenizer), pick_device(cfg.device))
    ctx = EditContext(tokenizer, dataset.train_texts, input_device(model), cfg.seed)
    result = cls.calibrate(method_cfg, model, ctx, dataset.requests)
    command = f"python -m wise_bench.calibrate model={cfg.model.name} method={cfg.method.name} " \
              f"dataset={cfg.dataset.name} num_edits={cfg.num_edits}" + "".join(f" '{o}'" for o in settings)
    write_block(Path(cfg.out), cfg.method.name, method_block(cfg.method.name, result.values, result.measured, command))
    log.info("measured: %s", result.measured)
    log.info("wrote %s to %s", result.values, cfg.out)
    return result.values


@hydra.main(version_base="1.3", config_path=str(REPO_ROOT / "conf"), config_name="calibrate")  # absolute: console script
def main(cfg: DictConfig) -> None:
    try:
        overrides = HydraConfig.get().overrides.task
        calibrate(cfg, [o for o in overrides if o.lstrip("+~").startswith(("method.", "model.", "seed="))])
    except UserError as e:
        log.error("%s", e)
        sys.exit(2)


if __name__ == "__main__":
    main()
