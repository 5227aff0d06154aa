"""The protocol every editing method implements. The loop, metrics and loggers only see this."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterator

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


@dataclass
class Calibration:
    """Model-dependent hyperparameters measured on a tuning split (``python -m wise_bench.calibrate``).

    ``values`` are keys of ``model.hparams`` (the method's YAML reads them); ``measured`` holds the
    statistics they were derived from, written beside them as comments."""

    values: dict[str, Any]
    measured: dict[str, Any] = field(default_factory=dict)


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

    @staticmethod
    def check_modules(cfg: Any, modules: dict[str, nn.Module]) -> None:
        """Checks of the config against the modules it edits (weightless copies, before the model loads);
        raise UserError on a mismatch."""

    @staticmethod
    def prefix_tokens(cfg: Any, tokenizer: Any) -> int:
        """An upper bound on the tokens the method puts before a prompt (context templates), so
        that lengths are checked before the model loads."""
        return 0

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

    def edited_tensors(self) -> list[torch.Tensor]:
        """The tensors edits change, checked for non-finite values after every edit step."""
        return list(tensors_in(self.state_dict()))

    # Methods whose hyperparameters are absolute numbers tied to the model's activation scale set
    # ``calibrate = classmethod(...)``: (cfg, model, ctx, requests of a tuning split) -> Calibration.
    calibrate: ClassVar[Any] = None


def tensors_in(state: Any) -> Iterator[torch.Tensor]:
    """Every floating-point tensor in a nested structure of dicts, lists and tuples."""
    if isinstance(state, torch.Tensor):
        if state.is_floating_point():
            yield state
    elif isinstance(state, dict):
        for value in state.values():
            yield from tensors_in(value)
    elif isinstance(state, (list, tuple)):
        for value in state:
            yield from tensors_in(value)


class WeightEditor(Method):
    """A method that changes some of the model's weights in place; restoring and saving them is shared."""

    def keep_originals(self, weights: list[torch.Tensor]) -> None:
        """Remember ``weights`` (parameters or views of them) as they are before any edit."""
        self.edited_weights = weights
        self.original_weights = [w.detach().clone() for w in weights]

    def restore(self) -> None:
        with torch.no_grad():
            for w, w0 in zip(self.edited_weights, self.original_weights):
                w.copy_(w0)

    def state_dict(self) -> dict[str, Any]:
        return {"weights": [w.detach().clone() for w in self.edited_weights]}

    def edited_tensors(self) -> list[torch.Tensor]:
        return list(self.edited_weights)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        with torch.no_grad():
            for w, saved in zip(self.edited_weights, state["weights"]):
                w.copy_(saved)
