"""Seconds per WISE edit with and without the prefix cache, on the same edits, and loss agreement.

Two identical random LLaMA models (same seed) are edited side by side, one with ``prefix_cache``
off and one on, alternating edit by edit so that load on a shared machine hits both alike. The
per-step loss trajectories must agree to --tol (fp32).

    python scripts/bench_wise_prefix.py                       # 16 layers, edited layer 12 (3/4 depth)
    python scripts/bench_wise_prefix.py --layers 32 --edit-layer 27 --hidden 512 --device cuda
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from wise_bench.config import ModelConfig, RandomInitConfig  # noqa: E402
from wise_bench.data import Request  # noqa: E402
from wise_bench.methods import METHODS, EditContext  # noqa: E402
from wise_bench.methods.wise import WiseConfig  # noqa: E402
from wise_bench.models import load_model, load_tokenizer  # noqa: E402

DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "zsre" / "zsre_mend_edit.json"
FALLBACK = [
    ("What is the native language of Danielle Darrieux?", "English", "nq question: who sang hey jude The Beatles"),
    ("Who founded Apple?", "Bill Gates", "nq question: capital of france Paris"),
    ("In which mountain range is Mount Everest located?", "the Alps", "nq question: largest ocean the Pacific Ocean"),
]


def requests(n: int) -> tuple[list[Request], list[str]]:
    if DATA.is_file():
        records = json.loads(DATA.read_text())[:n]
        triples = [(r["src"], r["alt"], f"{r['loc']} {r['loc_ans']}") for r in records]
    else:
        triples = (FALLBACK * n)[:n]
    reqs = [Request(prompt=p, target_new=t, loc_prompt="", loc_answer="", index=i) for i, (p, t, _) in enumerate(triples)]
    return reqs, [loc for _, _, loc in triples]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--edit-layer", type=int, default=12)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--edits", type=int, default=3)
    ap.add_argument("--n-iter", type=int, default=30)
    ap.add_argument("--templates", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (1 keeps timings steady on a shared machine)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--tol", type=float, default=1e-5)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    model_cfg = ModelConfig(name="bench", random_init=RandomInitConfig(
        hidden_size=args.hidden, intermediate_size=args.hidden * 11 // 4, num_hidden_layers=args.layers,
        num_attention_heads=max(1, args.hidden // 64)))
    tok = load_tokenizer(model_cfg)
    reqs, locs = requests(args.edits)
    layer = f"model.layers[{args.edit_layer}].mlp.down_proj"
    methods = {}
    for cached in (False, True):
        model = load_model(model_cfg, len(tok), device)  # same seed: identical weights
        cfg = OmegaConf.merge(OmegaConf.structured(WiseConfig), {
            "name": "wise", "layer": layer, "n_iter": args.n_iter, "context_templates": args.templates,
            "prefix_cache": cached, "early_stop_loss": -1.0})  # never stop early: equal work on both sides
        methods[cached] = METHODS["wise"](cfg, model, EditContext(tok, locs, device, 0))
        methods[cached].context_prefixes()  # generated outside the timing

    seconds = {False: 0.0, True: 0.0}
    worst = 0.0
    for r in reqs:
        losses = {}
        for cached, method in methods.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            method.edit([r])
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds[cached] += time.perf_counter() - t0
            losses[cached] = torch.tensor(method.losses, dtype=torch.float64)
        worst = max(worst, (losses[False] - losses[True]).abs().max().item())

    per_edit = {k: v / len(reqs) for k, v in seconds.items()}
    print(f"model: random LLaMA, {args.layers} layers, hidden {args.hidden}; edited {layer}; device {device}, "
          f"{args.threads} thread(s); {len(reqs)} edits x {args.n_iter} steps, {args.templates + 1} edit rows + 1 x_loc row")
    print(f"s/edit without prefix cache: {per_edit[False]:.3f}")
    print(f"s/edit with prefix cache:    {per_edit[True]:.3f}")
    print(f"speed-up: {per_edit[False] / per_edit[True]:.2f}x")
    print(f"max |loss difference| over all steps: {worst:.2e} ({'OK' if worst <= args.tol else 'FAIL'}, tol {args.tol:g})")
    for method in methods.values():
        method.restore()
    if worst > args.tol:
        sys.exit(1)


if __name__ == "__main__":
    main()
