"""What the side-memory editors (WISE, MEMOIR) share: one layer swapped for a wrapper that sees each
model call's attention mask, and the edit batch they train on (the prompt under generated context
templates, plus an irrelevant text), with its loss and early stop.

docs/wise.md describes the batch, the loss and the early stop as the WISE reference defines them;
MEMOIR's reference reuses them unchanged (../shared/spec/memoir.md, "Edit batch").
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List, Optional, Sequence

import torch
from omegaconf import MISSING
from torch import nn

from wise_bench.data import Request
from wise_bench.errors import UserError
from wise_bench.methods.base import Method
from wise_bench.metrics import Encoded, TokenBatch, encode_pair
from wise_bench.models import get_module, linear_weight, set_module


@dataclass
class TemplatedEditConfig:
    """Keys every side-memory editor has: its layer, the edit's optimisation and its context templates."""

    name: str = MISSING
    layer: str = MISSING
    edit_lr: float = 1.0
    n_iter: int = 70
    weight_decay: float = 1e-5
    early_stop_delta: float = 1e-4
    early_stop_loss: float = 0.02
    context_templates: int = 10  # generated prefixes; each edit trains on 1 + this many rows
    template_lengths: List[int] = field(default_factory=lambda: [5, 10])  # tokens generated, per seed round
    template_seeds: List[str] = field(default_factory=lambda: ["I", "You", "Because", "Yes", "Q: "])
    prefix_cache: bool = True  # replay the frozen computation below the layer across steps (exact)


def seeded(seed: int, stream: int, index: int) -> torch.Generator:
    """A CPU generator for one (stream, index) pair: the same draws on every device and after a reload."""
    return torch.Generator().manual_seed((seed * 1_000_003 + stream) * 1_000_003 + index)


# --- the wrapped layer ------------------------------------------------------------------------------


class MaskedCallHooks:
    """Hands ``layer.attention_mask`` the attention mask of each model call, and clears it after."""

    def __init__(self, model: nn.Module, layer: nn.Module):
        self.layer = layer
        self.handles = [
            model.register_forward_pre_hook(self._capture, with_kwargs=True),
            model.register_forward_hook(self._clear, always_call=True),
        ]

    def _capture(self, _module: nn.Module, args: tuple, kwargs: dict) -> None:
        self.layer.attention_mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)

    def _clear(self, *_: Any) -> None:
        self.layer.attention_mask = None

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []


