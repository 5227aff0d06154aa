"""Edit and evaluation speed and peak memory of a method, against naive references in the same run.

    python scripts/bench.py --method wise --model small --num-edits 20 --out bench.json

The naive reference is the plain Hugging Face forward pass: every layer in every step, logits at
every position (the way EasyEdit runs), and evaluation one request at a time, unbatched.

- Edit: seconds per edit with the method's fast paths (``prefix_cache``: the frozen computation
  below the edited module runs once per edit; the LM head only at target positions) against the
  naive forward, on the same requests, alternating edit by edit so that machine load hits all alike.
  A third copy runs with the LM-head fast path only, which isolates the prefix cache's share. A
  method without a prefix cache reports the LM-head gain alone.
- Evaluation: requests per second of the batched, length-sorted evaluator (LM head at target
  positions) against scoring one request at a time with the naive forward; the per-request values
  must agree (perplexities to 1e-5, relative).
- Memory: peak RSS on CPU, ``torch.cuda.max_memory_allocated`` on GPU, and what is in use after
  loading the models.
"""
from __future__ import annotations

import argparse
import json
import math
import resource
import sys
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from unittest import mock

import torch
from hydra import compose, initialize_config_dir

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from wise_bench.config import register_configs  # noqa: E402
from wise_bench.data import load_dataset  # noqa: E402
from wise_bench.loop import method_config  # noqa: E402
from wise_bench.methods import EditContext  # noqa: E402
from wise_bench.metrics import Evaluator, TokenBatch  # noqa: E402
from wise_bench.models import input_device, load_model, load_tokenizer, pick_device  # noqa: E402
from wise_bench.prefix_cache import tensors_in  # noqa: E402


def naive_target_logits(batch: TokenBatch, model) -> torch.Tensor:
    """The reference for ``TokenBatch.target_logits``: logits at every position, then the targets'."""
    rows, cols = batch.target_mask.nonzero(as_tuple=True)
    return batch.logits(model)[rows, cols - 1]


def naive_last_logits(batch: TokenBatch, model) -> torch.Tensor:
    """The reference for ``TokenBatch.last_logits``: logits at every position, then the last one."""
    return batch.logits(model)[:, -1]


@contextmanager
def naive_forward():
    with mock.patch.object(TokenBatch, "target_logits", naive_target_logits), \
            mock.patch.object(TokenBatch, "last_logits", naive_last_logits):
        yield


def build(cfg, prefix_cache: bool):
    """A fresh model and method; ``prefix_cache`` switches the method's prefix cache when it has one."""
    cls, method_cfg = method_config(cfg)
    has_fast_path = "prefix_cache" in method_cfg
    if has_fast_path:
        method_cfg.prefix_cache = prefix_cache
    tok = load_tokenizer(cfg.model)
    torch.manual_seed(cfg.seed)
    model = load_model(cfg.model, len(tok), pick_device(cfg.device))
    device = input_device(model)
    dataset = load_dataset(cfg.dataset, cfg.data_dir, cfg.num_edits)
    method = cls(method_cfg, model, EditContext(tok, dataset.train_texts, device, cfg.seed))
    return model, tok, method, dataset, has_fast_path


def max_state_difference(a, b) -> float:
    ta, tb = tensors_in(a.state_dict()), tensors_in(b.state_dict())
    if len(ta) != len(tb) or any(x.shape != y.shape for x, y in zip(ta, tb)):
        return math.inf
    return max(((x.float() - y.float()).abs().max().item() for x, y in zip(ta, tb) if x.numel()), default=0.0)


def time_edits(cfg) -> dict:
    variants = {  # name -> (prefix cache, naive forward)
        "naive": (False, True), "no_prefix_cache": (False, False), "fast": (True, False)}
    built = {name: build(cfg, prefix_cache=cache) for name, (cache, _) in variants.items()}
    methods = {name: b[2] for name, b in built.items()}
    dataset, has_fast_path = built["fast"][3], built["fast"][4]
    loaded_mb = current_memory_mb(pick_device(cfg.device))
    seconds = dict.fromkeys(variants, 0.0)
    first: dict[str, dict] = {}  # each variant's statistics of the first edit
    cache_state_difference = naive_state_difference = None
    for req in dataset.requests:
        for name, (_, naive) in variants.items():
            with naive_forward() if naive else nullcontext():
                t0 = time.perf_counter()
                stats = methods[name].edit([req])
                seconds[name] += time.perf_counter() - t0
            first.setdefault(name, stats)
        if cache_state_difference is None:
            # The same edit from the same model. The prefix cache replays recorded tensors, so it must
            # learn exactly the same state; the naive forward rounds the LM head differently, so its
            # losses must agree to float precision (optimisers such as Adam near convergence can
            # amplify that rounding in the state itself, which is only reported).
            cache_state_difference = max_state_difference(methods["fast"], methods["no_prefix_cache"])
            naive_state_difference = max_state_difference(methods["fast"], methods["naive"])
    loss_difference = max(abs(first["fast"][k] - first["naive"][k]) / max(1.0, abs(first["naive"][k]))
                          for k in ("loss_start", "loss") if k in first["fast"])
    n = len(dataset.requests)
    return {"edit_s_per_edit": seconds["fast"] / n, "edit_s_per_edit_naive": seconds["naive"] / n,
            "edit_speedup": seconds["naive"] / seconds["fast"],
            "edit_s_per_edit_no_prefix_cache": seconds["no_prefix_cache"] / n,
            "prefix_cache_speedup": seconds["no_prefix_cache"] / seconds["fast"],
            "has_fast_path": has_fast_path, "mem_after_loading_mb": loaded_mb,
            "first_edit_cache_state_difference": cache_state_difference,
            "first_edit_naive_state_difference": naive_state_difference,
            "first_edit_naive_loss_difference": loss_difference,
            "edited_params_agree": cache_state_difference <= 1e-5 and loss_difference <= 1e-4}


