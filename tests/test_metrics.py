import math

import pytest
import torch
from conftest import REPO
from torch import nn
from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

from wise_bench.config import DataFormat
from wise_bench.data import DataError, Request
from wise_bench.metrics import (
    Encoded,
    Evaluator,
    TokenBatch,
    agreement,
    aggregate,
    below_ood_threshold,
    encode_pair,
    perplexity,
    teacher_forced,
    token_accuracy,
)


def test_per_request_scores_by_hand():
    assert token_accuracy([1, 2, 3, 4], [1, 2, 0, 4]) == 0.75
    assert agreement([5, 6], [5, 7]) == 0.5
    assert perplexity([math.log(2), math.log(8)]) == pytest.approx(4.0)  # exp(mean) = exp(log 4)
    assert below_ood_threshold([0.1, 0.2]) == 1.0  # mean 0.15 < -log 0.8 = 0.2231
    assert below_ood_threshold([0.3, 0.2]) == 0.0  # mean 0.25


def test_aggregate_by_hand():
    rows = [
        {"rel": 1.0, "gen": 0.5, "loc": 1.0, "ppl": 4.0},
        {"rel": 0.0, "gen": 0.5, "loc": 0.5, "ppl": 250.0},
        {"rel": 0.5, "gen": 0.2, "ppl": 10.0},  # no locality answer: left out of Loc only
    ]
    out = aggregate(rows)
    assert out["rel"] == pytest.approx(0.5)
    assert out["gen"] == pytest.approx(0.4)
    assert out["loc"] == pytest.approx(0.75)
    assert out["avg"] == pytest.approx((0.5 + 0.4 + 0.75) / 3)
    assert out["ppl"] == pytest.approx((4 + 100 + 10) / 3)  # clipped at 100 per request
    assert out["ppl_unclipped"] == pytest.approx((4 + 250 + 10) / 3)
    assert out["ppl_median"] == 10.0
    assert "portability" not in out and "ood" not in out


def test_encode_pair_finds_target_tokens_by_offsets(tiny):
    _, tok = tiny  # byte-level: one token per byte, BOS first
    enc = encode_pair(tok, "ab?", "xy")
    assert len(enc.ids) == 1 + len("ab? xy")
    assert enc.target_pos == (5, 6)  # 'x', 'y'; the space at 4 and the prompt are not targets
    assert tok.decode([enc.ids[p] for p in enc.target_pos]) == "xy"
    # Multi-byte characters: every byte of the target counts.
    enc = encode_pair(tok, "Q", "é")
    assert len(enc.target_pos) == 2


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_target_logits_equal_the_full_logits_at_target_positions(tiny, family):
    model, tok = tiny
    if family == "gpt2":
        torch.manual_seed(0)
        model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=len(tok))).eval()
    seqs = [encode_pair(tok, "Who wrote it?", "Shakespeare"), encode_pair(tok, "Q", "a b")]
    b = TokenBatch.build(seqs, tok.pad_token_id, "cpu")
    rows, cols = b.target_mask.nonzero(as_tuple=True)
    with torch.no_grad():
        target = b.target_logits(model)
        assert target.shape == (len(rows), model.config.vocab_size)
        assert torch.allclose(target, b.logits(model)[rows, cols - 1], atol=1e-5)
    assert not model.get_output_embeddings()._forward_pre_hooks  # the gathering hook is gone


def test_token_batch_left_pads_and_keeps_positions():
    b = TokenBatch.build([Encoded((1, 2, 3), (2,)), Encoded((4, 5), (1,))], pad_id=0, device="cpu")
    assert b.input_ids.tolist() == [[1, 2, 3], [0, 4, 5]]
    assert b.attention_mask.tolist() == [[1, 1, 1], [0, 1, 1]]
    assert b.position_ids.tolist() == [[0, 1, 2], [0, 0, 1]]
    assert b.target_mask.tolist() == [[False, False, True], [False, False, True]]


class NextPlusOne(nn.Module):
    """A fake LM whose logits at position t put 10 on token (input_ids[t] + 1) % V and 0 elsewhere."""

    vocab = 8

    def __init__(self):
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=False, logits_to_keep=None):
        logits = 10.0 * nn.functional.one_hot((input_ids + 1) % self.vocab, self.vocab).float()
        if logits_to_keep is not None:  # as transformers' causal LMs: only these positions
            logits = logits[:, logits_to_keep]
        return type("Out", (), {"logits": logits})()


