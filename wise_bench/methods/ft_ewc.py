"""FT-EWC: FT-M plus an elastic weight consolidation penalty (docs/baselines.md, FT-EWC).

Before each edit, the Fisher diagonal F of the edited weight is estimated from the squared gradients
of the FT-M loss of the most recent edits (``memory`` of them), and the anchor θ* is the weight as it
is then. The edit minimises FT-M loss + λ Σ F_i (θ_i − θ*_i)² with FT's own loop.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from wise_bench.data import Request
from wise_bench.methods.ft import FT, FTConfig
from wise_bench.metrics import Encoded


@dataclass
class FTEWCConfig(FTConfig):
    lr: float = 1e-2  # the paper's FT-EWC learning rate
    steps: int = 100  # the GRACE repo's n_iter (it also stops early once the edit is learnt)
    ewc_lambda: float = 0.1
    memory: int = 10  # the most recent edits the Fisher diagonal is estimated on


class FTEWC(FT):
    Config = FTEWCConfig

    def __init__(self, cfg: FTEWCConfig, model, ctx):
        super().__init__(cfg, model, ctx)
        # Token ids, not requests: the state (and so a checkpoint) holds only plain types.
        self.memory: deque[Encoded] = deque(maxlen=cfg.memory)
        self.consolidated: Optional[tuple[torch.Tensor, torch.Tensor]] = None  # (Fisher, anchor) of this edit

    def fisher_diagonal(self) -> torch.Tensor:
        """Mean over remembered edits of the squared gradient of each one's own FT loss."""
        fisher = torch.zeros_like(self.weight, dtype=torch.float32)  # bf16 cannot hold the sum of squares
        self.weight.requires_grad_(True)
        try:
            for encoded in self.memory:
                (grad,) = torch.autograd.grad(self.edit_loss([encoded])(), self.weight)
                fisher += grad.float().pow(2)
        finally:
            self.weight.requires_grad_(False)
        return fisher / len(self.memory)

    def _loss_fn(self, requests: list[Request]) -> Callable[[], torch.Tensor]:
        edit_loss = super()._loss_fn(requests)
        if self.consolidated is None:
            return edit_loss
        fisher, anchor = self.consolidated

        def loss() -> torch.Tensor:
            nll = edit_loss()  # on the input device, the penalty on the layer's
            return nll + (self.cfg.ewc_lambda * ewc_penalty(self.weight, fisher, anchor)).to(nll.device)

        return loss

    def edit(self, requests: list[Request]) -> dict[str, float]:
        # The anchor θ* is the weight before this edit, i.e. after the remembered ones.
        self.consolidated = (self.fisher_diagonal(), self.weight.detach().clone()) if self.memory else None
        try:
            stats = super().edit(requests)
            if self.consolidated is not None:
                stats["ewc_penalty"] = self.cfg.ewc_lambda * ewc_penalty(self.weight, *self.consolidated).item()
        finally:
            self.consolidated = None
        self.memory.extend(self.encode(requests))
        return stats

    def restore(self) -> None:
        super().restore()
        self.memory.clear()

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "memory": [[list(e.ids), list(e.target_pos)] for e in self.memory]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.memory = deque((Encoded(tuple(ids), tuple(pos)) for ids, pos in state["memory"]), maxlen=self.cfg.memory)


def ewc_penalty(weight: torch.Tensor, fisher: torch.Tensor, anchor: torch.Tensor) -> torch.Tensor:
    """Σ F_i (θ_i − θ*_i)², in float32 (the Fisher of a bf16 model is far below bf16's resolution)."""
    return (fisher * (weight.float() - anchor.float()).pow(2)).sum()
