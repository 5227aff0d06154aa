"""DEFER: a learned gate and a new linear map on one layer (docs/baselines.md, DEFER).

At every token position, g(h) = sigmoid(w·h + b) decides whether the layer's output is the new map
V h (g >= 0.5) or the original W h. Training mixes the two softly, g·Vh + (1 - g)·Wh, so that the
edit loss reaches the gate as well as V.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Optional

import torch
from omegaconf import MISSING
from torch import nn

from wise_bench.data import Request
from wise_bench.methods.base import Method
from wise_bench.methods.grace import layer_inputs
from wise_bench.metrics import Encoded, TokenBatch, encode_pair
from wise_bench.models import get_module, linear_weight, set_module
from wise_bench.prefix_cache import prefix_cache


@dataclass
class DEFERConfig:
    name: str = MISSING
    layer: str = MISSING  # e.g. ${model.edit_layers.defer}
    lr: float = 7e-5
    steps: int = 100
    threshold: float = 0.5
    # The reference trains the gate only through the edit loss, so it learns from positives alone.
    # With this on, the gate is also trained as a classifier (binary cross-entropy): open at the
    # edit's target-predicting positions, closed at every token of the request's irrelevant text.
    gate_negatives: bool = False
    prefix_cache: bool = True  # replay the frozen computation below the layer across steps (exact)


class DEFERAdapter(nn.Module):
    """Wraps the original layer with a per-token gate and a trainable copy of the layer."""

    def __init__(self, layer: nn.Module, threshold: float, seed: int):
        super().__init__()
        self.layer = layer
        self.threshold = threshold
        self.soft = False  # True while training: mix the two outputs by the gate's probability
        in_dim = linear_weight(layer).shape[1]
        device = linear_weight(layer).device
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # the gate's default (random) Linear init, reproducibly
            self.gate = nn.Linear(in_dim, 1).to(device)
        # V starts as a float32 copy of the layer: an open gate changes nothing until V is trained,
        # and small Adam steps (lr 7e-5) are not lost to bf16 rounding.
        self.new = copy.deepcopy(layer).float().requires_grad_(True)

    def gate_logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.gate(h.float())[..., 0]

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        out = self.layer(h)
        g = torch.sigmoid(self.gate_logits(h))[..., None]
        new = self.new(h.float())
        if self.soft:
            return (g * new + (1 - g) * out.float()).to(out.dtype)
        return torch.where(g >= self.threshold, new.to(out.dtype), out)


class DEFER(Method):
    Config = DEFERConfig

    @staticmethod
    def module_paths(cfg: DEFERConfig) -> list[str]:
        return [cfg.layer]

    def __init__(self, cfg: DEFERConfig, model, ctx):
        super().__init__(cfg, model, ctx)
        self.original = get_module(model, cfg.layer)
        self.adapter: Optional[DEFERAdapter] = None

    def _install(self) -> DEFERAdapter:
        if self.adapter is None:
            self.adapter = DEFERAdapter(self.original, self.cfg.threshold, self.ctx.seed)
            set_module(self.model, self.cfg.layer, self.adapter)
        return self.adapter

    def _gate_examples(self, requests: list[Request], edits: TokenBatch) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        """(positives, negatives), layer inputs [tokens, in] for the gate classifier; None when off.

        Positives: the layer's inputs at the positions that predict a target token; negatives: at
        every token of each request's irrelevant text. The gate sits at this layer, so these inputs
        do not depend on what is being trained and are computed once.
        """
        texts = self.ctx.train_texts
        if not (self.cfg.gate_negatives and texts):
            return None
        tok = self.ctx.tokenizer
        predicting = edits.target_mask.roll(-1, dims=1)  # the position before each target token
        positives = layer_inputs(self.model, self.original, edits)[predicting]
        encoded = [Encoded(tuple(tok(texts[r.index % len(texts)])["input_ids"]), ()) for r in requests]
        irrelevant = TokenBatch.build(encoded, tok.pad_token_id, self.ctx.device)
        negatives = layer_inputs(self.model, self.original, irrelevant)[irrelevant.attention_mask.bool()]
        return positives, negatives

    def edit(self, requests: list[Request]) -> dict[str, float]:
        adapter = self._install()
        tok = self.ctx.tokenizer
        batch = TokenBatch.build([encode_pair(tok, r.prompt, r.target_new) for r in requests], tok.pad_token_id, self.ctx.device)
        gate_examples = self._gate_examples(requests, batch)
        params = [*adapter.gate.parameters(), *adapter.new.parameters()]
        opt = torch.optim.Adam(params, lr=self.cfg.lr)
        first: Optional[torch.Tensor] = None  # read after the loop: no host sync per step
        adapter.soft = True
        try:
            with prefix_cache(self.model, self.cfg.layer, self.cfg.prefix_cache):
                for _ in range(self.cfg.steps):
                    loss = batch.mean_target_nll(batch.target_logits(self.model)).mean()
                    if gate_examples is not None:
                        loss = loss + gate_classifier_loss(adapter, *gate_examples)
                    first = loss.detach() if first is None else first
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
        finally:
            adapter.soft = False
        with torch.no_grad():
            final = batch.mean_target_nll(batch.target_logits(self.model)).mean().item()
        # loss_start is the training (soft) loss; loss is the edit NLL with the hard gate used at test.
        return {"loss_start": final if first is None else first.item(), "loss": final}

    def restore(self) -> None:
        if self.adapter is not None:
            set_module(self.model, self.cfg.layer, self.original)
            self.adapter = None

    def state_dict(self) -> dict[str, Any]:
        if self.adapter is None:
            return {}
        return {"gate": _copied_state(self.adapter.gate), "new": _copied_state(self.adapter.new)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.restore()
        if state:
            adapter = self._install()
            adapter.gate.load_state_dict(state["gate"])
            adapter.new.load_state_dict(state["new"])


def _copied_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def gate_classifier_loss(adapter: DEFERAdapter, positives: torch.Tensor, negatives: torch.Tensor) -> torch.Tensor:
    """Class-balanced binary cross-entropy: a few target positions face many irrelevant tokens."""
    bce = nn.functional.binary_cross_entropy_with_logits
    pos, neg = adapter.gate_logits(positives), adapter.gate_logits(negatives)
    return bce(pos, torch.ones_like(pos)) + bce(neg, torch.zeros_like(neg))
