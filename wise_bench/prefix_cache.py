"""Skip the frozen decoder blocks below an edited layer when the same batch is run again.

Single-layer editors (WISE, GRACE, FT) optimise one module for tens of steps on one fixed edit
batch. The blocks below the edited one are frozen and deterministic, so their outputs do not change
from step to step: the first forward pass records them and later passes on the same input replay
them, so only the embedding (cheap) and the blocks from the edited one upwards run. Replayed
outputs are exactly the recorded tensors, so losses and gradients are unchanged.

Usage::

    with PrefixCache(model, "model.layers[27].mlp.down_proj"):
        for step in range(n_iter):
            loss = loss_fn(model(**batch))

Works for any model whose decoder blocks sit in one ``nn.ModuleList`` named in the module path
(LLaMA/Mistral ``model.layers``, GPT-2/GPT-J ``transformer.h``). The cache is keyed by the model
call's arguments: a different batch records anew (a few batches are kept, e.g. an edit batch and
a replay batch). What the model returns besides what flows through the blocks (a KV cache) is not
meaningful on a replayed call; pass ``use_cache=False``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from wise_bench.errors import UserError
from wise_bench.models import get_module


def block_list(model: nn.Module, module_path: str) -> tuple[nn.ModuleList, int]:
    """The decoder-block list on ``module_path`` and the index of the block that holds the module."""
    parts = [p for p in re.split(r"[.\[\]]+", module_path) if p]
    for i in range(1, len(parts)):
        parent = get_module(model, ".".join(parts[:i]))
        if isinstance(parent, nn.ModuleList) and parts[i].isdigit():
            return parent, int(parts[i])
    raise UserError(f"'{module_path}' is not inside a list of decoder blocks (e.g. model.layers[i] or transformer.h[i])")


def same(a: Any, b: Any) -> bool:
    """Equal model-call arguments: tensors by value, containers element-wise, the rest by ==."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (
            isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)
            and a.shape == b.shape and a.dtype == b.dtype and a.device == b.device and torch.equal(a, b)
        )
    if isinstance(a, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return a is b or (type(a) is type(b) and a == b)


def detached(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.detach()
    if isinstance(x, (tuple, list)):
        return type(x)(detached(v) for v in x)
    if isinstance(x, dict):
        return {k: detached(v) for k, v in x.items()}
    return x


def copied(x: Any) -> Any:
    """A copy of call arguments that later in-place changes by the caller cannot alter."""
    if isinstance(x, torch.Tensor):
        return x.detach().clone()
    if isinstance(x, (tuple, list)):
        return type(x)(copied(v) for v in x)
    if isinstance(x, dict):
        return {k: copied(v) for k, v in x.items()}
    return x


@dataclass
class Entry:
    key: tuple[tuple, dict]  # (args, kwargs) of the model call
    outputs: dict[int, Any] = field(default_factory=dict)  # block index -> its recorded output


class PrefixCache:
    """While active, blocks below the edited one replay their outputs for a model call seen before."""

    def __init__(self, model: nn.Module, module_path: str, max_entries: int = 4):
        blocks, index = block_list(model, module_path)
        self.model = model
        self.blocks = list(blocks)[:index]
        self.max_entries = max_entries
        self.entries: list[Entry] = []
        self.current: Entry | None = None
        self.hits = self.misses = 0
        self._handles: list[Any] = []
        self._saved_forwards: list[tuple[nn.Module, Callable | None]] = []

    def __enter__(self) -> "PrefixCache":
        trainable = [n for b in self.blocks for n, p in b.named_parameters() if p.requires_grad]
        if trainable:
            raise ValueError(f"the prefix cache needs frozen lower blocks; trainable: {trainable[:3]}")
        self._handles = [
            self.model.register_forward_pre_hook(self._select_entry, with_kwargs=True),
            self.model.register_forward_hook(self._leave_entry, always_call=True),
        ]
        for j, block in enumerate(self.blocks):
            # An instance attribute shadows the class's forward; nn.Module.__call__ then calls ours.
            self._saved_forwards.append((block, block.__dict__.get("forward")))
            block.forward = self._replaying(j, block.forward)
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        for block, previous in self._saved_forwards:
            if previous is None:
                del block.forward
            else:
                block.forward = previous
        self._handles, self._saved_forwards = [], []
        self.entries, self.current = [], None

    def _select_entry(self, _module: nn.Module, args: tuple, kwargs: dict) -> None:
        key = (args, kwargs)
        self.current = next((e for e in self.entries if same(e.key, key)), None)
        if self.current is not None:
            self.hits += 1
            return
        self.misses += 1
        if len(self.entries) >= self.max_entries:
            self.entries.pop(0)
        self.current = Entry(copied(key))
        self.entries.append(self.current)

    def _leave_entry(self, *_: Any) -> None:
        self.current = None

    def _replaying(self, j: int, forward: Callable) -> Callable:
        def cached_forward(*args: Any, **kwargs: Any) -> Any:
            entry = self.current
            if entry is None:  # the block is called on its own, not through the model
                return forward(*args, **kwargs)
            if j not in entry.outputs:
                entry.outputs[j] = detached(forward(*args, **kwargs))
            return entry.outputs[j]

        return cached_forward
