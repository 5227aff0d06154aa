import pytest
import torch
from omegaconf import OmegaConf

from wise_bench.config import DataFormat
from wise_bench.data import Request
from wise_bench.methods import METHODS, EditContext
from wise_bench.methods.grace import Codebook, GRACEConfig, layer_inputs
from wise_bench.metrics import Evaluator, TokenBatch, encode_pair
from wise_bench.models import get_module

LAYER = "model.layers[3].mlp.down_proj"
# Single-byte targets: at the last layer of the tiny model, the value replaced at the last prompt
# token reaches only that position's logits (docs/baselines.md). Prompts of different lengths.
REQS = [
    Request(prompt="The capital of Atlantis is", target_new="Z", loc_prompt="nq question: sky", loc_answer="blue",
            rephrase_prompt="Atlantis has its capital in", index=0),
    Request(prompt="Who painted the Moon Rose?", target_new="A", loc_prompt="nq question: sea", loc_answer="salty",
            rephrase_prompt="The Moon Rose was painted by", index=1),
    Request(prompt="Name the tallest tower of the old harbour city", target_new="Q", loc_prompt="nq question: grass",
            loc_answer="green", rephrase_prompt="The old harbour city's tallest tower is", index=2),
]
# The tiny random model's layer inputs are ~0.15 apart, so the radius is scaled down from 1.0.
EPS = 0.02


def make(tiny, **overrides):
    model, tok = tiny
    cfg = OmegaConf.merge(OmegaConf.structured(GRACEConfig), {"name": "grace", "layer": LAYER, "eps_init": EPS, **overrides})
    return METHODS["grace"](cfg, model, EditContext(tok, [], torch.device("cpu"), 0))


def evaluator(tiny, batch_size=4):
    """An evaluator whose locality reference is the model as it is now (call it before editing)."""
    model, tok = tiny
    ev = Evaluator(tok, REQS, DataFormat.zsre, ["rel", "gen", "loc", "ppl"], batch_size=batch_size)
    ev.record_unedited_locality(model)
    return ev


# --- codebook rules on hand-made keys ---------------------------------------------------------------


def book(*entries):
    cb = Codebook.empty(2, 1, "cpu")
    for key, eps, label in entries:
        cb.add(torch.tensor(key), torch.zeros(1), eps, label)
    return cb


def test_far_key_adds_an_entry_with_the_initial_radius():
    cb = book(([0.0, 0.0], 1.0, "a"))
    assert cb.insert(torch.tensor([2.5, 0.0]), "b", 1.0, torch.ones(1)) == (1, "new")
    assert cb.eps.tolist() == [1.0, 1.0] and cb.labels == ["a", "b"]
    assert cb.values[1].tolist() == [1.0]


def test_near_key_with_another_label_splits_both_radii():
    cb = book(([0.0, 0.0], 1.0, "a"))
    assert cb.insert(torch.tensor([1.5, 0.0]), "b", 1.0, torch.ones(1)) == (1, "split")
    assert cb.eps.tolist() == pytest.approx([0.75 - 1e-5, 0.75])
    dist, idx = cb.nearest(torch.tensor([[0.7, 0.0], [0.8, 0.0], [2.4, 0.0]]))
    assert idx.tolist() == [0, 1, 1]
    assert (dist <= cb.eps[idx]).tolist() == [True, True, False]


def test_near_key_with_the_same_label_expands_its_radius():
    cb = book(([0.0, 0.0], 1.0, "a"))
    assert cb.insert(torch.tensor([0.0, 1.5]), "a", 1.0, torch.ones(1)) == (0, "expand")
    assert len(cb) == 1 and cb.eps.tolist() == [1.5]
    assert cb.insert(torch.tensor([0.0, 0.5]), "a", 1.0, torch.ones(1)) == (0, "expand")
    assert cb.eps.tolist() == [1.5]  # never shrinks


def test_the_same_key_with_a_new_label_routes_to_the_newest_entry():
    cb = book(([0.0, 0.0], 1.0, "a"))
    assert cb.insert(torch.tensor([0.0, 0.0]), "b", 1.0, torch.ones(1)) == (1, "split")
    dist, idx = cb.nearest(torch.zeros(1, 2))
    assert idx.tolist() == [1] and bool(dist[0] <= cb.eps[1])


