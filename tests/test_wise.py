import io
import json
import math

import pytest
import torch
from omegaconf import OmegaConf
from transformers import GPT2Config, GPT2LMHeadModel

from wise_bench.config import DataFormat
from wise_bench.data import Request
from wise_bench.errors import UserError
from wise_bench.loop import method_config, run
from wise_bench.merge import merge
from wise_bench.methods import METHODS, EditContext
from wise_bench.methods.side_memory import build_edit_batch, edit_nll, run_model, should_stop
from wise_bench.methods.wise import (
    WiseConfig,
    positive_mean,
    route_merge,
    route_retrieve,
    routing_losses,
    sequence_scores,
)
from wise_bench.metrics import Encoded, Evaluator, TokenBatch
from wise_bench.models import get_module

LAYER = "model.layers[3].mlp.down_proj"
REQS = [
    Request(prompt="The capital of Atlantis is", target_new="Zor", loc_prompt="nq question: sky", loc_answer="blue",
            rephrase_prompt="Atlantis has its capital in", index=0),
    Request(prompt="Who painted the Moon Rose?", target_new="Ada Quill", loc_prompt="nq question: who wrote hamlet",
            loc_answer="William Shakespeare", rephrase_prompt="The Moon Rose was painted by", index=1),
    Request(prompt="What is the native language of Danielle Darrieux?", target_new="English", loc_prompt="nq question: largest ocean",
            loc_answer="the Pacific Ocean", rephrase_prompt="Danielle Darrieux speaks", index=2),
]
TRAIN = ["nq question: boiling point of water 100 degrees", "nq question: capital of france Paris"]
# Small and fast; margins, lr and constraint scaled to the tiny random model's small activations.
FAST = {"n_iter": 20, "context_templates": 1, "template_lengths": [3], "act_margin": [0.3, 1.0, 0.5],
        "edit_lr": 300.0, "mask_ratio": 1.0, "norm_constraint": 10.0}


@pytest.fixture
def make(tiny):
    """make(**overrides) -> a WISE method on the shared tiny model; every one is restored afterwards."""
    made = []

    def _make(model=None, layer=LAYER, **overrides):
        m, tok = tiny
        cfg = OmegaConf.merge(OmegaConf.structured(WiseConfig), {"name": "wise", "layer": layer, **FAST, **overrides})
        method = METHODS["wise"](cfg, model or m, EditContext(tok, TRAIN, torch.device("cpu"), 0))
        made.append(method)
        return method

    yield _make
    for method in made:
        method.restore()


def evaluator(tiny, batch_size=4):
    model, tok = tiny
    ev = Evaluator(tok, REQS, DataFormat.zsre, ["rel", "gen", "loc"], batch_size=batch_size)
    ev.record_unedited_locality(model)  # on the unedited model: call before editing
    return ev


# --- pure pieces ---------------------------------------------------------------------------------


def test_hinge_terms_average_their_positive_entries_only():
    in_scores, out_scores = torch.tensor([25.0, 18.0, 10.0]), torch.tensor([7.0])
    l_out, l_in, l_gap = routing_losses(in_scores, out_scores, (5, 20, 10))
    assert l_out.item() == 2.0  # 7 - 5
    assert l_in.item() == 6.0  # (2 + 10) / 2; the 25 row is satisfied and not counted
    assert l_gap.item() == 7.0  # 7 - [25, 18, 10] + 10 = [-8, -1, 7]
    assert all(t.item() == 0 for t in routing_losses(torch.tensor([30.0]), torch.tensor([1.0]), (5, 20, 10)))
    x = torch.tensor([-1.0, 2.0, 4.0], requires_grad=True)
    positive_mean(x).backward()
    assert x.grad.tolist() == [0.0, 0.5, 0.5]


def test_sequence_scores_ignore_padding_and_take_the_max_beyond_the_limit():
    delta = torch.tensor([[9.0, 1.0, 3.0], [2.0, 4.0, 6.0]])
    real = torch.tensor([[False, True, True], [True, True, True]])
    assert sequence_scores(delta, real).tolist() == [2.0, 4.0]
    assert sequence_scores(delta, real, max_mean_positions=2).tolist() == [2.0, 6.0]  # row 1 has 3 > 2 positions


