import pytest
import torch
from omegaconf import OmegaConf

from wise_bench.config import DataFormat
from wise_bench.data import Request
from wise_bench.methods import METHODS, EditContext
from wise_bench.methods.ft import FTConfig
from wise_bench.metrics import Evaluator

LAYER = "model.layers[1].mlp.down_proj"
REQS = [
    Request(prompt="The capital of Atlantis is", target_new="Zor", loc_prompt="nq question: sky", loc_answer="blue", index=0),
    Request(prompt="Who painted the Moon Rose?", target_new="Ada Quill", loc_prompt="nq question: sea", loc_answer="salty", index=1),
]


def make(tiny, name, **overrides):
    model, tok = tiny
    cfg = OmegaConf.merge(OmegaConf.structured(FTConfig), {"name": name, "layer": LAYER, "loss": "teacher_forced", **overrides})
    return METHODS[name](cfg, model, EditContext(tok, [], torch.device("cpu"), 0))


def rel(tiny, indices):
    model, tok = tiny
    ev = Evaluator(tok, REQS, DataFormat.zsre, ["rel"], batch_size=4)
    ev.record_unedited_locality(model)
    return [r["rel"] for r in ev.score(model, indices)]


@pytest.mark.parametrize("name, loss, lr", [("ft_m", "teacher_forced", 3e-2), ("ft_l", "prompt_last", 3e-2)])
def test_one_edit_reaches_its_target_and_restore_is_exact(tiny, name, loss, lr):
    model, _ = tiny
    before = {k: v.clone() for k, v in model.state_dict().items()}
    method = make(tiny, name, loss=loss, lr=lr, steps=30)
    assert rel(tiny, [0]) == [0.0]
    stats = method.edit([REQS[0]])
    try:
        if loss == "teacher_forced":
            assert rel(tiny, [0])[0] >= 0.9
        else:
            # FT-L puts every target token at the last prompt position; on a random model the final
            # RMSNorm bounds how peaked that distribution gets, so check that the loss clearly falls.
            assert stats["loss"] < stats["loss_start"] - 0.3
        changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
        assert changed == [LAYER.replace("[1]", ".1") + ".weight"]
    finally:
        method.restore()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_sequential_edits_persist_and_state_round_trips(tiny):
    method = make(tiny, "ft_m", lr=3e-2, steps=30)
    try:
        method.edit([REQS[0]])
        method.edit([REQS[1]])
        assert min(rel(tiny, [0, 1])) >= 0.5  # the first edit survives the second
        state = method.state_dict()
        method.restore()
        assert max(rel(tiny, [0, 1])) < 0.5
        method.load_state_dict(state)
        assert min(rel(tiny, [0, 1])) >= 0.5
    finally:
        method.restore()


def test_norm_constraint_bounds_the_change(tiny):
    model, _ = tiny
    method = make(tiny, "ft_m", lr=1e-1, steps=5, norm_constraint=1e-3)
    try:
        method.edit([REQS[0]])
        delta = (method.weight - method.original).abs().max().item()
        assert 0 < delta <= 1e-3 + 1e-7
    finally:
        method.restore()


def test_batch_edit_takes_several_requests(tiny):
    method = make(tiny, "ft_m", lr=3e-2, steps=40)
    try:
        method.edit(REQS)
        assert min(rel(tiny, [0, 1])) >= 0.5
    finally:
        method.restore()


@pytest.mark.parametrize("loss", ["teacher_forced", "prompt_last"])
def test_prefix_cache_gives_the_same_edit(tiny, loss):
    results = []
    for cached in (False, True):
        method = make(tiny, "ft_m", loss=loss, lr=3e-2, steps=8, prefix_cache=cached)
        try:
            stats = method.edit([REQS[0]])
            results.append((stats, method.weight.detach().clone()))
        finally:
            method.restore()
    (plain, w_plain), (fast, w_fast) = results
    assert plain["loss"] == pytest.approx(fast["loss"], abs=1e-5) and plain["steps"] == fast["steps"]
    assert torch.allclose(w_plain, w_fast, atol=1e-6)
