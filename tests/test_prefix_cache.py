import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from wise_bench.errors import UserError
from wise_bench.metrics import TokenBatch, encode_pair
from wise_bench.prefix_cache import PrefixCache, block_list

LAYER = "model.layers[3].mlp.down_proj"


def batch(tok, pairs):
    return TokenBatch.build([encode_pair(tok, p, t) for p, t in pairs], tok.pad_token_id, "cpu")


def logits(model, b):
    return model(input_ids=b.input_ids, attention_mask=b.attention_mask, position_ids=b.position_ids, use_cache=False).logits


@pytest.fixture(scope="module")
def gpt2():
    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=4, n_embd=32, n_head=2, n_positions=128, vocab_size=260)
    return GPT2LMHeadModel(cfg).eval().requires_grad_(False)


def test_block_list_finds_the_decoder_blocks_and_the_index(tiny, gpt2):
    model, _ = tiny
    blocks, index = block_list(model, LAYER)
    assert blocks is model.model.layers and index == 3
    blocks, index = block_list(gpt2, "transformer.h.2.mlp.c_proj")
    assert blocks is gpt2.transformer.h and index == 2
    with pytest.raises(UserError, match="not inside a list of decoder blocks"):
        block_list(model, "lm_head")


def test_replayed_forward_gives_identical_logits_and_gradients(tiny):
    model, tok = tiny
    b = batch(tok, [("The capital of Atlantis is", "Zor"), ("Who?", "Ada Quill")])
    weight = model.model.layers[3].mlp.down_proj.weight
    weight.requires_grad_(True)
    try:
        def run():
            out = logits(model, b)
            (grad,) = torch.autograd.grad(out.square().mean(), weight)
            return out.detach(), grad

        plain = run()
        with PrefixCache(model, LAYER) as cache:
            recorded, replayed = run(), run()
        assert (cache.misses, cache.hits) == (1, 1)
        for out in (recorded, replayed):
            assert torch.equal(out[0], plain[0]) and torch.equal(out[1], plain[1])
    finally:
        weight.requires_grad_(False)


def test_lower_blocks_do_not_run_on_a_hit_and_a_new_batch_records_anew(tiny):
    model, tok = tiny
    calls = []
    handle = model.model.layers[0].mlp.register_forward_hook(lambda *_: calls.append(1))
    b1, b2 = batch(tok, [("a b c", "d")]), batch(tok, [("e f", "g h")])
    try:
        with PrefixCache(model, LAYER, max_entries=1) as cache:
            first = logits(model, b1)
            assert len(calls) == 1
            assert torch.equal(logits(model, b1), first) and len(calls) == 1
            logits(model, b2)  # a different batch: recorded, evicting b1 (max_entries=1)
            logits(model, b1)
            assert len(calls) == 3 and (cache.misses, cache.hits) == (3, 1)
    finally:
        handle.remove()


def test_exit_leaves_the_model_as_it_was(tiny):
    model, tok = tiny
    blocks = model.model.layers
    with PrefixCache(model, LAYER):
        assert all("forward" in blocks[j].__dict__ for j in range(3)) and "forward" not in blocks[3].__dict__
    assert not any("forward" in b.__dict__ for b in blocks)
    assert not model._forward_pre_hooks and not model._forward_hooks
    b = batch(tok, [("x", "y")])
    assert torch.equal(logits(model, b), logits(model, b))


def test_trainable_lower_blocks_are_refused(tiny):
    model, _ = tiny
    weight = model.model.layers[1].mlp.up_proj.weight
    weight.requires_grad_(True)
    try:
        with pytest.raises(ValueError, match="frozen lower blocks"):
            with PrefixCache(model, LAYER):
                pass
    finally:
        weight.requires_grad_(False)
    assert not any("forward" in b.__dict__ for b in model.model.layers)


def test_gpt2_blocks_replay_exactly(gpt2, tiny):
    _, tok = tiny
    b = batch(tok, [("The capital of Atlantis is", "Zor"), ("Who?", "Ada")])
    plain = logits(gpt2, b)
    with PrefixCache(gpt2, "transformer.h[3].mlp.c_proj") as cache:
        assert torch.equal(logits(gpt2, b), plain) and torch.equal(logits(gpt2, b), plain)
    assert cache.hits == 1
