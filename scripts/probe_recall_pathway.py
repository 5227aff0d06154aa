#!/usr/bin/env python
"""Where in a model can one position's hidden state move the answer? (docs/small_model.md)

For each request of a tuning split and each decoder layer, a free vector δ is added to the layer's
output at one position (by default the subject's last token, or the prompt's last token; `--positions`
also offers the other places the reference ROME's `fact_token` can put the key) and optimised with
Adam to make the model produce the new target. The table gives the mean target NLL before and after
and the teacher-forced token accuracy after. Locate-then-edit methods (ROME, MEMIT, AlphaEdit) write
exactly such a δ at the subject's last token, so if even a free δ there cannot move the answer, no
setting of theirs can.

    python scripts/probe_recall_pathway.py --model models/small --records 12
    python scripts/probe_recall_pathway.py --dataset counterfact --layers 0 1 2
    python scripts/probe_recall_pathway.py --layers 0 1 2 \
        --positions subject_first subject_last all_subject after_subject prompt_last
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from wise_bench.config import REPO_ROOT
from wise_bench.download import default_data_dir

# the tuning splits' files (their first records are never evaluated): path, prompt field, new-target field
TUNING_SPLITS = {"zsre": ("zsre/zsre_mend_train-1k.json", "src", "alt"),
                 "counterfact": ("counterfact/counterfact-train.json", "prompt", "target_new")}


def probe(model, tok, prompt: str, target: str, layer: int, pos: int | list[int], steps: int, lr: float) -> tuple[float, float, float]:
    """(NLL before, NLL after, token accuracy after) of ``target`` with one δ at (``layer``, ``pos``)
    (``pos`` a list: the same δ at each of those positions)."""
    p_ids = tok(prompt)["input_ids"]
    t_ids = tok(" " + target, add_special_tokens=False)["input_ids"]
    ids, gold = torch.tensor([p_ids + t_ids]), torch.tensor(t_ids)
    delta = torch.zeros(model.config.hidden_size, requires_grad=True)

    def add_delta(_module, _args, out):
        hidden = out[0] if isinstance(out, tuple) else out
        hidden = hidden.clone()
        hidden[0, pos] += delta
        return (hidden, *out[1:]) if isinstance(out, tuple) else hidden

    def target_logits():
        return model(ids).logits[0, len(p_ids) - 1:-1]

    handle = model.model.layers[layer].register_forward_hook(add_delta)
    try:
        opt = torch.optim.Adam([delta], lr=lr)
        for step in range(steps):
            nll = F.cross_entropy(target_logits(), gold)
            if step == 0:
                before = nll.item()
            opt.zero_grad()
            nll.backward()
            opt.step()
        with torch.no_grad():
            logits = target_logits()
            return before, F.cross_entropy(logits, gold).item(), (logits.argmax(-1) == gold).float().mean().item()
    finally:
        handle.remove()


def subject_positions(tok, prompt: str, subject: str) -> dict[str, int | list[int]]:
    """Token positions in ``prompt`` where a key can sit, by name (a subject token is one that holds a
    character of the subject, by the tokenizer's character offsets)."""
    spans = tok(prompt, return_offsets_mapping=True)["offset_mapping"]
    start = prompt.index(subject)

    def holding(char: int) -> int:
        return next(i for i, (a, b) in enumerate(spans) if a <= char < b)

    first, last = holding(start), holding(start + len(subject) - 1)
    return {"subject_first": first, "subject_last": last, "all_subject": list(range(first, last + 1)),
            "after_subject": last + 1, "prompt_last": len(spans) - 1}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(REPO_ROOT / "models" / "small"),
                   help="a local model directory (default: <repo>/models/small)")
    p.add_argument("--data-dir", type=Path, default=default_data_dir(),
                   help="the benchmark data (default, as the app: $WISE_BENCH_DATA_DIR, else <repo>/data)")
    p.add_argument("--records", type=int, default=12, help="first N records of the tuning split")
    p.add_argument("--dataset", choices=list(TUNING_SPLITS), default="zsre", help="which tuning split")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--lr", type=float, default=0.5)
    p.add_argument("--layers", type=int, nargs="+", help="decoder layers to probe (default: all)")
    p.add_argument("--positions", nargs="+", default=["subject_last", "prompt_last"],
                   choices=["subject_first", "subject_last", "all_subject", "after_subject", "prompt_last"])
    args = p.parse_args(argv)
    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval().requires_grad_(False)
    path, prompt_key, target_key = TUNING_SPLITS[args.dataset]
    with open(args.data_dir / path, encoding="utf-8") as f:
        records = [r for r in json.load(f)[:args.records] if r["subject"] in r[prompt_key]]
    rows = {}
    for r in records:
        prompt, target = r[prompt_key], r[target_key]
        positions = subject_positions(tok, prompt, r["subject"])
        for layer in args.layers or range(model.config.num_hidden_layers):
            for where in args.positions:
                rows.setdefault((layer, where), []).append(probe(model, tok, prompt, target, layer, positions[where], args.steps, args.lr))
    print(f"{len(records)} {args.dataset} requests, {args.steps} Adam steps (lr {args.lr}), δ unconstrained")
    print("| layer | δ at | target NLL before | after | token accuracy after |\n|---|---|---|---|---|")
    for (layer, where), vals in sorted(rows.items()):
        before, after, acc = (sum(v[i] for v in vals) / len(vals) for i in range(3))
        print(f"| {layer} | {where} | {before:.2f} | {after:.2f} | {acc:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
