import pytest
import torch
from omegaconf import OmegaConf

from wise_bench.config import DataFormat
from wise_bench.data import Request
from wise_bench.methods import METHODS, EditContext
from wise_bench.methods.defer import DEFERConfig
from wise_bench.metrics import Evaluator
from wise_bench.models import get_module

LAYER = "model.layers[3].mlp.down_proj"
REQS = [
    Request(prompt="The capital of Atlantis is", target_new="Zor", loc_prompt="nq question: sky", loc_answer="blue",
            rephrase_prompt="Atlantis has its capital in", index=0),
    Request(prompt="Who painted the Moon Rose?", target_new="Ada Quill", loc_prompt="nq question: sea", loc_answer="salty",
            rephrase_prompt="The Moon Rose was painted by", index=1),
    Request(prompt="Name the tallest tower of the old harbour city", target_new="Qel", loc_prompt="nq question: grass",
            loc_answer="green", rephrase_prompt="The old harbour city's tallest tower is", index=2),
]
IRRELEVANT = [f"{r.loc_prompt} {r.loc_answer}" for r in REQS]
# The reference lr (7e-5) barely moves the gate or V of a 64-wide random model (features ~0.01 per
# unit), so the tests train with a larger one; docs/baselines.md.
LR = 3e-2


def make(tiny, **overrides):
    model, tok = tiny
    cfg = OmegaConf.merge(OmegaConf.structured(DEFERConfig), {"name": "defer", "layer": LAYER, "lr": LR, "steps": 40, **overrides})
    return METHODS["defer"](cfg, model, EditContext(tok, IRRELEVANT, torch.device("cpu"), 0))


def evaluator(tiny, batch_size=4):
    """An evaluator whose locality reference is the model as it is now (call it before editing)."""
    model, tok = tiny
    ev = Evaluator(tok, REQS, DataFormat.zsre, ["rel", "gen", "loc", "ppl"], batch_size=batch_size)
    ev.record_unedited_locality(model)
    return ev


def test_one_edit_reaches_its_target_and_restore_is_exact(tiny):
    model, _ = tiny
    before = {k: v.clone() for k, v in model.state_dict().items()}
    original = get_module(model, LAYER)
    ev = evaluator(tiny)
    method = make(tiny)
    try:
        assert ev.score(model, [0])[0]["rel"] == 0.0
        method.edit([REQS[0]])
        assert ev.score(model, [0])[0]["rel"] >= 0.9
    finally:
        method.restore()
    assert get_module(model, LAYER) is original
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(v, before[k]) for k, v in after.items())


def test_reference_lr_leaves_the_tiny_model_nearly_unchanged(tiny):
    # Documented behaviour: at lr 7e-5 the tiny model's edit loss hardly moves.
    method = make(tiny, lr=7e-5, steps=10)
    try:
        stats = method.edit([REQS[0]])
        assert abs(stats["loss"] - stats["loss_start"]) < 0.1
    finally:
        method.restore()


def test_gate_negatives_keep_irrelevant_text_unchanged(tiny):
    # Trained on positives only (the reference), the gate opens on unrelated tokens too, where the
    # edited V then changes predictions; trained with the irrelevant text as negatives, it does not.
    model, _ = tiny
    ev = evaluator(tiny)
    locs = {}
    for negatives in (False, True):
        method = make(tiny, gate_negatives=negatives)
        try:
            method.edit([REQS[0]])
            row = ev.score(model, [0])[0]
            assert row["rel"] >= 0.9
            locs[negatives] = row["loc"]
        finally:
            method.restore()
    assert locs[True] == 1.0 and locs[False] < 1.0


def test_sequential_edits_persist_and_state_round_trips(tiny):
    model, _ = tiny
    ev = evaluator(tiny)
    method = make(tiny)
    try:
        unedited = ev.score(model, [0, 1])
        method.edit([REQS[0]])
        method.edit([REQS[1]])
        edited = ev.score(model, [0, 1])
        assert min(r["rel"] for r in edited) >= 0.5  # the first edit survives the second
        state = method.state_dict()
        method.restore()
        assert ev.score(model, [0, 1]) == unedited
        method.load_state_dict(state)
        assert ev.score(model, [0, 1]) == edited
    finally:
        method.restore()


def test_batch_edit_and_batched_evaluation(tiny):
    model, _ = tiny
    by_batch, by_one = evaluator(tiny, batch_size=8), evaluator(tiny, batch_size=1)
    method = make(tiny)
    try:
        method.edit(REQS[:2])
        batched, alone = by_batch.score(model, [0, 1, 2]), by_one.score(model, [0, 1, 2])
        assert min(r["rel"] for r in batched[:2]) >= 0.5
        assert [{k: v for k, v in r.items() if k != "ppl"} for r in batched] == [
            {k: v for k, v in r.items() if k != "ppl"} for r in alone]
        assert [r["ppl"] for r in batched] == pytest.approx([r["ppl"] for r in alone], rel=1e-4)
    finally:
        method.restore()