def test_routing_rules():
    scores = torch.tensor([[5.0, 1.0, 3.0, 2.0], [4.0, 2.0, 3.0, 0.5]])  # [side, merged] x 4 sequences
    assert route_merge(scores, threshold=2.5).tolist() == [0, -1, 0, -1]  # ties go to the first
    assert route_merge(scores, threshold=1.5).tolist() == [0, 1, 0, 0]
    # Retrieve: side kept if >= its threshold; a memory wins if above its own threshold and the best.
    scores = torch.tensor([[1.0, 5.0, 1.0], [3.0, 4.0, 0.5], [2.0, 6.0, 0.7]])
    assert route_retrieve(scores, torch.tensor([2.0, 2.5, 1.0])).tolist() == [1, 2, -1]
    assert route_retrieve(scores, torch.tensor([0.5, 3.5, 2.5])).tolist() == [0, 2, 0]


def test_early_stop_rule():
    assert not should_stop([0.01], 1e-4, 0.02)
    assert should_stop([0.01005, 0.01], 1e-4, 0.02)
    assert not should_stop([0.0105, 0.01], 1e-4, 0.02)  # still moving
    assert not should_stop([0.03, 0.03], 1e-4, 0.02)  # not low enough


def test_label_mask_covers_exactly_the_target_tokens(tiny):
    _, tok = tiny
    long_loc = "nq question: " + "a very long irrelevant text " * 4  # longer than every edit row
    b = build_edit_batch(tok, REQS[:2], ["I said", "Q: well"], [long_loc, "short"], "cpu")
    assert b.n_edit_rows == 6
    for row in range(8):
        ids = b.tokens.input_ids[row][b.tokens.target_mask[row]].tolist()
        expected = REQS[row // 3].target_new if row < 6 else ""
        assert tok.decode(ids) == expected
    texts = [tok.decode(r[m.bool()].tolist(), skip_special_tokens=True) for r, m in zip(b.tokens.input_ids, b.tokens.attention_mask)]
    assert texts[:3] == ["The capital of Atlantis is Zor", "I said The capital of Atlantis is Zor", "Q: well The capital of Atlantis is Zor"]
    assert texts[6] == long_loc


def test_edit_loss_sums_target_nll_over_targets_plus_one():
    rows = [Encoded((1, 5, 6, 7), (2, 3)), Encoded((1, 5, 6, 7, 8), (2, 3, 4)), Encoded((1, 9, 9), ())]
    b = TokenBatch.build(rows, 0, "cpu")
    target_logits = torch.zeros(5, 10)  # 5 target tokens, uniform: each costs log 10
    expected = (2 * math.log(10) / 3 + 3 * math.log(10) / 4) / 2  # the x_loc row does not count
    assert edit_nll(b, target_logits).item() == pytest.approx(expected)


# --- the method on the tiny model --------------------------------------------------------------------


def test_edits_persist_route_per_sequence_and_restore_exactly(tiny, make):
    model, _ = tiny
    before = {k: v.clone() for k, v in model.state_dict().items()}
    original = get_module(model, LAYER)
    ev, ev1 = evaluator(tiny), evaluator(tiny, batch_size=1)
    method = make()
    for r in REQS[:2]:
        method.edit([r])
    batched, alone = ev.score(model, [0, 1]), ev1.score(model, [0, 1])
    assert batched == alone  # every sequence gets the decision and scores it gets alone
    assert min(row["rel"] for row in batched) >= 0.8  # the first edit survives the second (pre-edit: 0)
    assert all(row["loc"] == 1.0 for row in batched)  # locality texts are routed to the main memory
    method.restore()
    assert get_module(model, LAYER) is original
    assert not model._forward_pre_hooks and not model._forward_hooks
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert max(row["rel"] for row in ev.score(model, [0, 1])) < 0.9
    assert method.state_dict() == {}


def test_state_round_trips_through_torch_save(tiny, make):
    model, _ = tiny
    ev = evaluator(tiny)
    method = make(save_freq=1, merge_freq=2, retrieve=True, n_iter=6)
    for r in REQS:
        method.edit([r])
    edited = ev.score(model, [0, 1, 2])
    buffer = io.BytesIO()
    torch.save(method.state_dict(), buffer)
    method.restore()
    assert ev.score(model, [0, 1, 2]) != edited
    buffer.seek(0)
    method.load_state_dict(torch.load(buffer, weights_only=True))
    assert ev.score(model, [0, 1, 2]) == edited
    bank = method.layer.bank
    assert (bank.n_edits, len(bank.retrieved), len(bank.shards)) == (3, 1, 1)


def test_mask_density_shared_in_a_shard_and_redrawn_for_the_next(make):
    method = make(mask_ratio=0.2, weight_decay=0.0, n_iter=3, save_freq=2, merge_freq=4)
    method.edit([REQS[0]])
    bank = method.layer.bank
    first = bank.mask.clone()
    assert abs(first.float().mean().item() - 0.2) < 0.03
    changed = bank.side != bank.original
    assert changed.any() and not (changed & ~first).any()  # only masked entries move (no weight decay)
    method.edit([REQS[1]])
    assert torch.equal(bank.mask, first)
    method.edit([REQS[2]])  # the first edit of shard 2
    assert not torch.equal(bank.mask, first) and abs(bank.mask.float().mean().item() - 0.2) < 0.03


def test_side_memory_is_clamped_element_wise(make):
    method = make(norm_constraint=1e-3, n_iter=3)
    method.edit([REQS[0]])
    bank = method.layer.bank
    assert (bank.side - bank.original).abs().max().item() == pytest.approx(1e-3, rel=1e-3)
    assert ((bank.side - bank.original).abs() <= 1e-3 + 1e-6).all()


def test_early_stop_and_the_in_scope_score_of_the_last_forward(tiny, make):
    model, tok = tiny
    method = make(n_iter=10, early_stop_delta=1e9, early_stop_loss=1e9)
    stats = method.edit([REQS[0]])
    assert stats["steps"] == 2  # stops at the first check: after two steps
    # Stopped before a third step: the final forward saw the final weights, so its score is reproducible.
    layer = method.layer
    batch = build_edit_batch(tok, [REQS[0]], method.context_prefixes(), [TRAIN[0]], "cpu")
    layer.editing = True
    try:
        with torch.no_grad():
            run_model(model, batch.tokens)
        assert layer.scores[: batch.n_edit_rows].mean().item() == pytest.approx(stats["score"])
    finally:
        layer.editing = False
    method.restore()
    assert make(n_iter=4).edit([REQS[0]])["steps"] == 4


def test_threshold_is_act_ratio_times_the_min_in_scope_score(make):
    method = make(act_ratio=0.5, n_iter=3)
    scores = [method.edit([r])["score"] for r in REQS[:2]]
    routing = method.layer.bank.routing()
    assert routing.thresholds == [pytest.approx(0.5 * min(scores))]
    assert len(routing.weights) == 1  # T < save_freq: one side memory, nothing merged


def test_sharding_and_lazy_merging(make):
    method = make(n_iter=3, save_freq=1, merge_freq=2)
    method.edit([REQS[0]])
    bank = method.layer.bank
    shard = bank.shards[0].weight.clone()
    # T=1 >= save_freq: evaluation sees the lazy merge, but the editing state is left as it is.
    assert torch.equal(bank.routing().weights[0], merge("ties", bank.original, [shard], [1.0], 0.53))
    assert len(bank.shards) == 1 and bank.merged is None
    method.edit([REQS[1]])
    assert bank.shards == [] and bank.merged is not None
    merged = bank.merged.clone()
    method.edit([REQS[2]])
    later = merge("ties", bank.original, [bank.shards[0].weight, merged], [0.4, 0.6], 0.53)
    assert torch.equal(bank.routing().weights[0], later) and torch.equal(bank.merged, merged)


def test_retrieve_keeps_one_memory_per_merge_with_its_own_threshold(make):
    method = make(n_iter=3, save_freq=1, merge_freq=2, retrieve=True, replay=True)
    scores = [method.edit([r])["score"] for r in REQS]
    bank = method.layer.bank
    assert len(bank.retrieved) == 1 and len(bank.shards) == 1
    assert bank.retrieved[0].min_score == pytest.approx(min(scores[:2])) and bank.retrieved[0].edits == [
        e for s in (0, 1) for e in [list(build_edit_batch(method.ctx.tokenizer, [REQS[s]], [], [""], "cpu").plain[0])]
    ]
    routing = bank.routing()
    assert len(routing.weights) == 3 and routing.retrieve
    assert routing.thresholds == [math.inf, pytest.approx(0.88 * min(scores[:2])), pytest.approx(0.88 * scores[2])]
    replay = method._replay_batch(bank)  # one edit of each of the two past groups; the current group is empty
    assert replay.n_past == 2 and len(replay.tokens.input_ids) == 2


def test_gpt2_conv1d_layer_keeps_its_bias(tiny, make):
    _, tok = tiny
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=4, n_embd=32, n_head=2, n_positions=128, vocab_size=len(tok))).eval().requires_grad_(False)
    layer = "transformer.h[2].mlp.c_proj"
    with torch.no_grad():
        get_module(gpt2, layer).bias.normal_()  # a bias the side memory must keep
    ids = torch.tensor([tok("The capital of Atlantis is Zor")["input_ids"]])
    before = gpt2(input_ids=ids).logits
    method = make(model=gpt2, layer=layer, n_iter=3)
    method.edit([REQS[0]])
    side = method.layer.bank.side.clone()
    method.layer.bank.side.copy_(method.layer.bank.original)  # side memory = W: same outputs as the original layer
    method.layer.editing = True
    assert torch.allclose(gpt2(input_ids=ids).logits, before, atol=1e-5)
    method.layer.editing = False
    method.layer.bank.side.copy_(side)
    method.restore()
    assert torch.equal(gpt2(input_ids=ids).logits, before)


