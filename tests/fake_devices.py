"""Several devices on a CPU-only machine, for testing device placement (`model.device_map=auto`).

torch cannot put CPU tensors on a second device object, so tensors carry a pretend device instead:
`FakeDevices` is a torch function mode in which a tensor tagged with index i reports
``device == cpu:i``, every op checks that the tagged tensors it meets share one index (the check a
GPU kernel makes), and results inherit the index. Factories and ``.to`` given ``cpu:i`` tag their
result. Tensors made without a device index (host tensors, and tensors autograd makes in C++) are
untagged and meet anything: the check catches tensors put on the wrong GPU, not on the host.

`split_model` places a LLaMA-style model's parts on these devices the way accelerate's
``dispatch_model`` does: each part's forward moves its inputs to its own device (after any torch
hooks on the module have run), and the model returns its outputs on the device its inputs came from.
"""
from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_map

TAG = "_fake_device_index"
DEVICE_GET = torch.Tensor.device.__get__
DATA_SET = torch.Tensor.data.__set__
MAY_CROSS_DEVICES = {torch.Tensor.copy_}  # copies between GPUs are allowed


def fake_device(index: int) -> torch.device:
    return torch.device("cpu", index)


def index_of(t: torch.Tensor) -> int | None:
    return getattr(t, TAG, None)


def tag(t: Any, index: int | None) -> None:
    if isinstance(t, torch.Tensor) and index is not None:
        setattr(t, TAG, index)


def requested_index(func, args, kwargs) -> tuple[bool, int | None]:
    """(whether the call names a device, and that device's fake index)."""
    if func is torch.Tensor.cpu:
        return True, None
    candidates = [kwargs.get("device")]
    if func is torch.Tensor.to:
        candidates += list(args[1:])
    for c in candidates:
        if isinstance(c, torch.Tensor):
            return True, index_of(c)
        if isinstance(c, (str, torch.device)):
            try:
                return True, torch.device(c).index
            except RuntimeError:  # a dtype given as a string
                continue
    return False, None


class DeviceMismatch(RuntimeError):
    pass


class FakeDevices(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.crossings = 0  # ops that met tensors tagged with some device: proof the check ran
        self._real_load = torch.load

    def __enter__(self):
        torch.load = self._load
        return super().__enter__()

    def __exit__(self, *exc):
        torch.load = self._real_load
        return super().__exit__(*exc)

    def _load(self, *args, map_location=None, **kwargs):
        """torch.load onto a pretend device: load on the host, then tag."""
        index = map_location.index if isinstance(map_location, torch.device) else None
        loaded = self._real_load(*args, map_location="cpu" if index is not None else map_location, **kwargs)
        tree_map(lambda t: tag(t, index), loaded)
        return loaded

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func == DEVICE_GET and index_of(args[0]) is not None:
            return fake_device(index_of(args[0]))
        named, index = requested_index(func, args, kwargs)
        if named:
            out = func(*args, **kwargs)
            if func in (torch.Tensor.to, torch.Tensor.cpu) and out is args[0] and index_of(out) != index:
                out = out.clone()  # a real move copies (and the mode is off here: the copy is untagged)
            tree_map(lambda t: tag(t, index), out)
            return out
        if func == DATA_SET:
            func(*args, **kwargs)
            setattr(args[0], TAG, index_of(args[1]))
            return None
        name = getattr(func, "__name__", str(func))
        if name.startswith("_foreach_"):  # lists of tensors, element i of each on one device
            out = func(*args, **kwargs)
            if isinstance(out, (list, tuple)):
                for o, first in zip(out, args[0]):
                    tag(o, index_of(first))
            return out
        if func is torch.autograd.grad:  # outputs on some devices, each gradient on its input's
            grads = func(*args, **kwargs)
            inputs = kwargs.get("inputs", args[1] if len(args) > 1 else None)
            for g, i in zip(grads, [inputs] if isinstance(inputs, torch.Tensor) else inputs):
                tag(g, index_of(i))
            return grads
        indices = {index_of(t) for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)} - {None}
        if len(indices) > 1 and func not in MAY_CROSS_DEVICES:
            raise DeviceMismatch(f"{name}: expected all tensors on one device, found "
                                 + " and ".join(str(fake_device(i)) for i in sorted(indices)))
        self.crossings += bool(indices)
        out = func(*args, **kwargs)
        if len(indices) == 1 and func not in MAY_CROSS_DEVICES:
            tree_map(lambda t: tag(t, next(iter(indices))), out)
        return out


def move(obj: Any, device: torch.device) -> Any:
    return tree_map(lambda t: t.to(device) if isinstance(t, torch.Tensor) else t, obj)


def place(module: nn.Module, index: int) -> None:
    """Put a part of the model on fake device ``index``: its tensors, and its inputs at each call."""
    for t in [*module.parameters(), *module.buffers()]:
        tag(t, index)
    device = fake_device(index)
    inner_forward = module.forward

    @functools.wraps(inner_forward)
    def forward(*args, **kwargs):  # as accelerate does: inside the module's hooks, not before them
        return inner_forward(*move(args, device), **move(kwargs, device))

    module.forward = forward


def split_model(model: nn.Module, layer_devices: list[int]) -> None:
    """Embeddings and rotary tables on device 0, block i on ``layer_devices[i]``, the final norm and
    the LM head on the last block's device; outputs come back where the inputs were."""
    inner = model.model
    place(inner.embed_tokens, 0)
    place(inner.rotary_emb, 0)
    for block, index in zip(inner.layers, layer_devices, strict=True):
        place(block, index)
    place(inner.norm, layer_devices[-1])
    place(model.lm_head, layer_devices[-1])

    model_forward = model.forward

    @functools.wraps(model_forward)  # callers read its signature
    def forward(*args, **kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        device = (ids if ids is not None else kwargs["inputs_embeds"]).device
        output = model_forward(*args, **kwargs)
        for key, value in output.items():
            output[key] = move(value, device)  # the KV cache (not a pytree) stays where its layers are
        return output

    model.forward = forward
