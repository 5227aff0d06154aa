"""7B-scale speed and memory of every method on one GPU, without weights (docs/performance.md,
"7B on one GPU: scripts/gpu_check.py and the memory model").

    python scripts/gpu_check.py --out gpu_check.json              # one GPU, bf16, ≤ 8 min on an H200
    python scripts/gpu_check.py --smoke --out smoke.json          # CPU, scaled-down shapes, ~1 min
    python scripts/gpu_check.py --predict 1000                    # the memory model's table at T=1000

For each of LLaMA-2-7B, Mistral-7B and LLaMA-3-8B it builds the real shape (hidden, MLP width,
layers, heads, key/value heads, vocabulary) on the meta device, materialises it on the device and
fills it with seeded random values (normal, std = initializer_range; norms 1). The tokenizer is the
committed default model's (``model=small``, 8,192 subwords): its ids are below every real
vocabulary, so they index the real-size embedding as they are. Requests are the first records of
the real ZsRE files (``$WISE_BENCH_DATA_DIR``, else ../shared/data, else <repo>/data).

Per model × method it runs ``--edits`` (20) sequential edits with the method's config for that model
(conf/method/<m>.yaml, edit layers from conf/model/<model>.yaml), UltraEdit one turn of
``--turn`` (100) requests; AlphaEdit's second moments come from the run's train texts and are cached
under ``--stats-dir``. Then, on the edited model, it scores ``--eval-requests`` (500) requests
teacher-forced and generates answers for ``--generation-requests`` (100; requests/s is a rate).
It prints and writes: s/edit (median over edits), eval and generation requests/s, peak memory
(``torch.cuda.max_memory_allocated``, reset per method, weights included; null on CPU) and
beside it the memory model's prediction (wise_bench/memory_model.py) and their ratio. The JSON is
rewritten after every method, so a run cut short keeps what it measured; ``--budget-s`` skips the
methods that would start after that many seconds.

``--smoke`` runs the same code on a CPU in fp32: 4 layers, hidden 64, the MLP width, key/value heads
and vocabulary in the real proportions (the real vocabulary), edit layer indices mapped
proportionally into the 4 layers, 2 edits of 3 optimisation steps, a turn of 4, 8 evaluation and 4
generation requests.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig

from wise_bench import memory_model
from wise_bench.config import REPO_ROOT, register_configs
from wise_bench.data import load_dataset
from wise_bench.errors import UserError
from wise_bench.generation import GenerationEvaluator, greedy_answers
from wise_bench.loop import method_config
from wise_bench.methods import EditContext
from wise_bench.methods.side_memory import prefix_token_bound
from wise_bench.metrics import Evaluator, encode_pair, length_sorted_batches
from wise_bench.models import load_tokenizer
from wise_bench.stats import TRAIN_TEXTS

MODELS = ("llama-2-7b", "mistral-7b", "llama-3-8b-instruct")
# AlphaEdit last: its fp64 eigendecompositions of d_ff x d_ff statistics are the slowest step, and
# --budget-s only skips methods that have not started.
METHODS = ("wise", "grace", "ft_m", "memoir", "ultraedit", "alphaedit")
TOKENIZER_MODEL = "small"

# The published config.json of each checkpoint (hub ids in conf/model/<name>.yaml).
REAL_SHAPES: dict[str, dict[str, Any]] = {
    "llama-2-7b": dict(kind="llama", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32, vocab_size=32000,
                       max_position_embeddings=4096, rope_theta=10000.0),
    "mistral-7b": dict(kind="mistral", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, vocab_size=32000,
                       max_position_embeddings=32768, rope_theta=10000.0, sliding_window=4096),
    "llama-3-8b-instruct": dict(kind="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                                max_position_embeddings=8192, rope_theta=500000.0),
}
SMOKE_LAYERS, SMOKE_HIDDEN, SMOKE_HEADS = 4, 64, 4
SMOKE_STEPS = {"wise": "n_iter", "memoir": "n_iter", "grace": "n_iter", "ft_m": "steps", "alphaedit": "v_steps"}


# --- shapes and models ------------------------------------------------------------------------------


def model_shape(name: str, smoke: bool) -> dict[str, Any]:
    """The real shape, or in smoke mode the same proportions at 4 layers and hidden 64."""
    shape = dict(REAL_SHAPES[name])
    if smoke:
        real_h, real_heads = shape["hidden_size"], shape["num_attention_heads"]
        shape.update(hidden_size=SMOKE_HIDDEN, num_hidden_layers=SMOKE_LAYERS, num_attention_heads=SMOKE_HEADS,
                     intermediate_size=round(shape["intermediate_size"] * SMOKE_HIDDEN / real_h),
                     num_key_value_heads=max(1, shape["num_key_value_heads"] * SMOKE_HEADS // real_heads))
    return shape


def transformers_config(shape: dict[str, Any], tokenizer) -> LlamaConfig | MistralConfig:
    fields = {k: v for k, v in shape.items() if k not in ("kind", "rope_theta")}
    cls = MistralConfig if shape["kind"] == "mistral" else LlamaConfig
    return cls(**fields, rope_parameters={"rope_type": "default", "rope_theta": shape["rope_theta"]},
               rms_norm_eps=1e-5, hidden_act="silu", tie_word_embeddings=False, pad_token_id=tokenizer.pad_token_id,
               bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)


@torch.no_grad()
def build_model(config, dtype: torch.dtype, device: torch.device, seed: int) -> torch.nn.Module:
    """The model without weights on the meta device, materialised on ``device`` and filled from ``seed``:
    matrices normal(0, initializer_range), norm vectors 1; the rotary tables recomputed (buffers that
    ``to_empty`` leaves uninitialised)."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.to_empty(device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    for p in model.parameters():
        if p.dim() == 1:
            p.fill_(1.0)
        else:
            p.normal_(0.0, config.initializer_range, generator=generator)
    rotary = model.model.rotary_emb
    model.model.rotary_emb = type(rotary)(config=config).to(device)
    model.eval()
    model.requires_grad_(False)
    return model