def test_teacher_forced_reads_the_previous_positions_logits():
    seqs = [Encoded((1, 2, 3, 5), (2, 3)), Encoded((6, 7, 0), (1, 2))]
    a, b = teacher_forced(NextPlusOne(), seqs, pad_id=0, batch_size=2)
    # seq a: position 2 is predicted from token 2 -> 3 (right); position 3 from token 3 -> 4 (gold 5).
    assert a.pred == [3, 4] and a.gold == [3, 5]
    assert token_accuracy(a.pred, a.gold) == 0.5
    # seq b: 6 -> 7 (right), 7 -> 0 (right, wraps around).
    assert b.pred == [7, 0] and token_accuracy(b.pred, b.gold) == 1.0
    log_z = math.log(math.exp(10) + 7)
    assert a.nll == pytest.approx([log_z - 10, log_z], abs=1e-6)  # float32
    assert perplexity(a.nll) == pytest.approx(math.exp((2 * log_z - 10) / 2))


def requests():
    texts = [
        ("What is the capital of France?", "Paris", "Which city is France's capital?"),
        ("Who wrote it?", "Shakespeare and a long tail of co-authors", "Author?"),
        ("Q", "a", "Quite a long paraphrase of the question, with many more tokens than the others"),
        ("The mother tongue of Danielle Darrieux is", "English", "Darrieux speaks"),
    ]
    return [
        Request(prompt=p, target_new=t, rephrase_prompt=r, loc_prompt=f"nq question: item {i}" + "!" * i,
                loc_answer=f"answer {i}", file="fixture.json", index=i)
        for i, (p, t, r) in enumerate(texts)
    ]


def test_batched_evaluation_equals_one_request_at_a_time(tiny):
    model, tok = tiny
    reqs = requests()
    batched = Evaluator(tok, reqs, DataFormat.zsre, ["rel", "gen", "loc", "ppl"], batch_size=3)
    single = Evaluator(tok, reqs, DataFormat.zsre, ["rel", "gen", "loc", "ppl"], batch_size=1)
    batched.record_unedited_locality(model)
    single.record_unedited_locality(model)
    assert batched.loc_before == single.loc_before
    weight = model.model.layers[1].mlp.down_proj.weight
    original = weight.detach().clone()
    with torch.no_grad():  # perturb the model so locality is not trivially 1
        weight.mul_(1.5)
    try:
        rows_b = batched.score(model, range(4))
        rows_s = [single.score(model, [i])[0] for i in range(4)]
    finally:
        with torch.no_grad():
            weight.copy_(original)
    for b, s in zip(rows_b, rows_s):
        assert b.keys() == s.keys() == {"index", "rel", "gen", "loc", "ppl"}
        assert (b["rel"], b["gen"], b["loc"]) == (s["rel"], s["gen"], s["loc"])
        assert b["ppl"] == pytest.approx(s["ppl"], rel=1e-5)
    assert any(r["loc"] < 1 for r in rows_b)


def test_locality_is_one_on_the_unedited_model(tiny):
    model, tok = tiny
    ev = Evaluator(tok, requests(), DataFormat.zsre, ["rel", "loc"], batch_size=4)
    ev.record_unedited_locality(model)
    summary, rows = ev.evaluate(model, range(4))
    assert summary["loc"] == 1.0 and all(r["loc"] == 1.0 for r in rows)
    assert "gen" not in summary  # not asked for


def test_target_without_tokens_is_a_data_error_naming_the_raw_field(tiny):
    _, tok = tiny
    bad = Request(prompt="Who?", target_new="", loc_prompt="x", loc_answer="y", file="edit.json", index=7)
    with pytest.raises(DataError, match=r"edit.json, record 7, field 'alt': target '' tokenizes to no tokens"):
        Evaluator(tok, [bad], DataFormat.zsre, ["rel", "loc"], batch_size=1)


def test_the_lone_space_before_a_whitespace_led_target_counts_only_on_request():
    tok = AutoTokenizer.from_pretrained(str(REPO / "models/small"))  # byte-level BPE: " M" is one token
    prompt = "What is the name of the gene?"
    plain = encode_pair(tok, prompt, " MAT-49")
    counted = encode_pair(tok, prompt, " MAT-49", count_lone_space=True)
    assert [tok.decode([plain.ids[i]]) for i in plain.target_pos] == [" M", "AT", "-", "49"]
    assert [tok.decode([counted.ids[i]]) for i in counted.target_pos] == [" ", " M", "AT", "-", "49"]
    assert encode_pair(tok, prompt, "MAT-49", count_lone_space=True) == encode_pair(tok, prompt, "MAT-49")
    req = Request(prompt=prompt, target_new=" MAT-49", loc_prompt="nq question: who", loc_answer="me")
    assert Evaluator(tok, [req], DataFormat.zsre, ["rel"], 1, count_lone_space=True).scorers["rel"] == "teacher_forced_token_acc+lone_space"
    assert Evaluator(tok, [req], DataFormat.zsre, ["rel"], 1).scorers["rel"] == "teacher_forced_token_acc"
