import pytest
import torch
from omegaconf import OmegaConf
from test_wise import REQS  # the same three requests

from wise_bench.errors import UserError
from wise_bench.generation import greedy_batch
from wise_bench.loop import prepare
from wise_bench.methods import METHODS, EditContext
from wise_bench.methods.memoir import (
    MemoirConfig,
    mean_over,
    overlaps,
    pack_masks,
    route,
    threshold_above,
    tophash,
    unpack_masks,
)
from wise_bench.metrics import TokenBatch, encode_pair

LAYER = "model.layers[3].mlp.down_proj"  # tiny_random: FFN width 128
TRAIN = ["nq question: boiling point of water 100 degrees", "nq question: capital of france Paris", "a b c"]
FAST = {"n_iter": 5, "context_templates": 1, "template_lengths": [3], "top_k": 32, "tau": 0.6, "edit_lr": 3.0}


@pytest.fixture
def make(tiny):
    """make(**overrides) -> a MEMOIR method on the shared tiny model; every one is restored afterwards."""
    made = []

    def _make(**overrides):
        model, tok = tiny
        cfg = OmegaConf.merge(OmegaConf.structured(MemoirConfig), {"name": "memoir", "layer": LAYER, **FAST, **overrides})
        method = METHODS["memoir"](cfg, model, EditContext(tok, TRAIN, torch.device("cpu"), 0))
        made.append(method)
        return method

    yield _make
    for method in made:
        method.restore()


def test_tophash_takes_the_top_k_distance_from_background_then_permutes():
    features = torch.tensor([[1.0, 5.0, 0.0, -4.0, 2.0, 0.5]])
    background = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    # |f - bg| = [0, 4, 1, 5, 1, 0.5]: the top 2 are units 3 and 1
    permutation = torch.tensor([5, 4, 3, 2, 1, 0])  # unit i -> column 5 - i
    mask = tophash(features, background, 2, permutation)
    assert mask.tolist() == [[False, False, True, False, True, False]]  # columns 2 (from 3) and 4 (from 1)


def test_mean_over_counts_only_the_given_positions():
    x = torch.tensor([[[1.0, 0.0], [3.0, 2.0], [5.0, 4.0]]])
    assert mean_over(x, torch.tensor([[False, True, True]])).tolist() == [[4.0, 3.0]]


def test_overlap_routing_and_threshold():
    bank = torch.tensor([[1, 1, 0, 0, 0, 0], [0, 0, 1, 1, 0, 0]], dtype=torch.bool)
    queries = torch.tensor([[1, 1, 0, 0, 0, 0], [0, 1, 1, 0, 0, 0], [0, 0, 0, 0, 1, 1]], dtype=torch.bool)
    o = overlaps(queries, bank, k=2)
    assert o.tolist() == [[1.0, 0.0], [0.5, 0.5], [0.0, 0.0]]
    assert route(o, 0.5).tolist() == [0, 0, -1]  # a tie goes to the first stored mask
    assert route(o, 0.6).tolist() == [0, -1, -1]
    assert overlaps(queries, bank, k=2, chunk=1).tolist() == o.tolist()  # the bank in chunks


def test_masks_pack_into_bits_and_back():
    masks = torch.rand(5, 13, generator=torch.Generator().manual_seed(0)) < 0.3
    packed = pack_masks(masks)
    assert packed.dtype == torch.uint8 and packed.shape == (5, 2)
    assert torch.equal(unpack_masks(packed, 13), masks)


def test_threshold_is_the_next_hundredth_above_the_largest_value():
    assert threshold_above(torch.tensor([0.2, 0.38])) == 0.39
    assert threshold_above(torch.tensor([0.4])) == 0.41
    assert threshold_above(torch.tensor([0.995])) == 1.0


def run_logits(model, tok, pairs):
    batch = TokenBatch.build([encode_pair(tok, p, t) for p, t in pairs], tok.pad_token_id, "cpu")
    with torch.no_grad():
        return batch.logits(model), batch


def test_edit_routes_its_own_prompt_and_leaves_unrelated_ones_exactly_alone(tiny, make):
    model, tok = tiny
    unrelated = [("nq question: who wrote hamlet", "William Shakespeare")]
    before, _ = run_logits(model, tok, [(REQS[0].prompt, REQS[0].target_new), *unrelated])
    method = make(tau=1.0)  # only an identical prompt mask routes
    method.edit([REQS[0]])
    after, _ = run_logits(model, tok, [(REQS[0].prompt, REQS[0].target_new), *unrelated])
    assert not torch.allclose(after[0], before[0])
    assert torch.equal(after[1], before[1])
    # the target tokens do not change the route: another target under the same prompt is routed too
    other_target = [(REQS[0].prompt, "something else entirely")]
    other, _ = run_logits(model, tok, other_target)
    method.restore()
    assert not torch.allclose(other, run_logits(model, tok, other_target)[0])


def test_batched_evaluation_equals_one_sequence_at_a_time(tiny, make):
    model, tok = tiny
    method = make(tau=0.75)
    method.edit([REQS[0]])
    method.edit([REQS[1]])
    pairs = [(r.prompt, r.target_new) for r in REQS] + [(r.rephrase_prompt, r.target_new) for r in REQS] + [("a", "b c d e f g")]
    batched, batch = run_logits(model, tok, pairs)
    routed = method.layer.routed
    assert routed is not None and 0 < int((routed.sum(-1) > 0).sum()) < len(pairs)  # some rows routed, not all
    for row, pair in enumerate(pairs):
        alone, _ = run_logits(model, tok, [pair])
        real = batch.attention_mask[row].bool()
        assert torch.allclose(batched[row][real], alone[0], atol=1e-5), pair