def parameter_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def remap_layer(path: str, real_layers: int, layers: int) -> str:
    """``model.layers[27]...`` of a 32-layer model -> the proportional block of a ``layers``-layer one."""
    index = memory_model.layer_index(path)
    return path.replace(f"layers[{index}]", f"layers[{index * layers // real_layers}]")


def smoke_edit_layers(edit_layers: dict, real_layers: int) -> dict:
    out = {}
    for family, paths in edit_layers.items():
        if isinstance(paths, str):
            out[family] = remap_layer(paths, real_layers, SMOKE_LAYERS)
        else:  # several layers: proportional indices collapse, so keep each module once
            out[family] = list(dict.fromkeys(remap_layer(p, real_layers, SMOKE_LAYERS) for p in paths))
    return out


# --- configs ----------------------------------------------------------------------------------------


def composed(overrides: list[str]) -> Any:
    """conf/config.yaml with ``overrides``, as ``python -m wise_bench`` composes it."""
    with initialize_config_dir(config_dir=str(REPO_ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides)


def check_tokenizer(args):
    """The tokenizer every shape is run with (the default model's: no checkpoint tokenizer offline)."""
    return load_tokenizer(composed([f"model={TOKENIZER_MODEL}", f"data_dir={args.data_dir}"]).model)


def run_config(model_name: str, method: str, args) -> Any:
    """conf/config.yaml with model=<model_name> method=<method> dataset=zsre, as a run composes it,
    plus this check's settings (smoke: remapped layers, fewer steps, MEMOIR's top_k scaled)."""
    cfg = composed([f"model={model_name}", f"method={method}", "dataset=zsre", f"data_dir={args.data_dir}", f"seed={args.seed}"])
    if method == "alphaedit":
        cfg.method.mom2_dataset = TRAIN_TEXTS
        cfg.method.stats_dir = str(args.stats_dir)
    if args.smoke:
        real = model_shape(model_name, smoke=False)
        cfg.model.edit_layers = smoke_edit_layers(OmegaConf.to_container(cfg.model.edit_layers), real["num_hidden_layers"])
        if method in SMOKE_STEPS:
            cfg.method[SMOKE_STEPS[method]] = 3
        if method == "memoir":
            width = model_shape(model_name, smoke=True)["intermediate_size"]
            cfg.method.top_k = max(1, cfg.method.top_k * width // real["intermediate_size"])
    return cfg


# --- batch shapes for the memory model -------------------------------------------------------------


def encoded_lengths(tok, requests) -> tuple[list[int], list[int]]:
    """Token count and target-token count of each request's ``prompt + " " + target``."""
    pairs = [encode_pair(tok, r.prompt, r.target_new) for r in requests]
    return [len(e.ids) for e in pairs], [len(e.target_pos) for e in pairs]


def edit_batch(method: str, mcfg, tok, requests, train_texts) -> tuple[memory_model.Batch, int]:
    """The largest optimisation batch of ``method`` on ``requests`` (rows, padded width, targets),
    and the target tokens of a whole turn (UltraEdit)."""
    lengths, targets = encoded_lengths(tok, requests)
    longest, most = max(lengths), max(targets)
    if method in ("wise", "memoir"):
        rows = 1 + mcfg.context_templates
        width = longest + prefix_token_bound(mcfg, tok)
        if method == "wise":
            width = max(width, max(len(tok(t)["input_ids"]) for t in train_texts))
        return memory_model.Batch(rows + (method == "wise"), width, rows * most), 0
    if method == "alphaedit":
        rows = mcfg.context_templates + 1
        return memory_model.Batch(rows, longest + mcfg.context_template_length + 2, rows * most), 0
    if method == "ultraedit":
        return memory_model.Batch(mcfg.micro_batch, longest, mcfg.micro_batch * most), sum(targets)
    return memory_model.Batch(1, longest, most), 0


def largest_batch(lengths: list[int], targets: list[int], batch_size: int, max_tokens: int,
                  extra: int = 0) -> memory_model.Batch:
    """The batches ``length_sorted_batches`` cuts (as the evaluator and generation do): the rows and
    padded width of the one with the most tokens, and the most target tokens any batch holds."""
    batches = length_sorted_batches([n + extra for n in lengths], batch_size, max_tokens)
    widest = max(batches, key=lambda b: len(b) * max(lengths[i] for i in b))
    return memory_model.Batch(len(widest), max(lengths[i] for i in widest),
                              max(sum(targets[i] for i in b) for b in batches))


def eval_batch(evaluator: Evaluator, batch_size: int, max_tokens: int) -> memory_model.Batch:
    encoded = [e for items in evaluator.items for _, e in items]
    return largest_batch([len(e.ids) for e in encoded], [len(e.target_pos) for e in encoded], batch_size, max_tokens)


def generation_batch(queries: GenerationEvaluator, batch_size: int, max_tokens: int) -> tuple[memory_model.Batch, int]:
    lengths = [len(q.ids) for q in queries.queries]
    batch = largest_batch(lengths, [0] * len(lengths), batch_size, max_tokens, queries.max_new_tokens)
    return batch, queries.max_new_tokens


# --- measuring --------------------------------------------------------------------------------------


def synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device: torch.device, fn, *fn_args):
    synchronise(device)
    t0 = time.perf_counter()
    out = fn(*fn_args)
    synchronise(device)
    return time.perf_counter() - t0, out


@dataclass
class Workload:
    """What every method of one model is measured on."""

    tok: Any
    requests: list
    train_texts: list
    evaluator: Evaluator
    queries: GenerationEvaluator
    eval_shape: memory_model.Batch
    generation_shape: tuple[memory_model.Batch, int]


def check_method(model, config, model_name: str, method: str, work: Workload, args, device, dtype) -> dict[str, Any]:
    cfg = run_config(model_name, method, args)
    cls, mcfg = method_config(cfg)
    turn = method == "ultraedit"
    steps = [work.requests[:args.turn]] if turn else [[r] for r in work.requests[:args.edits]]
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    method_obj = None
    try:
        init_s, method_obj = timed(device, cls, mcfg, model, EditContext(work.tok, work.train_texts, device, args.seed))
        step_s = [timed(device, method_obj.edit, step)[0] for step in steps]
        eval_s, _ = timed(device, work.evaluator.score, model, range(args.eval_requests))
        prompts = [q.ids for q in work.queries.queries]
        gen_s, _ = timed(device, lambda: greedy_answers(model, work.tok, prompts, work.queries.max_new_tokens,
                                                        work.queries.stop_strings, cfg.eval.batch_size,
                                                        cfg.eval.max_batch_tokens))
        peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    finally:
        if method_obj is not None:
            method_obj.restore()
        del method_obj
    requests_per_step = len(steps[0])
    batch, turn_targets = edit_batch(method, mcfg, work.tok, [r for s in steps for r in s], work.train_texts)
    prediction = memory_model.predict(config, dtype, method, mcfg, len(steps) * requests_per_step, batch,
                                      work.eval_shape, work.generation_shape, turn_targets)
    predicted = prediction.peak
    layers = list(mcfg.layers) if "layers" in mcfg else [mcfg.layer]
    return {"layers": layers, "requests_per_step": requests_per_step, "edit_steps": len(steps),
            "init_s": init_s, "s_per_step_median": statistics.median(step_s),
            "s_per_edit_median": statistics.median(step_s) / requests_per_step, "edit_s_total": sum(step_s),
            "eval_requests": args.eval_requests, "eval_req_per_s": args.eval_requests / eval_s,
            "generation_requests": args.generation_requests, "generation_prompts": len(prompts),
            "generation_req_per_s": args.generation_requests / gen_s,
            "peak_bytes": peak, "predicted_peak_bytes": predicted,
            "peak_over_predicted": None if peak is None else peak / predicted,
            "prediction": prediction.as_dict()}


def workload(tok, cfg, args) -> Workload:
    n = max(args.edits, args.turn, args.eval_requests, args.generation_requests)
    dataset = load_dataset(cfg.dataset, args.data_dir, n)
    requests = dataset.requests
    evaluator = Evaluator(tok, requests[:args.eval_requests], cfg.dataset.format, cfg.dataset.metrics,
                          cfg.eval.batch_size, cfg.eval.max_batch_tokens)
    queries = GenerationEvaluator(tok, requests[:args.generation_requests], cfg.dataset.metrics, cfg.eval)
    return Workload(tok, requests, dataset.train_texts, evaluator, queries,
                    eval_batch(evaluator, cfg.eval.batch_size, cfg.eval.max_batch_tokens),
                    generation_batch(queries, cfg.eval.batch_size, cfg.eval.max_batch_tokens))


def check(args) -> dict[str, Any]:
    register_configs()
    device = torch.device("cpu" if args.smoke else args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("no CUDA device: run on a GPU, or use --smoke on the CPU")
    dtype = torch.float32 if args.smoke else getattr(torch, args.dtype)
    started = time.perf_counter()
    tok = check_tokenizer(args)
    result: dict[str, Any] = {
        "device": str(device), "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "smoke": args.smoke, "dtype": str(dtype).removeprefix("torch."), "seed": args.seed,
        "tokenizer": f"model={TOKENIZER_MODEL} ({len(tok)} tokens; ids used as they are, below every real vocabulary)",
        "edits": args.edits, "turn": args.turn, "eval_requests": args.eval_requests,
        "generation_requests": args.generation_requests, "models": {}, "skipped": []}
    for model_name in args.models:
        shape = model_shape(model_name, args.smoke)
        config = transformers_config(shape, tok)
        t_build, model = timed(device, build_model, config, dtype, device, args.seed)
        work = workload(tok, run_config(model_name, args.methods[0], args), args)
        t_locality, _ = timed(device, work.evaluator.record_unedited_locality, model)
        measured = parameter_bytes(model)
        entry = result["models"][model_name] = {
            "shape": shape, "build_s": t_build, "unedited_locality_s": t_locality,
            "weights_bytes_measured": measured,
            "weights_bytes_predicted": memory_model.weights_bytes(memory_model.ModelShape.of(config), dtype),
            "methods": {}}
        for method in args.methods:
            if time.perf_counter() - started > args.budget_s:
                result["skipped"].append(f"{model_name}/{method}")
                continue
            row = check_method(model, config, model_name, method, work, args, device, dtype)
            entry["methods"][method] = row
            print_row(model_name, method, row)
            write(result, args.out, started)
        del model, work
        gc.collect()
    write(result, args.out, started)
    return result


def write(result: dict, out: Path, started: float) -> None:
    result["elapsed_s"] = time.perf_counter() - started
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")


def print_row(model_name: str, method: str, r: dict) -> None:
    peak = "    n/a" if r["peak_bytes"] is None else f"{memory_model.gib(r['peak_bytes']):7.2f}"
    ratio = "  n/a" if r["peak_over_predicted"] is None else f"{r['peak_over_predicted']:5.2f}"
    print(f"{model_name:<20}{method:<10}{r['s_per_edit_median']:>9.3f} s/edit{r['eval_req_per_s']:>9.1f} req/s"
          f"{r['generation_req_per_s']:>8.1f} gen/s  peak {peak} GiB  predicted "
          f"{memory_model.gib(r['predicted_peak_bytes']):7.2f} GiB  ratio {ratio}", flush=True)


# --- the memory model's table (no model is built) ----------------------------------------------------


def predictions_table(T: int, args) -> list[dict[str, Any]]:
    """Predicted peak per model × method at T edits, bf16, with this check's batch shapes."""
    register_configs()
    tok = check_tokenizer(args)
    rows = []
    for model_name in args.models:
        config = transformers_config(model_shape(model_name, smoke=False), tok)
        work = workload(tok, run_config(model_name, args.methods[0], args), args)
        for method in args.methods:
            _, mcfg = method_config(run_config(model_name, method, args))
            step = work.requests[:args.turn] if method == "ultraedit" else work.requests[:args.edits]
            batch, turn_targets = edit_batch(method, mcfg, tok, step, work.train_texts)
            p = memory_model.predict(config, args.dtype, method, mcfg, T, batch, work.eval_shape, work.generation_shape,
                                     turn_targets)
            rows.append({"model": model_name, "method": method, "T": T, "peak_gib": memory_model.gib(p.peak),
                         "weights_gib": memory_model.gib(p.weights), "state_gib": memory_model.gib(p.state),
                         "phases_gib": {k: memory_model.gib(v) for k, v in p.phases().items()},
                         "fits": {f"{card}GB": memory_model.fits(p, card * 1e9 / 2**30) for card in (24, 40, 80)}})
    return rows


def print_table(rows: list[dict]) -> None:
    print("| model | method | peak GiB | weights | state | largest transient (phase) | 24 GB | 40 GB | 80 GB |\n"
          "|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        phase, transient = max(r["phases_gib"].items(), key=lambda kv: kv[1])
        marks = " | ".join("yes" if r["fits"][c] else "no" for c in ("24GB", "40GB", "80GB"))
        print(f"| {r['model']} | {r['method']} | {r['peak_gib']:.2f} | {r['weights_gib']:.2f} | {r['state_gib']:.2f} | "
              f"{transient:.2f} ({phase}) | {marks} |")


# --- command line ---------------------------------------------------------------------------------


def default_data_dir() -> Path:
    env = os.environ.get("WISE_BENCH_DATA_DIR")
    if env:
        return Path(env)
    shared = REPO_ROOT.parent / "shared" / "data"
    return shared if (shared / "zsre").is_dir() else REPO_ROOT / "data"


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("gpu_check.json"), help="JSON figures (rewritten after every method)")
    p.add_argument("--smoke", action="store_true", help="CPU, fp32, scaled-down shapes, few edits (the test's mode)")
    p.add_argument("--predict", type=int, metavar="T", help="print the memory model's table at T edits and exit")
    p.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--edits", type=int, help="sequential edits per method (default 20; smoke 2)")
    p.add_argument("--turn", type=int, help="UltraEdit's requests in its one turn (default 100; smoke 4)")
    p.add_argument("--eval-requests", type=int, help="requests scored teacher-forced (default 500; smoke 8)")
    p.add_argument("--generation-requests", type=int, help="requests answered by generation (default 100; smoke 4)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--data-dir", type=Path, default=default_data_dir())
    p.add_argument("--stats-dir", type=Path, default=REPO_ROOT / "outputs" / "gpu_check" / "stats",
                   help="AlphaEdit's cached second moments")
    p.add_argument("--budget-s", type=float, default=450.0, help="start no method after this many seconds")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    defaults = {"edits": (20, 2), "turn": (100, 4), "eval_requests": (500, 8), "generation_requests": (100, 4)}
    for key, (full, smoke) in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, smoke if args.smoke else full)
        if getattr(args, key) < 1:
            p.error(f"--{key.replace('_', '-')} must be >= 1")
    return args


def main(argv: Optional[list[str]] = None) -> None:
    args = parse_args(argv)
    try:
        if args.predict is not None:
            print_table(predictions_table(args.predict, args))
            return
        check(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
