"""Edit and evaluation speed and peak memory of a method, against naive references in the same run.

    python scripts/bench.py --method wise --model tiny --num-edits 20 --out bench.json

- Edit: seconds per edit with the method's fast path (``prefix_cache``: frozen lower blocks run once
  per edit) and with the naive full-model forward in every step, on the same requests, alternating
  edit by edit so that machine load hits both alike. A method without a fast path reports ratio 1.
- Evaluation: requests per second of the batched, length-sorted evaluator against scoring one
  request at a time, unbatched; the per-request values must be identical.
- Memory: peak RSS on CPU, ``torch.cuda.max_memory_allocated`` on GPU.
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from wise_bench.config import register_configs  # noqa: E402
from wise_bench.data import load_dataset  # noqa: E402
from wise_bench.loop import method_config  # noqa: E402
from wise_bench.methods import EditContext  # noqa: E402
from wise_bench.metrics import Evaluator  # noqa: E402
from wise_bench.models import load_model, load_tokenizer, pick_device  # noqa: E402


def build(cfg, fast: bool):
    """A fresh model and method; ``fast`` switches the method's prefix cache when it has one."""
    cls, method_cfg = method_config(cfg)
    has_fast_path = "prefix_cache" in method_cfg
    if has_fast_path:
        method_cfg.prefix_cache = fast
    tok = load_tokenizer(cfg.model)
    device = pick_device(cfg.device)
    torch.manual_seed(cfg.seed)
    model = load_model(cfg.model, len(tok), device)
    dataset = load_dataset(cfg.dataset, cfg.data_dir, cfg.num_edits)
    method = cls(method_cfg, model, EditContext(tok, dataset.train_texts, device, cfg.seed))
    return model, tok, method, dataset, has_fast_path


def time_edits(cfg) -> dict:
    fast_model, _, fast, dataset, has_fast_path = build(cfg, fast=True)
    naive_model, _, naive, _, _ = build(cfg, fast=False)
    t_fast = t_naive = 0.0
    for req in dataset.requests:
        t0 = time.perf_counter()
        naive.edit([req])
        t_naive += time.perf_counter() - t0
        t0 = time.perf_counter()
        fast.edit([req])
        t_fast += time.perf_counter() - t0
    same = all(torch.allclose(a, b, atol=1e-5) for a, b in zip(fast_model.parameters(), naive_model.parameters()))
    n = len(dataset.requests)
    return {"edit_s_per_edit": t_fast / n, "edit_s_per_edit_naive": t_naive / n, "edit_speedup": t_naive / t_fast,
            "has_fast_path": has_fast_path, "edited_params_agree": same}


def time_evaluation(cfg, batch_size: int) -> dict:
    model, tok, _, dataset, _ = build(cfg, fast=True)
    fmt, metrics = cfg.dataset.format, cfg.dataset.metrics
    batched = Evaluator(tok, dataset.requests, fmt, metrics, batch_size)
    naive = Evaluator(tok, dataset.requests, fmt, metrics, 1)
    batched.record_unedited_locality(model)
    naive.record_unedited_locality(model)
    indices = range(len(dataset.requests))
    t0 = time.perf_counter()
    rows_naive = [naive.score(model, [i])[0] for i in indices]
    t_naive = time.perf_counter() - t0
    t0 = time.perf_counter()
    rows = batched.score(model, indices)
    t_fast = time.perf_counter() - t0
    n = len(rows)
    return {"eval_req_per_s": n / t_fast, "eval_req_per_s_naive": n / t_naive, "eval_speedup": t_naive / t_fast,
            "eval_batch_size": batch_size, "eval_rows_identical": rows == rows_naive}


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kilobytes


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--method", default="wise")
    p.add_argument("--model", default="tiny")
    p.add_argument("--dataset", default="zsre")
    p.add_argument("--num-edits", type=int, default=20)
    p.add_argument("--eval-batch-size", type=int, default=32)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("overrides", nargs="*", help="extra Hydra overrides, e.g. device=cuda model.dtype=bfloat16")
    args = p.parse_args(argv)

    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("config", [f"method={args.method}", f"model={args.model}", f"dataset={args.dataset}",
                                 f"num_edits={args.num_edits}", *args.overrides])
    result = {"method": args.method, "model": args.model, "dataset": args.dataset, "num_edits": args.num_edits,
              "device": str(pick_device(cfg.device)), "threads": torch.get_num_threads()}
    result.update(time_edits(cfg))
    result.update(time_evaluation(cfg, args.eval_batch_size))
    result["peak_mem_mb"] = peak_memory_mb(pick_device(cfg.device))

    print(f"{'':<24}{'fast':>12}{'naive':>12}{'ratio':>8}")
    print(f"{'edit s/edit':<24}{result['edit_s_per_edit']:>12.4f}{result['edit_s_per_edit_naive']:>12.4f}{result['edit_speedup']:>8.2f}")
    print(f"{'eval requests/s':<24}{result['eval_req_per_s']:>12.1f}{result['eval_req_per_s_naive']:>12.1f}{result['eval_speedup']:>8.2f}")
    print(f"peak memory {result['peak_mem_mb']:.0f} MB; edited weights agree: {result['edited_params_agree']}; "
          f"eval rows identical: {result['eval_rows_identical']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0 if result["edited_params_agree"] and result["eval_rows_identical"] else 1


if __name__ == "__main__":
    sys.exit(main())
