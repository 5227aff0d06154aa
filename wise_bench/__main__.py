"""``python -m wise_bench [overrides]``: one lifelong-editing run (or a sweep with -m)."""
from __future__ import annotations

import logging
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from wise_bench.config import REPO_ROOT, register_configs
from wise_bench.errors import UserError

log = logging.getLogger("wise_bench")
register_configs()


# An absolute path: a console script imports this module, where "../conf" would not resolve.
@hydra.main(version_base="1.3", config_path=str(REPO_ROOT / "conf"), config_name="config")
def main(cfg: DictConfig) -> float:
    from wise_bench.loop import run  # heavy imports (torch, transformers) after Hydra parsed the CLI

    try:
        results = run(cfg, HydraConfig.get().runtime.output_dir)
    except UserError as e:
        log.error("%s", e)
        sys.exit(2)
    if "stopped" in results:
        sys.exit(3)  # on_nonfinite=stop: results.json holds the points computed before the fault
    if cfg.objective not in results:
        log.error("objective=%s is not among the run's metrics (%s)", cfg.objective, ", ".join(k for k, v in results.items() if isinstance(v, float)))
        sys.exit(2)
    return results[cfg.objective]  # the value a Hydra sweeper optimises


if __name__ == "__main__":
    main()