def test_method_configs_and_a_loop_run(compose, data_dir, tmp_path):
    merge_cfg = method_config(compose(["method=wise"]))[1]
    assert (merge_cfg.layer, merge_cfg.retrieve, merge_cfg.n_iter, list(merge_cfg.act_margin)) == (LAYER, False, 70, [5.0, 20.0, 10.0])
    assert (merge_cfg.save_freq, merge_cfg.merge_freq, merge_cfg.merge_alg.value, merge_cfg.density) == (500, 1000, "ties", 0.53)
    retrieve_cfg = method_config(compose(["method=wise_retrieve", "method.replay=true"]))[1]
    assert (retrieve_cfg.name, retrieve_cfg.retrieve, retrieve_cfg.replay, retrieve_cfg.edit_lr) == ("wise_retrieve", True, True, 1.0)
    small = ["method.n_iter=2", "method.context_templates=1", "method.template_lengths=[3]", f"data_dir={data_dir}", "num_edits=2"]
    for mode in ("sequential", "single"):
        results = run(compose(["method=wise", f"edit_mode={mode}", "eval_every=1", *small]), tmp_path / mode)
        points = [json.loads(line) for line in (tmp_path / mode / "metrics.jsonl").read_text().splitlines()]
        assert [(p["n_edits"], p["edit_mode"]) for p in points] == [(1, mode), (2, mode)]
        assert {k: results[k] for k in ("rel", "gen", "loc")} == {k: points[-1][k] for k in ("rel", "gen", "loc")}
        assert all(0.0 <= results[k] <= 1.0 for k in ("rel", "gen", "loc"))
        assert json.loads((tmp_path / mode / "results.json").read_text()) == json.loads(json.dumps(results))


def test_device_map_auto_places_the_model_and_a_wise_run_scores_the_same(compose, data_dir, tmp_path):
    """model.device_map=auto (accelerate) on the committed default model: here everything lands on the
    CPU, and a WISE run gives exactly the scores of the ordinary load."""
    small = ["model=small", "method=wise", "method.n_iter=3", "method.context_templates=1", "method.template_lengths=[3]",
             f"data_dir={data_dir}", "num_edits=2", "eval_every=2"]
    from wise_bench.models import input_device, load_model, load_tokenizer

    cfg = compose([*small, "model.device_map=auto"])
    model = load_model(cfg.model, len(load_tokenizer(cfg.model)), torch.device("cpu"))
    assert input_device(model).type == "cpu" and not any(p.requires_grad for p in model.parameters())
    plain = run(compose(small), tmp_path / "plain")
    mapped = run(cfg, tmp_path / "mapped")
    assert {k: plain[k] for k in ("rel", "gen", "loc")} == {k: mapped[k] for k in ("rel", "gen", "loc")}
    with pytest.raises(UserError, match="device_map needs weights"):
        run(compose(["model=tiny_random", "model.device_map=auto", f"data_dir={data_dir}", "num_edits=2"]), tmp_path / "r")
