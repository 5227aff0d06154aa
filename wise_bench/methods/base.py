"""The protocol every editing method implements. The loop, metrics and loggers only see this."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from wise_bench.data import Request


@dataclass
class EditContext:
    """What a method may use besides the model: the tokenizer, the run's irrelevant texts and seed."""

    tokenizer: Any
    train_texts: list[str]
    device: torch.device
    seed: int


class Method:
    """An editor of one model. Subclasses set ``Config`` (a dataclass) and implement ``edit``."""

    Config: ClassVar[type]

    def __init__(self, cfg: Any, model: nn.Module, ctx: EditContext):
        self.cfg = cfg
        self.model = model
        self.ctx = ctx

    @staticmethod
    def module_paths(cfg: Any) -> list[str]:
        """Dotted module paths the method edits, checked against the model before it loads."""
        return []

    def edit(self, requests: list[Request]) -> dict[str, float]:
        """Apply one edit step for ``requests``; return scalar statistics (e.g. final loss)."""
        raise NotImplementedError

    def restore(self) -> None:
        """Bring the model back to exactly its unedited state."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to rebuild the edited model from the unedited one."""
        raise NotImplementedError

    def load_state_dict(self, state: dict[str, Any]) -> None:
        raise NotImplementedError
