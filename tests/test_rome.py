"""ROME on the tiny random model.

Documented behaviour on a *random* tiny model: a δ at the subject's last token reaches later
positions only through near-uniform random attention, so the edit does not make the new target the
argmax (Rel stays ~0; measured on the trained `tiny` model too, see docs/locate_edit.md). The tests
therefore check what ROME defines: the rank-one update maps k* to v* = W k* + δ, touches one
matrix, and restores exactly.
"""
import pytest
import torch
from omegaconf import OmegaConf
from transformers import GPT2Config, GPT2LMHeadModel

import wise_bench.methods.rome as rome
from wise_bench.data import Request
from wise_bench.methods import METHODS, EditContext
from wise_bench.methods.rome import ROMEConfig, encode_at, locate, rank_one_update, template_average
from wise_bench.models import get_module, linear_weight

LAYER = "model.layers[1].mlp.down_proj"
CORPUS = [f"nq question: who wrote book number {i} about {w}" for i, w in enumerate(["rivers", "kings", "stars", "cats", "maps"])]
REQS = [
    Request(prompt="The capital of Atlantis is", target_new="Zor", subject="Atlantis", loc_prompt="nq question: sky", loc_answer="blue", index=0),
    Request(prompt="Who painted the Moon Rose?", target_new="Ada Quill", subject="the Moon Rose", loc_prompt="nq question: sea", loc_answer="salty", index=1),
]
SMALL = dict(context_templates=2, context_template_length=3, v_steps=8, v_lr=0.5, mom2_dataset="train_texts")


def make(model, tok, tmp_path, layer=LAYER, **overrides):
    cfg = OmegaConf.merge(OmegaConf.structured(ROMEConfig), {"name": "rome", "layer": layer, "stats_dir": str(tmp_path), **SMALL, **overrides})
    return METHODS["rome"](cfg, model, EditContext(tok, CORPUS, torch.device("cpu"), 0))


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_same(model, before):
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.fixture
def deltas(monkeypatch):
    """The δ of every request ROME edits, in order, as compute_delta returned it to the method."""
    found = []
    real = rome.compute_delta

    def recording(*args, **kwargs):
        delta, stats = real(*args, **kwargs)
        found.append(delta.clone())
        return delta, stats

    monkeypatch.setattr(rome, "compute_delta", recording)
    return found


def assert_moves_key_by(change: torch.Tensor, delta: torch.Tensor) -> None:
    """``change`` (what the edit did to the layer's output at k*) is δ: its direction and its length.

    A norm alone would pass −δ (a sign error) or δ read through the wrong axis of the weight.
    """
    change, delta = change.double(), delta.double()
    cosine = torch.nn.functional.cosine_similarity(change, delta, dim=0).item()
    relative_norm_error = abs(change.norm() - delta.norm()).item() / delta.norm().item()
    assert cosine > 0.999, f"the layer's output at k* moved in another direction than δ (cosine {cosine:.4f})"
    assert relative_norm_error < 1e-3, f"the layer's output at k* moved by {relative_norm_error:.2%} more or less than ‖δ‖"


