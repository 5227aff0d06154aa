import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from wise_bench.config import ModelConfig, RandomInitConfig
from wise_bench.errors import UserError
from wise_bench.models import check_module_paths, get_module, linear_weight, resolve_name_or_path


def test_paths_as_papers_write_them(tiny):
    model, _ = tiny
    m = get_module(model, "model.layers[3].mlp.down_proj")
    assert m is model.model.layers[3].mlp.down_proj
    assert get_module(model, "model.layers.3.mlp.down_proj") is m


def test_unknown_path_lists_nearby_names(tiny):
    model, _ = tiny
    with pytest.raises(UserError) as e:
        get_module(model, "model.layers[3].mlp.down_prj")
    msg = str(e.value)
    assert "unknown module path 'model.layers[3].mlp.down_prj'" in msg
    assert "model.layers[3].mlp.down_proj" in msg.split("nearby names:")[1]


def test_paths_are_checked_without_loading_weights():
    cfg = ModelConfig(name="t", random_init=RandomInitConfig(num_hidden_layers=2))
    check_module_paths(cfg, 300, ["model.layers[1].mlp.down_proj"])
    with pytest.raises(UserError, match=r"unknown module path 'model.layers\[5\].mlp.down_proj'"):
        check_module_paths(cfg, 300, ["model.layers[5].mlp.down_proj"])


def test_linear_weight_is_out_by_in_for_linear_and_conv1d(tiny):
    model, _ = tiny
    down = model.model.layers[0].mlp.down_proj  # nn.Linear(128 -> 64)
    assert linear_weight(down).shape == (64, 128)
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=50, n_positions=64))
    c_proj = get_module(gpt2, "transformer.h[1].mlp.c_proj")  # Conv1D: 4*32 -> 32, stored (in, out)
    w = linear_weight(c_proj)
    assert w.shape == (32, 128)
    x = torch.randn(3, 128)
    assert torch.allclose(c_proj(x), x @ w.T + c_proj.bias, atol=1e-6)
    assert w.data_ptr() == c_proj.weight.data_ptr()  # a view: edits through it reach the model
    with pytest.raises(UserError, match="expected a linear layer"):
        linear_weight(get_module(gpt2, "transformer.h[1].mlp"))


def test_relative_model_paths_resolve_from_the_repo_root(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_name_or_path("conf").endswith("/conf") and resolve_name_or_path("conf").startswith("/")
    assert resolve_name_or_path("meta-llama/Llama-2-7b-hf") == "meta-llama/Llama-2-7b-hf"


def test_tiny_random_is_deterministic_and_tokenizer_pads_left(tiny):
    from wise_bench.models import load_model, load_tokenizer

    model, tok = tiny
    cfg = ModelConfig(name="tiny_random", random_init=RandomInitConfig())
    again = load_model(cfg, len(tok), torch.device("cpu"))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    assert load_tokenizer(cfg).padding_side == "left" and tok.pad_token_id is not None
