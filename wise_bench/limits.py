"""Token-length limits, checked on every text as soon as the tokenizer loads (before any weights).

A 20,000-token record once grew a run to 23.7 GB before the kernel killed it; measuring every text
the run will feed the model up front turns that into one clear error (or a skipped record).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Optional

from wise_bench.config import ModelConfig
from wise_bench.data import Request
from wise_bench.errors import UserError
from wise_bench.metrics import encode_pair
from wise_bench.models import model_config

log = logging.getLogger(__name__)


def model_max_length(cfg: ModelConfig, vocab_size: int) -> int:
    """``model.max_length``, or the model's max_position_embeddings when it is not set.

    A model with learned position embeddings has no row past max_position_embeddings, so a longer
    limit is refused; rotary positions extend (less well past the lengths the model was trained on),
    so there a longer limit is allowed with a warning.
    """
    config = model_config(cfg, vocab_size)
    positions = getattr(config, "max_position_embeddings", None)
    if cfg.max_length is None:
        if positions is None:
            raise UserError(f"model '{cfg.name}': its config has no max_position_embeddings; set model.max_length")
        return positions
    if cfg.max_length < 1:
        raise UserError(f"model.max_length={cfg.max_length} must be >= 1")
    if positions is not None and cfg.max_length > positions:
        rotary = getattr(config, "rope_parameters", None) or getattr(config, "rope_theta", None)
        if not rotary:
            raise UserError(f"model.max_length={cfg.max_length} is over the model's {positions} learned positions")
        log.warning("model.max_length=%d is past the model's max_position_embeddings (%d): rotary positions "
                    "extend, but the model never saw such lengths in training", cfg.max_length, positions)
    return cfg.max_length


@dataclass
class TokenLimit:
    """The longest sequence a run may build: ``prefix_tokens`` of method template + prompt + target."""

    tokenizer: object
    max_length: int
    prefix_tokens: int = 0  # the longest text a method puts before a prompt (context templates)
    metrics: frozenset = field(default_factory=lambda: frozenset({"gen", "ood", "portability"}))  # scored ones

    def tokens(self, text: str) -> int:
        return len(self.tokenizer(text)["input_ids"])

    def request(self, req: Request) -> Optional[tuple[str, int, str]]:
        """(request attribute, token count, what was counted) of the first text over the limit, or None.

        Every pair the run scores or trains on is measured as it is fed: the edit prompt with its
        target after the longest template, paraphrase / OOD / portability with theirs, and the
        locality pair. The attribute blamed is the longer of the pair's two texts.
        """
        pairs = [("prompt", "target_new", req.prompt, req.target_new, self.prefix_tokens)]
        if req.loc_answer.strip():
            pairs.append(("loc_prompt", "loc_answer", req.loc_prompt, req.loc_answer, 0))
        if "gen" in self.metrics and req.rephrase_prompt:
            pairs.append(("rephrase_prompt", "target_new", req.rephrase_prompt, req.target_new, 0))
        if "ood" in self.metrics and req.ood_prompt:
            pairs.append(("ood_prompt", "target_new", req.ood_prompt, req.target_new, 0))
        if "portability" in self.metrics:
            pairs += [("portability", "portability", q, a, 0) for q, a in req.portability]
        for first, second, text, target, prefix in pairs:
            n = len(encode_pair(self.tokenizer, text, target).ids) + prefix
            if n > self.max_length:
                blamed = first if self.tokens(text) >= self.tokens(target) else second
                counted = "portability question + answer" if first == "portability" else f"{first} + {second}"
                return blamed, n, counted + (f" + {prefix}-token method template" if prefix else "")
        return None

    def text(self, text: str) -> Optional[int]:
        """The token count of an irrelevant (training) text when it is over the limit, else None."""
        n = self.tokens(text)
        return n if n > self.max_length else None
