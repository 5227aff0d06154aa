"""Skip the frozen computation below an edited module when the same batch is run again.

Single-layer editors (WISE, GRACE, FT) optimise one module for tens of steps on one fixed edit
batch. Everything the forward pass computes before it reaches that module is frozen and
deterministic, so it does not change from step to step: the first forward pass records it and
later passes on the same input replay it. Two levels are replayed:

- the decoder blocks below the edited one (their outputs);
- inside the edited block, every submodule that has finished before the edited module starts (in
  a LLaMA block editing ``mlp.down_proj``: the norms, self-attention, ``gate_proj``, ``up_proj`` and
  the activation), since by the order of execution its output cannot depend on the edited module.
  Only outputs that do not require grad are recorded, so nothing downstream of a trainable
  parameter is ever replayed.

So only the embedding, a few element-wise operations and the computation from the edited module
upwards run. Replayed outputs are exactly the recorded tensors, so losses and gradients are
unchanged.

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
from contextlib import AbstractContextManager, nullcontext
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


def map_tensors(fn: Callable[[torch.Tensor], Any], x: Any) -> Any:
    """``x`` with ``fn`` applied to every tensor in it (tuples, lists and dicts are walked)."""
    if isinstance(x, torch.Tensor):
        return fn(x)
    if isinstance(x, (tuple, list)):
        return type(x)(map_tensors(fn, v) for v in x)
    if isinstance(x, dict):
        return {k: map_tensors(fn, v) for k, v in x.items()}
    return x


def tensors_in(x: Any) -> list[torch.Tensor]:
    """Every tensor in ``x`` (tuples, lists and dicts are walked), in order."""
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (tuple, list)):
        return [t for v in x for t in tensors_in(v)]
    if isinstance(x, dict):
        return [t for v in x.values() for t in tensors_in(v)]
    return []


@dataclass
class Entry:
    key: tuple[tuple, dict]  # (args, kwargs) of the model call
    outputs: dict[int, Any] = field(default_factory=dict)  # lower block index -> its recorded output
    # (submodule name in the edited block, call number) -> recorded output
    inner: dict[tuple[str, int], Any] = field(default_factory=dict)
    complete: bool = False  # the recording call has finished


class PrefixCache:
    """While active, the frozen computation below the edited module replays for a model call seen before."""

    def __init__(self, model: nn.Module, module_path: str, max_entries: int = 4):
        blocks, index = block_list(model, module_path)
        self.model = model
        self.module_path = module_path
        self.blocks = list(blocks)[:index]
        self.edited_block = blocks[index]
        self.max_entries = max_entries
        self.entries: list[Entry] = []
        self.current: Entry | None = None
        self.hits = self.misses = 0
        self._handles: list[Any] = []
        self._saved_forwards: list[tuple[nn.Module, Callable | None]] = []
        self._edited_started = False  # in the current model call
        self._calls: dict[str, int] = {}  # submodule name -> calls so far in the current model call

    def __enter__(self) -> "PrefixCache":
        trainable = [n for b in self.blocks for n, p in b.named_parameters() if p.requires_grad]
        if trainable:
            raise ValueError(f"the prefix cache needs frozen lower blocks; trainable: {trainable[:3]}")
        edited = get_module(self.model, self.module_path)
        self._handles = [
            self.model.register_forward_pre_hook(self._select_entry, with_kwargs=True),
            self.model.register_forward_hook(self._leave_entry, always_call=True),
            edited.register_forward_pre_hook(self._mark_edited_started),
        ]
        for j, block in enumerate(self.blocks):
            self._wrap(block, self._replaying(j, block.forward))
        inside_edited = set(map(id, edited.modules()))
        for name, sub in self.edited_block.named_modules():
            holds_edited = any(m is edited for m in sub.modules())
            if name and not holds_edited and id(sub) not in inside_edited:
                self._wrap(sub, self._replaying_inner(name, sub.forward))
        return self

    def _wrap(self, module: nn.Module, forward: Callable) -> None:
        # An instance attribute shadows the class's forward; nn.Module.__call__ then calls ours.
        self._saved_forwards.append((module, module.__dict__.get("forward")))
        module.forward = forward

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
        self._edited_started, self._calls = False, {}
        self.current = next((e for e in self.entries if same(e.key, key)), None)
        if self.current is not None:
            self.hits += 1
            return
        self.misses += 1
        if len(self.entries) >= self.max_entries:
            self.entries.pop(0)
        # A copy that later in-place changes by the caller cannot alter.
        self.current = Entry(map_tensors(lambda t: t.detach().clone(), key))
        self.entries.append(self.current)

    def _leave_entry(self, *_: Any) -> None:
        entry = self.current
        if entry is not None and not entry.complete:
            # A replayed submodule never calls its children: keep only the outermost recordings.
            names = {name for name, _ in entry.inner}
            entry.inner = {k: v for k, v in entry.inner.items() if not any(k[0].startswith(n + ".") for n in names)}
            entry.complete = True
        self.current = None

    def _mark_edited_started(self, *_: Any) -> None:
        self._edited_started = True

    def _replaying(self, j: int, forward: Callable) -> Callable:
        def cached_forward(*args: Any, **kwargs: Any) -> Any:
            entry = self.current
            if entry is None:  # the block is called on its own, not through the model
                return forward(*args, **kwargs)
            if j not in entry.outputs:
                entry.outputs[j] = map_tensors(torch.Tensor.detach, forward(*args, **kwargs))
            return entry.outputs[j]

        return cached_forward

    def _replaying_inner(self, name: str, forward: Callable) -> Callable:
        def cached_forward(*args: Any, **kwargs: Any) -> Any:
            entry = self.current
            if entry is None:
                return forward(*args, **kwargs)
            key = (name, self._calls.get(name, 0))
            self._calls[name] = key[1] + 1
            if entry.complete:
                return entry.inner[key] if key in entry.inner else forward(*args, **kwargs)
            out = forward(*args, **kwargs)
            if not self._edited_started and torch.is_grad_enabled() and not any(t.requires_grad for t in tensors_in(out)):
                entry.inner[key] = map_tensors(torch.Tensor.detach, out)
            return out

        return cached_forward


def prefix_cache(model: nn.Module, module_path: str, enabled: bool = True) -> AbstractContextManager:
    """``PrefixCache`` for a method's edit loop, or a no-op when the method's config turns it off."""
    return PrefixCache(model, module_path) if enabled else nullcontext()
