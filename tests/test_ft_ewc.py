import torch
from omegaconf import OmegaConf

from wise_bench.config import DataFormat
from wise_bench.data import Request
from wise_bench.methods import METHODS, EditContext
from wise_bench.methods.ft import FT
from wise_bench.methods.ft_ewc import FTEWCConfig, ewc_penalty
from wise_bench.metrics import Evaluator

LAYER = "model.layers[1].mlp.down_proj"
REQS = [
    Request(prompt="The capital of Atlantis is", target_new="Zor", loc_prompt="nq question: sky", loc_answer="blue", index=0),
    Request(prompt="Who painted the Moon Rose?", target_new="Ada Quill", loc_prompt="nq question: sea", loc_answer="salty", index=1),
    Request(prompt="Name the tallest tower of the old harbour city", target_new="Qel", loc_prompt="nq question: grass",
            loc_answer="green", index=2),
]


def make(tiny, **overrides):
    model, tok = tiny
    cfg = OmegaConf.merge(OmegaConf.structured(FTEWCConfig), {"name": "ft_ewc", "layer": LAYER, "steps": 30, **overrides})
    return METHODS["ft_ewc"](cfg, model, EditContext(tok, [], torch.device("cpu"), 0))


def rel(tiny, indices):
    model, tok = tiny
    ev = Evaluator(tok, REQS, DataFormat.zsre, ["rel"], batch_size=4)
    ev.loc_before = {}  # only rel is asked for
    return [r["rel"] for r in ev.score(model, indices)]


def test_penalty_is_fisher_weighted_squared_distance():
    w, anchor, fisher = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([1.0, 0.0, 1.0]), torch.tensor([5.0, 0.5, 0.25])
    assert ewc_penalty(w, fisher, anchor).item() == 0.5 * 4 + 0.25 * 4


def test_fisher_is_the_mean_squared_gradient_of_remembered_edits(tiny):
    method = make(tiny)
    method.memory.extend(method.encode(REQS[:2]))
    expected = torch.zeros_like(method.weight)
    method.weight.requires_grad_(True)
    try:
        for r in REQS[:2]:
            (grad,) = torch.autograd.grad(FT._loss_fn(method, [r])(), method.weight)
            expected += grad.pow(2) / 2
    finally:
        method.weight.requires_grad_(False)
    assert torch.allclose(method.fisher_diagonal(), expected)
    assert not method.weight.requires_grad


def test_fisher_accumulates_in_float32_on_a_bf16_model(tiny):
    import copy

    model, tok = tiny
    method = make((copy.deepcopy(model).to(torch.bfloat16), tok))
    method.memory.extend(method.encode(REQS[:2]))
    fisher = method.fisher_diagonal()
    # Squared gradients of a random model are ~1e-8 and below: a bf16 sum would round them.
    assert fisher.dtype == torch.float32 and method.weight.dtype == torch.bfloat16 and fisher.sum() > 0


def test_one_edit_reaches_its_target_and_restore_is_exact(tiny):
    model, _ = tiny
    before = {k: v.clone() for k, v in model.state_dict().items()}
    method = make(tiny)
    try:
        stats = method.edit([REQS[0]])
        assert rel(tiny, [0])[0] >= 0.9 and "ewc_penalty" not in stats  # nothing to consolidate yet
    finally:
        method.restore()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not method.memory


def test_penalty_holds_weights_important_to_earlier_edits(tiny):
    # The penalty pulls towards the anchor only where the Fisher is large, so compare the Fisher-
    # weighted drift of the second edit with and without it.
    drift = {}
    for lam in (0.0, 1e6):
        method = make(tiny, ewc_lambda=lam, memory=1)
        try:
            method.edit([REQS[0]])
            anchor = method.weight.detach().clone()
            fisher = method.fisher_diagonal()
            stats = method.edit([REQS[1]])
            assert "ewc_penalty" in stats and list(method.memory) == method.encode([REQS[1]])  # the last 1 only
            drift[lam] = ewc_penalty(method.weight, fisher, anchor).item()
        finally:
            method.restore()
    assert drift[1e6] < 0.5 * drift[0.0]


def test_sequential_edits_persist_and_state_round_trips_through_a_weights_only_file(tiny, tmp_path):
    method = make(tiny)
    try:
        method.edit([REQS[0]])
        method.edit([REQS[1]])
        assert min(rel(tiny, [0, 1])) >= 0.5
        torch.save(method.state_dict(), tmp_path / "state.pt")
        method.restore()
        assert max(rel(tiny, [0, 1])) < 0.5 and not method.memory
        method.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
        assert min(rel(tiny, [0, 1])) >= 0.5 and list(method.memory) == method.encode(REQS[:2])
    finally:
        method.restore()


def test_batch_edit_takes_several_requests(tiny):
    method = make(tiny, steps=40)
    try:
        method.edit(REQS[:2])
        assert min(rel(tiny, [0, 1])) >= 0.5
    finally:
        method.restore()