def rows_agree(rows: list[dict], reference: list[dict]) -> bool:
    """Same scores; the LM head over fewer positions may move a perplexity in its last float bits."""
    return all(a.keys() == b.keys() and all(math.isclose(a[k], b[k], rel_tol=1e-5) for k in a)
               for a, b in zip(rows, reference)) and len(rows) == len(reference)


def time_evaluation(cfg, batch_size: int) -> dict:
    model, tok, _, dataset, _ = build(cfg, prefix_cache=True)
    fmt, metrics = cfg.dataset.format, cfg.dataset.metrics
    batched = Evaluator(tok, dataset.requests, fmt, metrics, batch_size)
    naive = Evaluator(tok, dataset.requests, fmt, metrics, 1)
    batched.record_unedited_locality(model)
    naive.record_unedited_locality(model)
    indices = range(len(dataset.requests))
    with naive_forward():
        t0 = time.perf_counter()
        rows_naive = [naive.score(model, [i])[0] for i in indices]
        t_naive = time.perf_counter() - t0
    t0 = time.perf_counter()
    rows = batched.score(model, indices)
    t_fast = time.perf_counter() - t0
    n = len(rows)
    return {"eval_req_per_s": n / t_fast, "eval_req_per_s_naive": n / t_naive, "eval_speedup": t_naive / t_fast,
            "eval_batch_size": batch_size, "eval_rows_agree": rows_agree(rows, rows_naive)}


def current_memory_mb(device: torch.device) -> float:
    """Memory in use now: the baseline (runtime + the three models) that editing adds to."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated() / 2**20
    return int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize() / 2**20


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kilobytes


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--method", default="wise")
    p.add_argument("--model", default="small")
    p.add_argument("--dataset", default="zsre")
    p.add_argument("--num-edits", type=int, default=20)
    p.add_argument("--eval-requests", type=int, default=500, help="requests scored in the evaluation timing")
    p.add_argument("--eval-batch-size", type=int, default=32)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("overrides", nargs="*", help="extra Hydra overrides, e.g. device=cuda model.dtype=bfloat16")
    args = p.parse_args(argv)

    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        common = [f"method={args.method}", f"model={args.model}", f"dataset={args.dataset}", *args.overrides]
        cfg = compose("config", [*common, f"num_edits={args.num_edits}"])
        eval_cfg = compose("config", [*common, f"num_edits={args.eval_requests}"])
    result = {"method": args.method, "model": args.model, "dataset": args.dataset, "num_edits": args.num_edits,
              "eval_requests": args.eval_requests,
              "device": str(pick_device(cfg.device)), "threads": torch.get_num_threads()}
    result.update(time_edits(cfg))
    result.update(time_evaluation(eval_cfg, args.eval_batch_size))
    result["peak_mem_mb"] = peak_memory_mb(pick_device(cfg.device))

    r = result
    rows = [("edit s/edit: fast", r["edit_s_per_edit"], r["edit_speedup"]),
            ("  without prefix cache", r["edit_s_per_edit_no_prefix_cache"], r["edit_s_per_edit_naive"] / r["edit_s_per_edit_no_prefix_cache"]),
            ("  naive", r["edit_s_per_edit_naive"], 1.0),
            ("eval requests/s: batched", r["eval_req_per_s"], r["eval_speedup"]),
            ("  one at a time, naive", r["eval_req_per_s_naive"], 1.0)]
    print(f"{'':<28}{'value':>10}{'vs naive':>10}")
    for label, value, ratio in rows:
        print(f"{label:<28}{value:>10.3f}{ratio:>9.2f}x")
    print(f"peak memory {result['peak_mem_mb']:.0f} MB ({result['mem_after_loading_mb']:.0f} MB after loading the models)")
    print(f"first edit agrees: {result['edited_params_agree']} (state with/without the prefix cache: max |diff| "
          f"{result['first_edit_cache_state_difference']:.1e}; loss against the naive forward: "
          f"{result['first_edit_naive_loss_difference']:.1e}); eval rows agree: {result['eval_rows_agree']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0 if result["edited_params_agree"] and result["eval_rows_agree"] else 1


if __name__ == "__main__":
    sys.exit(main())