def real_positions(attention_mask: Optional[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """[batch, seq] True at the real (non-pad) positions of the layer input ``x``."""
    if attention_mask is None:
        return torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
    # With a KV cache the mask also covers past positions; this call sees the last ones.
    # (.to: with device_map the mask lives on the first GPU, this layer maybe on another)
    return attention_mask[:, -x.shape[1]:].bool().to(x.device)


# --- the edit batch ------------------------------------------------------------------------------


def generate_prefixes(model: nn.Module, tok: Any, cfg: TemplatedEditConfig, device: torch.device) -> list[str]:
    """Greedy continuations of the seed words, one round per length, the first ``context_templates``."""
    texts: list[str] = []
    enc = tok(list(cfg.template_seeds), return_tensors="pt", padding=True, return_token_type_ids=False).to(device)
    for length in cfg.template_lengths:
        if len(texts) >= cfg.context_templates:
            break
        out = model.generate(**enc, max_new_tokens=length, do_sample=False, num_beams=1, pad_token_id=tok.pad_token_id)
        texts += tok.batch_decode(out, skip_special_tokens=True)
    return texts[: cfg.context_templates]


def prefix_token_bound(cfg: TemplatedEditConfig, tokenizer: Any) -> int:
    """Bound on a generated prefix: seed word + the longest continuation + the joining space (+ slack)."""
    if cfg.context_templates == 0:
        return 0
    seed = max(len(tokenizer(s, add_special_tokens=False)["input_ids"]) for s in cfg.template_seeds)
    return seed + max(cfg.template_lengths) + 3


def templated(prefix: Optional[str], prompt: str) -> str:
    # Plain concatenation, not str.format: generated text may contain braces.
    return prompt if prefix is None else f"{prefix} {prompt}"


@dataclass
class EditBatch:
    tokens: TokenBatch  # per request 1 + len(prefixes) edit rows, then one x_loc row per request
    n_edit_rows: int
    plain: list[list[int]]  # per request, token ids of prompt + " " + target


def build_edit_batch(tok: Any, requests: Sequence[Request], prefixes: Sequence[str], loc_texts: Sequence[str], device) -> EditBatch:
    """Rows and labels of the spec's edit batch; targets are located by character offsets."""
    rows = [
        encode_pair(tok, templated(prefix, r.prompt), r.target_new)
        for r in requests
        for prefix in [None, *prefixes]
    ]
    locs = [Encoded(tuple(tok(text)["input_ids"]), ()) for text in loc_texts]
    plain = [list(encode_pair(tok, r.prompt, r.target_new).ids) for r in requests]
    return EditBatch(TokenBatch.build(rows + locs, tok.pad_token_id, device), len(rows), plain)


def run_model(model: nn.Module, batch: TokenBatch) -> torch.Tensor:
    return model(
        input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids, use_cache=False
    ).logits


def edit_nll(batch: TokenBatch, target_logits: torch.Tensor) -> torch.Tensor:
    """Per row with targets: summed target NLL / (target tokens + 1); the mean over those rows.

    The +1 reproduces the reference, whose label span starts one position before the target.
    """
    logp, gold, rows = batch.target_logprobs(target_logits)
    nll = -logp.gather(-1, gold[:, None])[:, 0]
    n = batch.target_mask.sum(-1)
    per_row = torch.zeros(len(n), device=nll.device).index_add(0, rows, nll)
    has_target = n > 0
    return (per_row[has_target] / (n[has_target] + 1)).mean()


def should_stop(losses: Sequence[float], delta: float, ceiling: float) -> bool:
    """The reference's early stop: the last two step losses differ by <= delta and the last is <= ceiling."""
    return len(losses) >= 2 and abs(losses[-1] - losses[-2]) <= delta and losses[-1] <= ceiling


# --- the method skeleton ------------------------------------------------------------------------


class SideMemoryEditor(Method):
    """A method whose memory lives in a wrapper swapped in for one linear layer at the first edit.

    The wrapper keeps the original module as ``.base`` and gets each model call's attention mask;
    ``restore`` swaps the original back. Subclasses build the wrapper (``make_layer``) and edit.
    """

    @staticmethod
    def module_paths(cfg: TemplatedEditConfig) -> list[str]:
        return [cfg.layer]

    @staticmethod
    def prefix_tokens(cfg: TemplatedEditConfig, tokenizer: Any) -> int:
        return prefix_token_bound(cfg, tokenizer)

    def __init__(self, cfg: TemplatedEditConfig, model: nn.Module, ctx):
        super().__init__(cfg, model, ctx)
        if cfg.n_iter < 1:
            raise UserError(f"method.n_iter must be >= 1, got {cfg.n_iter}")
        linear_weight(get_module(model, cfg.layer))  # fails early on a layer that is not linear
        self.layer: Optional[nn.Module] = None
        self._hooks: Optional[MaskedCallHooks] = None
        self._prefixes: Optional[list[str]] = None  # context templates, generated once per run
        self.losses: list[float] = []  # the last edit's loss before each step taken (diagnostics)

    def make_layer(self, base: nn.Module) -> nn.Module:
        raise NotImplementedError

    def context_prefixes(self) -> list[str]:
        if self._prefixes is None:
            if self.layer is not None:
                raise RuntimeError("context templates must come from the unedited model")
            self._prefixes = generate_prefixes(self.model, self.ctx.tokenizer, self.cfg, self.ctx.device)
        return self._prefixes

    def _install(self) -> nn.Module:
        if self.layer is None:
            self.context_prefixes()  # while the model is still unedited
            self.layer = self.make_layer(get_module(self.model, self.cfg.layer))
            set_module(self.model, self.cfg.layer, self.layer)
            self._hooks = MaskedCallHooks(self.model, self.layer)
        return self.layer

    def restore(self) -> None:
        if self.layer is not None:
            set_module(self.model, self.cfg.layer, self.layer.base)
            self._hooks.remove()
            self.layer, self._hooks = None, None
        self.losses = []