def output_at(module, k: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return module(k.to(linear_weight(module).dtype)).float()


def test_rank_one_update_maps_the_key_to_the_value():
    g = torch.Generator().manual_seed(0)
    W, k, v, x = torch.randn(5, 7, generator=g), torch.randn(7, generator=g), torch.randn(5, generator=g), torch.randn(7, generator=g)
    C = torch.randn(7, 7, generator=g)
    C = C @ C.T + torch.eye(7)
    for u in (k, torch.linalg.solve(C, k)):
        dW = rank_one_update(W, k, v, u)
        torch.testing.assert_close((W + dW) @ k, v)
        assert torch.linalg.matrix_rank(dW) == 1
        x_orth = x - (u @ x) / (u @ u) * u  # keys orthogonal to u are untouched
        torch.testing.assert_close(dW @ x_orth, torch.zeros(5), atol=1e-5, rtol=0)


def test_the_key_check_rejects_a_wrong_sign_axis_or_length():
    g = torch.Generator().manual_seed(0)
    delta = torch.randn(64, generator=g)
    assert_moves_key_by(delta * (1 + 1e-5), delta)
    for wrong in (-delta, delta.flip(0), delta.roll(1), 1.01 * delta):  # sign; permuted axis (same norm); length
        with pytest.raises(AssertionError):
            assert_moves_key_by(wrong, delta)


@pytest.mark.parametrize("mom2_adjustment", [True, False])
def test_edit_is_a_rank_one_map_of_k_star_and_restore_is_exact(tiny, tmp_path, deltas, mom2_adjustment):
    model, tok = tiny
    before = snapshot(model)
    # No weight decay: on the random model the target NLL moves by ~1e-2, less than the decay term.
    method = make(model, tok, tmp_path, mom2_adjustment=mom2_adjustment, v_weight_decay=0.0)
    assert (method.mom2 is not None) == mom2_adjustment
    W0 = method.weight.detach().clone()
    located, _ = locate([REQS[0]], "skip")
    k = template_average(model, tok, located, method.templates, [(method.module, "input")])[0][0]
    v_before = output_at(method.module, k)
    try:
        stats = method.edit([REQS[0]])
        assert stats["skipped_missing_subject"] == 0 and stats["steps"] >= 1
        assert stats["nll"] < stats["nll_start"]  # δ lowers the target NLL
        (delta,) = deltas
        assert delta.norm().item() == pytest.approx(stats["delta_norm"]) and stats["delta_norm"] > 0
        assert_moves_key_by(output_at(method.module, k) - v_before, delta)  # the layer now sends k* to W k* + δ
        dW = method.weight.detach() - W0
        assert torch.linalg.matrix_rank(dW) == 1
        changed = [name for name, v in model.state_dict().items() if not torch.equal(v, before[name])]
        assert changed == ["model.layers.1.mlp.down_proj.weight"]
    finally:
        method.restore()
    assert_same(model, before)


def test_sequential_edits_persist_and_state_round_trips(tiny, tmp_path):
    model, tok = tiny
    before = snapshot(model)
    method = make(model, tok, tmp_path, mom2_adjustment=False)
    try:
        method.edit([REQS[0]])
        after_one = method.weight.detach().clone()
        method.edit([REQS[1]])
        assert not torch.equal(method.weight, after_one)
        assert torch.linalg.matrix_rank(method.weight.detach() - method.original_weights[0]) == 2  # both updates are kept
        state = method.state_dict()
        method.restore()
        assert_same(model, before)
        method.load_state_dict(state)
        assert torch.equal(method.weight, state["weights"][0])
    finally:
        method.restore()
    assert_same(model, before)


def test_missing_subject_is_skipped_or_edited_at_the_last_token(tiny, tmp_path, caplog, deltas):
    model, tok = tiny
    before = snapshot(model)
    missing = [Request(prompt="Who founded Apple?", target_new="Zed", subject="Microsoft", loc_prompt="q", loc_answer="a", index=7),
               Request(prompt="Who founded Apple?", target_new="Zed", subject=None, loc_prompt="q", loc_answer="a", index=8)]
    method = make(model, tok, tmp_path, mom2_adjustment=False)
    stats = method.edit(missing)
    assert stats == {"skipped_missing_subject": 2}
    assert "request 7: subject 'Microsoft' not in prompt" in caplog.text
    assert_same(model, before)
    # A case difference is not a missing subject.
    assert locate([Request(prompt="who founded apple?", target_new="x", subject="Apple", loc_prompt="q", loc_answer="a")], "skip")[1] == 0

    method = make(model, tok, tmp_path, mom2_adjustment=False, on_missing_subject="last_token")
    located, n_missing = locate(missing, "last_token")
    assert n_missing == 2 and [loc.subject_end for loc in located] == [len("Who founded Apple?")] * 2
    enc, pos = encode_at(tok, located[0].request.prompt, located[0].subject_end)
    assert pos == len(enc.ids) - 1
    # Both requests have one prompt, so one key k* (at its last token): the two updates add up there.
    k = template_average(model, tok, located[:1], method.templates, [(method.module, "input")])[0][0]
    v_before = output_at(method.module, k)
    try:
        stats = method.edit(missing)
        assert stats["skipped_missing_subject"] == 2 and stats["steps"] >= 1 and len(deltas) == 2
        assert_moves_key_by(output_at(method.module, k) - v_before, deltas[0] + deltas[1])
    finally:
        method.restore()
    assert_same(model, before)


def test_gpt2_conv1d_layer(tmp_path, deltas):
    """GPT-2 stores c_proj transposed (Conv1D); the update goes through the (out, in) view.

    Layer 1 of 3: a δ in the last layer could not reach the target positions (zero gradient).
    """
    from wise_bench.models import byte_level_tokenizer

    tok = byte_level_tokenizer()
    tok.padding_side = "left"
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=3, n_head=2, n_positions=128,
                                       pad_token_id=0, bos_token_id=1, eos_token_id=2)).eval()
    model.requires_grad_(False)
    layer = "transformer.h[1].mlp.c_proj"
    before = snapshot(model)
    method = make(model, tok, tmp_path, layer=layer)
    module = get_module(model, layer)
    assert method.weight.shape == (32, 128) and module.weight.shape == (128, 32)
    W0 = linear_weight(module).detach().clone()
    located, _ = locate([REQS[0]], "skip")
    k = template_average(model, tok, located, method.templates, [(module, "input")])[0][0]
    v_before = output_at(module, k)
    try:
        method.edit([REQS[0]])
        # Through the module's own forward (x W + b on the (in, out) storage), not the (out, in) view.
        assert_moves_key_by(output_at(module, k) - v_before, deltas[0])
        dW = linear_weight(module).detach() - W0
        assert torch.linalg.matrix_rank(dW) == 1
        changed = [name for name, v in model.state_dict().items() if not torch.equal(v, before[name])]
        assert changed == ["transformer.h.1.mlp.c_proj.weight"]
    finally:
        method.restore()
    assert_same(model, before)
