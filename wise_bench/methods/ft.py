"""FT-L and FT-M: fine-tune the weight of one layer on the edit (docs/baselines.md, FT-L and FT-M)."""
from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from omegaconf import MISSING

from wise_bench.data import Request
from wise_bench.methods.base import WeightEditor
from wise_bench.metrics import Encoded, TokenBatch, encode_pair
from wise_bench.models import get_module
from wise_bench.prefix_cache import prefix_cache


class FTLoss(str, enum.Enum):
    # FT-M: teacher-forced cross-entropy on the target tokens of prompt + " " + target.
    teacher_forced = "teacher_forced"
    # FT-L: every target token's log-prob read from the logits at the last prompt token.
    prompt_last = "prompt_last"


@dataclass
class FTConfig:
    name: str = MISSING
    layer: str = MISSING  # e.g. ${model.edit_layers.ft}
    loss: FTLoss = FTLoss.teacher_forced
    lr: float = 5e-4
    steps: int = 25
    weight_decay: float = 0.0
    norm_constraint: Optional[float] = None  # clamp weights to original ± this after each step
    stop_loss: float = 1e-2  # no step is taken once the loss is below this
    prefix_cache: bool = True  # replay the frozen computation below the layer across steps (exact)


class FT(WeightEditor):
    Config = FTConfig

    @staticmethod
    def module_paths(cfg: FTConfig) -> list[str]:
        return [cfg.layer]

    def __init__(self, cfg: FTConfig, model, ctx):
        super().__init__(cfg, model, ctx)
        self.weight = get_module(model, cfg.layer).weight
        self.keep_originals([self.weight])
        self.original = self.original_weights[0]

    def encode(self, requests: list[Request]) -> list[Encoded]:
        return [encode_pair(self.ctx.tokenizer, r.prompt, r.target_new) for r in requests]

    def _loss_fn(self, requests: list[Request]) -> Callable[[], torch.Tensor]:
        return self.edit_loss(self.encode(requests))

    def edit_loss(self, encoded: list[Encoded]) -> Callable[[], torch.Tensor]:
        """FT's loss on encoded edits: a closure that runs one forward pass (tokenised once per edit)."""
        tok, device = self.ctx.tokenizer, self.ctx.device
        if FTLoss(self.cfg.loss) is FTLoss.teacher_forced:
            batch = TokenBatch.build(encoded, tok.pad_token_id, device)
            return lambda: batch.mean_target_nll(batch.target_logits(self.model)).mean()

        prompts = TokenBatch.build([Encoded(e.ids[: e.target_pos[0]], ()) for e in encoded], tok.pad_token_id, device)
        targets = [[e.ids[p] for p in e.target_pos] for e in encoded]  # lists index logits on any device

        def prompt_last() -> torch.Tensor:
            # Left padding puts every prompt's last token in the last column.
            logp = torch.log_softmax(prompts.last_logits(self.model).float(), dim=-1)
            return torch.stack([-logp[row, t].mean() for row, t in enumerate(targets)]).mean()

        return prompt_last

    def edit(self, requests: list[Request]) -> dict[str, float]:
        loss_fn = self._loss_fn(requests)
        self.weight.requires_grad_(True)
        opt = torch.optim.Adam([self.weight], lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)
        losses: list[float] = []
        cache = prefix_cache(self.model, self.cfg.layer, self.cfg.prefix_cache)
        try:
            with cache:
                for _ in range(self.cfg.steps):
                    loss = loss_fn()
                    losses.append(loss.item())
                    if losses[-1] < self.cfg.stop_loss:
                        break
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                    if self.cfg.norm_constraint is not None:
                        with torch.no_grad():
                            c = self.cfg.norm_constraint
                            self.weight.copy_(self.weight.clamp(self.original - c, self.original + c))
        finally:
            self.weight.requires_grad_(False)
        # Losses are measured before each step; the last one is before the step that was skipped or last.
        return {"loss_start": losses[0], "loss": losses[-1], "steps": len(losses)}
