"""Edit and evaluation speed and peak memory of a method, against naive references in the same run.

    python scripts/bench.py method=wise num_edits=20 out=bench.json   # model=small, dataset=zsre

A Hydra app (conf/bench.yaml): every key of the run's config applies (``device=cuda``,
``model.dtype=bfloat16``, ``eval.batch_size``, ...), plus ``out`` (default: the run directory's
bench.json), ``eval_requests`` and ``threads``. A deeper random model, edited at 3/4 depth:

    python scripts/bench.py method=wise model=tiny_random model.random_init.num_hidden_layers=16 \\
        model.random_init.hidden_size=256 model.random_init.intermediate_size=704 \\
        'model.edit_layers.wise="model.layers[12].mlp.down_proj"' num_edits=3 out=bench_deep.json

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
- Generation (the generation protocol, docs/evaluation.md): requests per second of greedy answers
  to every prompt of a request (edit, paraphrase, locality, portability), in length-sorted
  left-padded batches against one prompt at a time, both with the KV cache; the answers must agree.
- Methods compared (``compare=[wise,memoir,ultraedit]``): seconds per edit of each method, with its
  fast paths, on the same requests (``compare_batch.<method>``, default 1, requests per edit step:
  UltraEdit's turn is 100), and each one's edits per second against the first's.
- Memory: peak RSS on CPU, ``torch.cuda.max_memory_allocated`` on GPU, and what is in use after
  loading the models.
"""
from __future__ import annotations

import json
import logging
import math
import resource
import sys
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from unittest import mock

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from wise_bench.config import register_configs
from wise_bench.data import load_dataset
from wise_bench.errors import UserError
from wise_bench.generation import GenerationEvaluator, greedy_answers
from wise_bench.loop import method_config
from wise_bench.methods import EditContext
from wise_bench.metrics import Evaluator, TokenBatch
from wise_bench.models import input_device, load_model, load_tokenizer, pick_device
from wise_bench.prefix_cache import tensors_in

log = logging.getLogger("bench")
register_configs()


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


def build(cfg, prefix_cache: bool, num_edits: int):
    """A fresh model and method on the first ``num_edits`` requests; ``prefix_cache`` switches the
    method's prefix cache when it has one."""
    cls, method_cfg = method_config(cfg)
    has_fast_path = "prefix_cache" in method_cfg
    if has_fast_path:
        method_cfg.prefix_cache = prefix_cache
    tok = load_tokenizer(cfg.model)
    torch.manual_seed(cfg.seed)
    model = load_model(cfg.model, len(tok), pick_device(cfg.device))
    device = input_device(model)
    dataset = load_dataset(cfg.dataset, cfg.data_dir, num_edits)
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
    built = {name: build(cfg, cache, cfg.num_edits) for name, (cache, _) in variants.items()}
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


def time_evaluation(cfg) -> dict:
    model, tok, _, dataset, _ = build(cfg, True, cfg.eval_requests)
    fmt, metrics = cfg.dataset.format, cfg.dataset.metrics
    batched = Evaluator(tok, dataset.requests, fmt, metrics, cfg.eval.batch_size, cfg.eval.max_batch_tokens)
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
            "eval_batch_size": cfg.eval.batch_size, "eval_rows_agree": rows_agree(rows, rows_naive)}


def time_generation(cfg) -> dict:
    model, tok, _, dataset, _ = build(cfg, True, cfg.eval_requests)
    queries = GenerationEvaluator(tok, dataset.requests, cfg.dataset.metrics, cfg.eval)
    prompts = [q.ids for q in queries.queries]
    settings = dict(max_new_tokens=queries.max_new_tokens, stop_strings=queries.stop_strings)
    t0 = time.perf_counter()
    alone = [greedy_answers(model, tok, [p], batch_size=1, **settings)[0] for p in prompts]
    t_alone = time.perf_counter() - t0
    t0 = time.perf_counter()
    batched = greedy_answers(model, tok, prompts, batch_size=cfg.eval.batch_size, max_batch_tokens=cfg.eval.max_batch_tokens,
                             **settings)
    t_batched = time.perf_counter() - t0
    n = len(dataset.requests)
    return {"generation_req_per_s": n / t_batched, "generation_req_per_s_one_at_a_time": n / t_alone,
            "generation_speedup": t_alone / t_batched, "generation_prompts": len(prompts),
            "generation_max_new_tokens": queries.max_new_tokens, "generation_answers_agree": batched == alone}


