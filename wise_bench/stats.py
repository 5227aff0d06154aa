"""Second-moment statistics C = E[k kᵀ] of linear layers' inputs over a text corpus.

ROME whitens its key with C⁻¹, MEMIT regularises its update with λC and AlphaEdit projects onto
C's null space. C is expensive on a real model (the reference uses 100k Wikipedia texts), so it is
computed once, in one pass over the corpus for all the layers asked for, and cached on disk under
``stats_dir``, keyed by model, layer, corpus, sample count, truncation length and dtype.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from wise_bench.errors import UserError
from wise_bench.metrics import Encoded, TokenBatch, length_sorted_batches
from wise_bench.models import get_module, input_device, linear_weight

DEFAULT_STATS_DIR = "~/.cache/wise_bench/stats"
TRAIN_TEXTS = "train_texts"  # corpus name: the run's irrelevant texts (EditContext.train_texts)
WIKITEXT = "wikitext"  # corpus name: wikitext-103 train split via the `datasets` library (internet or HF cache)
BATCH_SIZE = 16


# --- corpus ----------------------------------------------------------------------------------------


def load_corpus(name: str, train_texts: Sequence[str] = ()) -> list[str]:
    """Non-empty, de-duplicated texts of a corpus, in a fixed order.

    ``name`` is ``train_texts``, ``wikitext`` or a local file: ``.txt`` (one text per line), or
    ``.json``/``.jsonl`` holding strings or records; a record gives its ``text`` field if it has one,
    else each of its top-level string fields (so a benchmark file such as ZsRE's train split works).
    """
    if name == TRAIN_TEXTS:
        texts: list[str] = list(train_texts)
        if not texts:
            raise UserError("mom2_dataset=train_texts but the dataset has no train_file texts; "
                            "set method.mom2_dataset to a local text file")
    elif name == WIKITEXT:
        texts = _wikitext()
    else:
        texts = _read_local(Path(name).expanduser())
    return list(dict.fromkeys(t.strip() for t in texts if t and t.strip()))


def _wikitext() -> list[str]:
    try:
        import datasets

        return list(datasets.load_dataset("wikitext", "wikitext-103-raw-v1", split="train")["text"])
    except Exception as e:  # offline without a cached copy, or no `datasets`
        raise UserError(f"mom2_dataset=wikitext could not be loaded ({type(e).__name__}: {e}); "
                        "use a local file or train_texts") from None


def _read_local(path: Path) -> list[str]:
    if not path.is_file():
        raise UserError(f"mom2_dataset: file not found: {path}")
    raw = path.read_text(encoding="utf-8")
    if path.suffix == ".txt":
        return raw.splitlines()
    try:
        items = [json.loads(line) for line in raw.splitlines() if line.strip()] if path.suffix == ".jsonl" else json.loads(raw)
    except json.JSONDecodeError as e:
        raise UserError(f"mom2_dataset {path}: invalid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(items, list):
        raise UserError(f"mom2_dataset {path}: expected a list of strings or records")
    texts: list[str] = []
    for item in items:
        if isinstance(item, str):
            texts.append(item)
        elif isinstance(item, dict):
            text = item.get("text")
            texts += [text] if isinstance(text, str) else [v for v in item.values() if isinstance(v, str)]
    return texts


# --- cache key -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StatsKey:
    model: str  # name or path, plus a fingerprint of the weights (a retrained model gets new stats)
    layer: str
    corpus: str
    n_samples: int  # texts used (the corpus may hold fewer than asked for)
    max_length: int  # tokens per text
    dtype: str
    digest: str  # of the texts used and the weight fingerprint

    def path(self, stats_dir: str | Path) -> Path:
        name = (f"{_slug(self.layer)}__{_slug(Path(self.corpus).name)}__n{self.n_samples}"
                f"__len{self.max_length}__{self.dtype}__{self.digest}.pt")
        return Path(stats_dir).expanduser() / _slug(self.model) / name


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_")[-80:] or "model"


def model_fingerprint(model: nn.Module) -> str:
    """Hash of the first values of every parameter: cheap, and differs between seeds or retrainings."""
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        h.update(name.encode())
        h.update(p.detach().reshape(-1)[:64].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def stats_key(model: nn.Module, layer: str, corpus: str, texts: Sequence[str], max_length: int, dtype: torch.dtype) -> StatsKey:
    name = getattr(model.config, "_name_or_path", "") or f"random-{model.config.model_type}"
    h = hashlib.sha256(model_fingerprint(model).encode())
    for t in texts:
        h.update(t.encode())
        h.update(b"\0")
    return StatsKey(name, layer, corpus, len(texts), max_length, str(dtype).removeprefix("torch."), h.hexdigest()[:12])


# --- computation -----------------------------------------------------------------------------------


@torch.no_grad()
def collect_second_moments(
    model: nn.Module, tokenizer, layers: Sequence[str], texts: Sequence[str], max_length: int, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """E[k kᵀ] over every non-padding token of ``texts`` of each layer's input k, in one pass; each
    on the device of its layer's input."""
    device = input_device(model)
    sums: dict[str, torch.Tensor] = {}
    count = 0
    mask: torch.Tensor | None = None

    def hook(layer: str):
        def accumulate(_module, inputs):
            k = inputs[0][mask.to(inputs[0].device)].to(dtype)  # [tokens, d_in], padding dropped
            if layer not in sums:
                sums[layer] = torch.zeros(k.shape[-1], k.shape[-1], dtype=dtype, device=k.device)
            sums[layer].addmm_(k.T, k)
        return accumulate

    encoded = [Encoded(tuple(ids), ()) for ids in tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]]
    handles = [get_module(model, layer).register_forward_pre_hook(hook(layer)) for layer in layers]
    try:
        for idx in tqdm(length_sorted_batches([len(e.ids) for e in encoded], BATCH_SIZE), desc="second moments", unit="batch"):
            batch = TokenBatch.build([encoded[i] for i in idx], tokenizer.pad_token_id, device)
            mask = batch.attention_mask.bool()
            count += int(mask.sum())
            batch.last_logits(model)  # run for the hooks; the LM head on one position only
    finally:
        for h in handles:
            h.remove()
    return {layer: sums[layer] / count for layer in layers}


