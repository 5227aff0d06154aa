"""The shipped configs for real models: every edit_layers path must name a linear layer of that model.

The architectures are built in-process with the real shapes on the meta device (no weights, no
download), so this runs offline in seconds.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from transformers import AutoConfig, AutoModelForCausalLM, GPT2Config, GPTJConfig, LlamaConfig, MistralConfig, Qwen2Config

from wise_bench.config import ModelConfig
from wise_bench.models import get_module, linear_weight

REPO = Path(__file__).resolve().parent.parent
MODEL_DIR = REPO / "conf" / "model"

FAMILIES = ("ft", "wise", "grace", "defer", "rome", "memit", "alphaedit", "memoir", "ultraedit")
LIST_FAMILIES = ("memit", "alphaedit")  # consecutive layers
LAYER_LISTS = (*LIST_FAMILIES, "ultraedit")  # UltraEdit: e.g. gate_proj 11-15 + up_proj 18-24 on LLaMA-3


def _gpt2(n_layer: int, n_embd: int, n_head: int) -> GPT2Config:
    return GPT2Config(n_layer=n_layer, n_embd=n_embd, n_head=n_head)


# file stem -> (transformers config with the real model's shape, number of layers, expected dtype)
ARCHS = {
    # the project's own model: its config is committed, so it is read rather than written out here
    "small": (lambda: AutoConfig.from_pretrained(REPO / "models" / "small"), 6, "float32"),
    "gpt2": (lambda: _gpt2(12, 768, 12), 12, "float32"),
    "gpt2-xl": (lambda: _gpt2(48, 1600, 25), 48, "float32"),
    "gpt-j-6b": (lambda: GPTJConfig(n_layer=28, n_embd=4096, n_head=16, rotary_dim=64), 28, "bfloat16"),
    "llama-2-7b": (
        lambda: LlamaConfig(num_hidden_layers=32, hidden_size=4096, intermediate_size=11008, num_attention_heads=32),
        32,
        "bfloat16",
    ),
    "mistral-7b": (
        lambda: MistralConfig(
            num_hidden_layers=32, hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8
        ),
        32,
        "bfloat16",
    ),
    "llama-3-8b-instruct": (
        lambda: LlamaConfig(
            num_hidden_layers=32,
            hidden_size=4096,
            intermediate_size=14336,
            num_attention_heads=32,
            num_key_value_heads=8,
            vocab_size=128256,
        ),
        32,
        "bfloat16",
    ),
    "qwen2.5-7b-instruct": (
        lambda: Qwen2Config(
            num_hidden_layers=28,
            hidden_size=3584,
            intermediate_size=18944,
            num_attention_heads=28,
            num_key_value_heads=4,
            vocab_size=152064,
        ),
        28,
        "bfloat16",
    ),
}

_INDEX = re.compile(r"(?:\[(\d+)\]|\.(\d+)(?:\.|$))")


def layer_index(path: str) -> int:
    m = _INDEX.search(path)
    assert m, f"no layer index in {path!r}"
    return int(m.group(1) or m.group(2))


def load(stem: str) -> ModelConfig:
    path = MODEL_DIR / f"{stem}.yaml"
    assert path.is_file(), f"missing model config {path}"
    raw = OmegaConf.load(path)
    raw.pop("defaults", None)  # Hydra's composition list (e.g. the model's calibration file)
    return OmegaConf.merge(OmegaConf.structured(ModelConfig), raw)


@pytest.fixture(scope="module")
def meta_models():
    cache = {}

    def build(stem: str):
        if stem not in cache:
            cfg = ARCHS[stem][0]()
            with torch.device("meta"):
                cache[stem] = AutoModelForCausalLM.from_config(cfg)
        return cache[stem]

    return build


@pytest.mark.parametrize("stem", sorted(ARCHS))
def test_schema_and_metadata(stem):
    cfg = load(stem)
    assert cfg.name == stem
    assert cfg.name_or_path and "/" in cfg.name_or_path
    assert cfg.tokenizer is None
    assert cfg.random_init is None
    assert cfg.dtype.value == ARCHS[stem][2]
    assert set(FAMILIES) <= set(cfg.edit_layers), f"missing families: {set(FAMILIES) - set(cfg.edit_layers)}"
    for fam in FAMILIES:
        value = cfg.edit_layers[fam]
        if fam in LAYER_LISTS:
            assert OmegaConf.is_list(value) and len(value) >= 2, f"{fam} must be a list of layers"
        else:
            assert isinstance(value, str), f"{fam} must be one module path"


@pytest.mark.parametrize("stem", sorted(ARCHS))
def test_edit_layers_resolve_to_linear(stem, meta_models):
    cfg = load(stem)
    model = meta_models(stem)
    assert model.config.num_hidden_layers == ARCHS[stem][1]
    for fam, value in cfg.edit_layers.items():
        paths = list(value) if OmegaConf.is_list(value) else [value]
        for path in paths:
            module = get_module(model, path)
            w = linear_weight(module)  # raises if not nn.Linear / Conv1D
            assert w.dim() == 2, f"{stem}.{fam}: {path}"


@pytest.mark.parametrize("stem", sorted(ARCHS))
def test_layer_positions(stem):
    cfg = load(stem)
    n = ARCHS[stem][1]
    el = cfg.edit_layers
    for fam in ("wise", "grace", "memoir"):
        i = layer_index(el[fam])
        assert n / 2 <= i < n, f"{stem}.{fam} layer {i} should be in the upper half of {n}"
    i = layer_index(el["rome"])
    assert 0 <= i < n / 2, f"{stem}.rome layer {i} should be in the lower half of {n}"
    for fam in LIST_FAMILIES:
        idx = [layer_index(p) for p in el[fam]]
        assert idx == list(range(idx[0], idx[0] + len(idx))), f"{stem}.{fam} layers {idx} are not consecutive"
        assert all(0 <= i < n for i in idx)
    memit = [layer_index(p) for p in el["memit"]]
    assert layer_index(el["rome"]) in memit, f"{stem}: the ROME layer should lie within MEMIT's range"


def test_every_real_model_yaml_is_covered():
    """A YAML for a downloaded model (no random_init) should be added to ARCHS so its layers are checked."""
    real = {p.stem for p in MODEL_DIR.glob("*.yaml") if OmegaConf.load(p).get("random_init") is None}
    assert real <= set(ARCHS), f"model configs not checked here: {sorted(real - set(ARCHS))}"