def compared_config(name: str) -> DictConfig:
    """This run's config (its command-line overrides kept) with ``method=<name>`` instead of its method."""
    overrides = [o for o in HydraConfig.get().overrides.task if not o.startswith("method")]
    return hydra.compose(config_name="bench", overrides=[*overrides, f"method={name}"])


def time_methods(cfg) -> dict:
    per_edit = {}
    for name in cfg.compare:
        model, _, method, dataset, _ = build(compared_config(name), True, cfg.num_edits)
        step = cfg.compare_batch.get(name, 1)
        requests = dataset.requests
        t0 = time.perf_counter()
        for begin in range(0, len(requests), step):
            method.edit(requests[begin:begin + step])
        per_edit[name] = (time.perf_counter() - t0) / len(requests), step
        del model, method
    first = per_edit[cfg.compare[0]][0]
    return {"compare": {name: {"s_per_edit": s, "requests_per_step": step, "edits_per_s_vs_first": first / s}
                        for name, (s, step) in per_edit.items()}}


def current_memory_mb(device: torch.device) -> float:
    """Memory in use now: the baseline (runtime + the three models) that editing adds to."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated() / 2**20
    return int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize() / 2**20


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kilobytes


def check_numbers(cfg) -> None:
    for key in ("num_edits", "eval_requests", "eval.batch_size", "eval.max_batch_tokens"):
        if OmegaConf.select(cfg, key) < 1:
            raise UserError(f"{key} must be >= 1")
    if cfg.threads is not None and cfg.threads < 1:
        raise UserError("threads must be >= 1 (or null: torch's default)")


def bench(cfg) -> dict:
    check_numbers(cfg)
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    device = pick_device(cfg.device)
    result = {"method": cfg.method.name, "model": cfg.model.name, "dataset": cfg.dataset.name,
              "num_edits": cfg.num_edits, "eval_requests": cfg.eval_requests,
              "device": str(device), "threads": torch.get_num_threads()}
    result.update(time_edits(cfg))
    result.update(time_evaluation(cfg))
    result.update(time_generation(cfg))
    if cfg.compare:
        result.update(time_methods(cfg))
    result["peak_mem_mb"] = peak_memory_mb(device)
    return result


def print_figures(r: dict) -> None:
    rows = [("edit s/edit: fast", r["edit_s_per_edit"], r["edit_speedup"]),
            ("  without prefix cache", r["edit_s_per_edit_no_prefix_cache"], r["edit_s_per_edit_naive"] / r["edit_s_per_edit_no_prefix_cache"]),
            ("  naive", r["edit_s_per_edit_naive"], 1.0),
            ("eval requests/s: batched", r["eval_req_per_s"], r["eval_speedup"]),
            ("  one at a time, naive", r["eval_req_per_s_naive"], 1.0),
            ("generation requests/s: batched", r["generation_req_per_s"], r["generation_speedup"]),
            ("  one at a time", r["generation_req_per_s_one_at_a_time"], 1.0)]
    print(f"{'':<32}{'value':>10}{'speedup':>10}")
    for label, value, ratio in rows:
        print(f"{label:<32}{value:>10.3f}{ratio:>9.2f}x")
    print(f"peak memory {r['peak_mem_mb']:.0f} MB ({r['mem_after_loading_mb']:.0f} MB after loading the models)")
    print(f"first edit agrees: {r['edited_params_agree']} (state with/without the prefix cache: max |diff| "
          f"{r['first_edit_cache_state_difference']:.1e}; loss against the naive forward: "
          f"{r['first_edit_naive_loss_difference']:.1e}); eval rows agree: {r['eval_rows_agree']}")
    for name, c in r.get("compare", {}).items():
        print(f"{name:<20}{c['s_per_edit']:>10.4f} s/edit ({c['requests_per_step']} per step)"
              f"{c['edits_per_s_vs_first']:>9.2f}x the edits/s of {next(iter(r['compare']))}")
    print(f"generation: {r['generation_prompts']} prompts, up to {r['generation_max_new_tokens']} new tokens; "
          f"batched answers equal one at a time: {r['generation_answers_agree']}")


@hydra.main(version_base="1.3", config_path="../conf", config_name="bench")
def main(cfg: DictConfig) -> None:
    try:
        result = bench(cfg)
    except UserError as e:
        log.error("%s", e)
        sys.exit(2)
    print_figures(result)
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    if not (result["edited_params_agree"] and result["eval_rows_agree"] and result["generation_answers_agree"]):
        sys.exit(1)


if __name__ == "__main__":
    main()