# --- on the tiny model ----------------------------------------------------------------------------


def test_one_edit_reaches_its_target_only_there_and_restore_is_exact(tiny):
    model, _ = tiny
    before = {k: v.clone() for k, v in model.state_dict().items()}
    original = get_module(model, LAYER)
    ev = evaluator(tiny)
    pre = ev.score(model, [0])[0]
    method = make(tiny)
    try:
        stats = method.edit([REQS[0]])
        post = ev.score(model, [0])[0]
        assert pre["rel"] == 0.0 and post["rel"] == 1.0 and stats["keys"] == 1
        assert post["gen"] == pre["gen"] and post["loc"] == 1.0  # paraphrase and loc text not routed
    finally:
        method.restore()
    assert get_module(model, LAYER) is original and not model._forward_pre_hooks
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(v, before[k]) for k, v in after.items())


def test_sequential_edits_persist_and_state_round_trips(tiny):
    model, _ = tiny
    ev = evaluator(tiny)
    method = make(tiny, n_iter=30)
    try:
        unedited = ev.score(model, [0, 1, 2])
        method.edit([REQS[0]])
        method.edit([REQS[1]])
        edited = ev.score(model, [0, 1, 2])
        assert [r["rel"] for r in edited[:2]] == [1.0, 1.0]
        assert edited[2] == unedited[2]  # a request that was not edited is untouched
        state = method.state_dict()
        method.restore()
        assert ev.score(model, [0, 1, 2]) == unedited
        method.load_state_dict(state)
        assert ev.score(model, [0, 1, 2]) == edited
    finally:
        method.restore()


def test_resume_from_a_saved_state_edits_exactly_like_an_uninterrupted_run(tiny):
    # The cold value of a new entry comes from the method's generator: a resumed run must continue
    # its draws, not restart them from the seed.
    method = make(tiny, n_iter=0)  # no training: the stored values are the cold draws themselves
    try:
        method.edit([REQS[0]])
        state = method.state_dict()
        method.edit([REQS[1]])
        uninterrupted = method.codebook.values.clone()
        method.restore()
        method.load_state_dict(state)
        method.edit([REQS[1]])
        assert torch.equal(method.codebook.values, uninterrupted)
        assert not torch.equal(uninterrupted[0], uninterrupted[1])
    finally:
        method.restore()


def test_batch_edit_takes_several_requests(tiny):
    ev = evaluator(tiny)
    method = make(tiny, n_iter=30)
    try:
        stats = method.edit(REQS[:2])
        assert stats["keys"] == 2
        assert [r["rel"] for r in ev.score(tiny[0], [0, 1])] == [1.0, 1.0]
    finally:
        method.restore()


@pytest.mark.parametrize("replacement", ["replace_last", "replace_prompt", "replace_all"])
def test_batched_evaluation_equals_one_at_a_time(tiny, replacement):
    # Left padding differs with the batch's longest text; routing must ignore it. A wide radius
    # makes many positions route, and a key planted on a padding position's input must not route.
    model, tok = tiny
    by_batch, by_one = evaluator(tiny, batch_size=8), evaluator(tiny, batch_size=1)
    method = make(tiny, n_iter=2, eps_init=0.2, replacement=replacement)
    try:
        method.edit([REQS[0]])
        method.edit([REQS[2]])
        padded = TokenBatch.build([encode_pair(tok, r.loc_prompt, r.loc_answer) for r in (REQS[1], REQS[2])], tok.pad_token_id, "cpu")
        pad_input = layer_inputs(model, method.original, padded)[0, 0]
        method.codebook.add(pad_input, torch.full((method.codebook.values.shape[1],), 50.0), 1e-3, "padding")
        batched, alone = by_batch.score(model, [0, 1, 2]), by_one.score(model, [0, 1, 2])
        assert [{k: v for k, v in r.items() if k != "ppl"} for r in batched] == [
            {k: v for k, v in r.items() if k != "ppl"} for r in alone]
        assert [r["ppl"] for r in batched] == pytest.approx([r["ppl"] for r in alone], rel=1e-4)
    finally:
        method.restore()