def test_generation_keeps_the_prompt_routing_through_the_kv_cache(tiny, make):
    model, tok = tiny
    method = make(tau=0.75, n_iter=60)
    method.edit([REQS[0]])
    prompts = [list(tok(r.prompt)["input_ids"]) for r in REQS]
    together = greedy_batch(model, tok, prompts, 6, [], set())
    # Every decode step after the first needs the residual too: routed by its one new token instead
    # of the prompt, this model answers "Z`\rc'c" (measured).
    assert together[0].startswith("Zor")
    assert together == [greedy_batch(model, tok, [p], 6, [], set())[0] for p in prompts]
    method.restore()
    assert not greedy_batch(model, tok, prompts[:1], 6, [], set())[0].startswith("Z")


def test_weight_decay_shrinks_earlier_columns_and_masks_are_stored_once(make):
    method = make(weight_decay=0.01, edit_lr=1.0)
    method.edit([REQS[0]])
    memory = method.layer.memory
    first = memory.weight.clone()
    second_mask = method.prompt_masks([encode_pair(method.ctx.tokenizer, REQS[1].prompt, REQS[1].target_new)])[0]
    stats = method.edit([REQS[1]])
    outside = ~second_mask  # columns the second edit's gradient never reaches
    shrink = (1 - 0.01) ** stats["steps"]
    assert torch.allclose(memory.weight[:, outside], first[:, outside] * shrink, atol=1e-7)
    assert stats["decay"] == pytest.approx((1 - 0.01) ** memory.steps)
    assert len(memory.bank) == 2
    method.edit([REQS[0]])
    assert len(memory.bank) == 2  # the same prompt, the same mask


def test_state_dict_holds_the_memory_and_a_fresh_method_answers_the_same(tiny, make):
    model, tok = tiny
    method = make()
    method.edit([REQS[0]])
    method.edit([REQS[1]])
    state = method.state_dict()
    assert set(state) >= {"weight", "permutation", "bank", "background"}
    edited, _ = run_logits(model, tok, [(r.prompt, r.target_new) for r in REQS])
    method.restore()
    fresh = make()
    fresh.load_state_dict(state)
    assert torch.equal(fresh.layer.memory.permutation, state["permutation"])
    assert torch.equal(run_logits(model, tok, [(r.prompt, r.target_new) for r in REQS])[0], edited)


@pytest.mark.parametrize("override, message", [("method.tau=0", "tau"), ("method.tau=1.5", "tau"), ("method.top_k=129", "top_k")])
def test_bad_tau_or_top_k_fails_before_the_model_loads(compose, data_dir, monkeypatch, override, message):
    def no_weights(*_a, **_k):
        raise AssertionError("weights loaded")

    monkeypatch.setattr("wise_bench.loop.load_model", no_weights)
    with pytest.raises(UserError, match=message):
        prepare(compose(["method=memoir", f"data_dir={data_dir}", "num_edits=2", override]))


def test_calibrated_tau_is_just_above_the_best_irrelevant_overlap(make):
    method = make(top_k=40)
    result = METHODS["memoir"].calibrate(method.cfg, method.model, method.ctx, REQS)
    assert method.layer is None  # calibration leaves the model unedited
    # by hand: the bank is the edit prompts' masks; each locality prompt's best overlap with it
    tok = method.ctx.tokenizer
    bank = method.prompt_masks([encode_pair(tok, r.prompt, r.target_new) for r in REQS])
    locs = method.prompt_masks([encode_pair(tok, r.loc_prompt, r.loc_answer) for r in REQS])
    sets = [set(m.nonzero()[:, 0].tolist()) for m in bank]
    best = max(max(len(set(q.nonzero()[:, 0].tolist()) & s) for s in sets) for q in locs) / 40
    assert 0 < best < 1
    assert result.values == {"memoir_tau": pytest.approx(int(best * 100 + 1e-6) / 100 + 0.01)}
    assert result.measured["irrelevant_best_overlap_max"] == pytest.approx(best)


def test_a_batch_step_edits_its_requests_one_after_the_other(make):
    together = make()
    together.edit(REQS[:2])
    state = together.state_dict()
    together.restore()
    apart = make()
    apart.edit(REQS[:1])
    apart.edit(REQS[1:2])
    assert torch.equal(apart.state_dict()["weight"], state["weight"])
    assert torch.equal(apart.state_dict()["bank"], state["bank"])


def test_gpt2_conv1d_layer(tiny):
    """GPT-2's Conv1D stores its weight as (in, out): the residual memory still has the (out, in) shape
    of the map, keeps the layer's bias, and an edit changes only its own prompt's outputs."""
    from transformers import GPT2Config, GPT2LMHeadModel

    _, tok = tiny
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=4, n_embd=32, n_head=2, n_positions=128, vocab_size=len(tok)))
    gpt2 = gpt2.eval().requires_grad_(False)
    layer = "transformer.h[2].mlp.c_proj"  # Conv1D, 128 -> 32
    cfg = OmegaConf.merge(OmegaConf.structured(MemoirConfig), {"name": "memoir", "layer": layer, **FAST, "tau": 1.0, "n_iter": 10})
    pairs = [(REQS[0].prompt, REQS[0].target_new), (REQS[1].prompt, REQS[1].target_new)]
    before, _ = run_logits(gpt2, tok, pairs)
    method = METHODS["memoir"](cfg, gpt2, EditContext(tok, TRAIN, torch.device("cpu"), 0))
    try:
        method.edit([REQS[0]])
        assert method.layer.memory.weight.shape == (32, 128)
        after, _ = run_logits(gpt2, tok, pairs)
        assert not torch.allclose(after[0], before[0]) and torch.equal(after[1], before[1])
    finally:
        method.restore()