def second_moments(
    model: nn.Module,
    tokenizer,
    layers: Sequence[str],
    corpus: str,
    train_texts: Sequence[str] = (),
    n_samples: int = 100_000,
    dtype: torch.dtype = torch.float32,
    stats_dir: str | Path = DEFAULT_STATS_DIR,
    max_length: int = 256,
) -> dict[str, torch.Tensor]:
    """C for each layer on the device of its input: read from the cache, or computed (one pass) and cached.

    Must run on the unedited model: the inputs of a layer depend on the layers below it.
    """
    texts = load_corpus(corpus, train_texts)[:n_samples]
    keys = {layer: stats_key(model, layer, corpus, texts, max_length, dtype) for layer in layers}
    cached = {layer: k.path(stats_dir) for layer, k in keys.items() if k.path(stats_dir).is_file()}
    out = {layer: torch.load(path, map_location=linear_weight(get_module(model, layer)).device, weights_only=True)["mom2"]
           for layer, path in cached.items()}
    missing = [layer for layer in layers if layer not in out]
    if missing:
        for layer, mom2 in collect_second_moments(model, tokenizer, missing, texts, max_length, dtype).items():
            _save(keys[layer], mom2, stats_dir)
            out[layer] = mom2
    return out


def _save(key: StatsKey, mom2: torch.Tensor, stats_dir: str | Path) -> None:
    path = key.path(stats_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save({"mom2": mom2.cpu(), "key": asdict(key)}, tmp)
    os.replace(tmp, path)  # atomic: a concurrent run never reads half a file
