"""Loading causal LMs and tokenizers, and addressing their modules by the paths papers use."""
from __future__ import annotations

import difflib
import re
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaConfig, PreTrainedTokenizerFast
from transformers.pytorch_utils import Conv1D

from wise_bench.config import REPO_ROOT, Device, ModelConfig, RandomInitConfig
from wise_bench.errors import UserError


def pick_device(device: Device | str) -> torch.device:
    device = Device(device)
    if device is Device.auto:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device is Device.cuda and not torch.cuda.is_available():
        raise UserError("device=cuda was asked for but torch sees no CUDA device (use device=cpu or auto)")
    return torch.device(device.value)


def resolve_name_or_path(name_or_path: str) -> str:
    """A relative path that exists under the repository root wins over a hub id of the same name."""
    p = Path(name_or_path).expanduser()
    if not p.is_absolute() and (REPO_ROOT / p).exists():
        return str(REPO_ROOT / p)
    return str(p) if p.exists() else name_or_path


# --- tiny random model (tests) -------------------------------------------------------------------


def byte_level_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer with no merges: every UTF-8 byte is a token. Offline, instant."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {t: i for i, t in enumerate(specials)}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def random_llama_config(r: RandomInitConfig, vocab_size: int) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=r.hidden_size,
        intermediate_size=r.intermediate_size,
        num_hidden_layers=r.num_hidden_layers,
        num_attention_heads=r.num_attention_heads,
        num_key_value_heads=r.num_attention_heads,
        max_position_embeddings=r.max_position_embeddings,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )


# --- loading --------------------------------------------------------------------------------------


def load_tokenizer(cfg: ModelConfig):
    if cfg.random_init is not None:
        tok = byte_level_tokenizer()
    else:
        source = resolve_name_or_path(cfg.tokenizer or _require_path(cfg))
        try:
            tok = AutoTokenizer.from_pretrained(source)
        except (OSError, ValueError) as e:
            raise UserError(f"model '{cfg.name}': cannot load tokenizer from '{source}': {e}") from None
    if not tok.is_fast:
        raise UserError(f"model '{cfg.name}': a fast tokenizer is needed (character offsets locate targets)")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return tok


def _require_path(cfg: ModelConfig) -> str:
    if not cfg.name_or_path:
        raise UserError(f"model '{cfg.name}': set model.name_or_path or model.random_init")
    return cfg.name_or_path


def model_config(cfg: ModelConfig, vocab_size: int):
    if cfg.random_init is not None:
        return random_llama_config(cfg.random_init, vocab_size)
    source = resolve_name_or_path(_require_path(cfg))
    try:
        return AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as e:
        raise UserError(f"model '{cfg.name}': cannot load its config from '{source}': {e}") from None


def check_module_paths(cfg: ModelConfig, vocab_size: int, paths: list[str]) -> dict[str, nn.Module]:
    """Resolve every path on a weightless (meta-device) copy of the model, before loading weights;
    the modules found, by path."""
    if not paths:
        return {}
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(model_config(cfg, vocab_size))
    return {path: get_module(skeleton, path) for path in paths}


def load_model(cfg: ModelConfig, vocab_size: int, device: torch.device) -> nn.Module:
    """The model in eval mode with gradients off, on ``device`` (or placed by ``cfg.device_map``)."""
    dtype = getattr(torch, cfg.dtype.value if hasattr(cfg.dtype, "value") else cfg.dtype)
    if cfg.random_init is not None:
        if cfg.device_map is not None:
            raise UserError(f"model '{cfg.name}': model.device_map needs weights to load (name_or_path), not random_init")
        torch.manual_seed(cfg.random_init.seed)
        model = AutoModelForCausalLM.from_config(model_config(cfg, vocab_size)).to(dtype)
    else:
        source = resolve_name_or_path(_require_path(cfg))
        placement = {} if cfg.device_map is None else {"device_map": cfg.device_map}
        try:
            model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **placement)
        except (OSError, ValueError) as e:
            raise UserError(f"model '{cfg.name}': cannot load weights from '{source}': {e}") from None
    if cfg.device_map is None:
        model.to(device)
    model.eval()
    model.requires_grad_(False)
    return model


def input_device(model: nn.Module) -> torch.device:
    """Where input ids go: the embedding's device (the first GPU of a model spread by device_map)."""
    return model.get_input_embeddings().weight.device


# --- module paths ---------------------------------------------------------------------------------


def _dotted(path: str) -> str:
    return re.sub(r"\[(\d+)\]", r".\1", path)


def _bracketed(name: str) -> str:
    return re.sub(r"\.(\d+)(?=\.|$)", r"[\1]", name)


def get_module(model: nn.Module, path: str) -> nn.Module:
    """``model.layers[27].mlp.down_proj`` (or ``model.layers.27.mlp.down_proj``) -> that module."""
    dotted = _dotted(path)
    try:
        return model.get_submodule(dotted)
    except AttributeError:
        names = [n for n, _ in model.named_modules() if n]
        near = difflib.get_close_matches(dotted, names, n=6, cutoff=0.5)
        hint = ", ".join(_bracketed(n) for n in near) or ", ".join(_bracketed(n) for n in names[:8])
        raise UserError(f"unknown module path '{path}' in {type(model).__name__}; nearby names: {hint}") from None


def set_module(model: nn.Module, path: str, module: nn.Module) -> None:
    """Put ``module`` where ``path`` points (how side memories and adapters replace a layer)."""
    parent, _, name = _dotted(path).rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, name, module)


def linear_weight(module: nn.Module) -> torch.Tensor:
    """The weight of a linear map in (out_features, in_features) layout, as a view.

    GPT-2's Conv1D stores its weight transposed (in, out); nn.Linear stores (out, in).
    """
    if isinstance(module, Conv1D):
        return module.weight.T
    if isinstance(module, nn.Linear):
        return module.weight
    raise UserError(f"expected a linear layer (nn.Linear or Conv1D), found {type(module).__name__}")
