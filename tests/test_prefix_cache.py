import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from wise_bench.errors import UserError
from wise_bench.metrics import TokenBatch, encode_pair
from wise_bench.prefix_cache import PrefixCache, block_list, tensors_in

LAYER = "model.layers[3].mlp.down_proj"


def batch(tok, pairs):
    return TokenBatch.build([encode_pair(tok, p, t) for p, t in pairs], tok.pad_token_id, "cpu")


def logits(model, b):
    return model(input_ids=b.input_ids, attention_mask=b.attention_mask, position_ids=b.position_ids, use_cache=False).logits


def uncached_logits(model, b):
    """A plain forward pass of the whole sequence, no cache anywhere: what every cached call must equal."""
    assert not model._forward_pre_hooks and not any("forward" in m.__dict__ for m in model.modules())
    with torch.no_grad():
        return logits(model, b)


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
            recorded, replayed, again = run(), run(), run()
        assert (cache.misses, cache.hits) == (1, 2)
        for out in (recorded, replayed, again):
            assert torch.equal(out[0], plain[0]) and torch.equal(out[1], plain[1])
    finally:
        weight.requires_grad_(False)


def test_lower_blocks_do_not_run_on_a_hit_and_a_new_batch_records_anew(tiny):
    model, tok = tiny
    calls = []
    handle = model.model.layers[0].mlp.register_forward_hook(lambda *_: calls.append(1))
    b1, b2 = batch(tok, [("a b c", "d")]), batch(tok, [("e f", "g h")])
    plain1, plain2 = uncached_logits(model, b1), uncached_logits(model, b2)
    calls.clear()
    try:
        with PrefixCache(model, LAYER, max_entries=1) as cache:
            assert torch.equal(logits(model, b1), plain1) and len(calls) == 1
            assert torch.equal(logits(model, b1), plain1) and len(calls) == 1
            # A different batch: recorded (not served b1's recording), evicting b1 (max_entries=1).
            assert torch.equal(logits(model, b2), plain2) and len(calls) == 2
            assert torch.equal(logits(model, b1), plain1)
            assert len(calls) == 3 and (cache.misses, cache.hits) == (3, 1)
    finally:
        handle.remove()


def test_a_batch_that_differs_only_in_its_mask_or_positions_is_not_served_another_recording(tiny):
    model, tok = tiny
    b = batch(tok, [("The capital of Atlantis is", "Zor"), ("Who?", "Ada Quill")])
    first = dict(input_ids=b.input_ids, attention_mask=b.attention_mask, position_ids=b.position_ids, use_cache=False)
    calls = [first, {**first, "attention_mask": torch.ones_like(b.attention_mask)}, {**first, "position_ids": 2 * b.position_ids}]
    with torch.no_grad():
        plain = [model(**c).logits for c in calls]
    assert all((p - plain[0]).abs().max() > 1e-3 for p in plain[1:])  # each call really computes something else
    with PrefixCache(model, LAYER) as cache:
        for _ in range(2):  # the second round replays each call's own recording
            for c, expected in zip(calls, plain):
                assert torch.equal(model(**c).logits, expected)
    assert (cache.misses, cache.hits) == (3, 3)


def test_a_replay_sees_the_edited_modules_current_weights(tiny):
    """The cache is for training the edited module: after its weights change, a replayed call must
    give what a plain forward pass of the changed model gives, not what was recorded."""
    model, tok = tiny
    b = batch(tok, [("The capital of Atlantis is", "Zor"), ("Who?", "Ada Quill")])
    weight = model.model.layers[2].mlp.down_proj.weight
    original = weight.detach().clone()
    try:
        with torch.enable_grad(), PrefixCache(model, "model.layers[2].mlp.down_proj") as cache:
            recorded = logits(model, b).detach()
            with torch.no_grad():
                weight.add_(torch.randn(weight.shape, generator=torch.Generator().manual_seed(0)) * 0.1)
            replayed = logits(model, b).detach()
        assert cache.hits == 1
        assert not torch.equal(replayed, recorded)
        assert torch.equal(replayed, uncached_logits(model, b))  # same (changed) weights, no cache
    finally:
        with torch.no_grad():
            weight.copy_(original)


def test_exit_leaves_the_model_as_it_was(tiny):
    model, tok = tiny
    blocks = model.model.layers
    b, other = batch(tok, [("x", "y")]), batch(tok, [("a longer prompt", "and its target")])
    plain, plain_other = uncached_logits(model, b), uncached_logits(model, other)
    with PrefixCache(model, LAYER):
        assert all("forward" in blocks[j].__dict__ for j in range(3)) and "forward" not in blocks[3].__dict__
        assert torch.equal(logits(model, b), plain)
    assert not any("forward" in b.__dict__ for b in blocks)
    assert not model._forward_pre_hooks and not model._forward_hooks
    # After exit nothing is replayed: a recorded batch and a new one both compute afresh.
    assert torch.equal(logits(model, b), plain) and torch.equal(logits(model, other), plain_other)


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


def test_in_the_edited_block_only_what_runs_before_the_edited_module_is_replayed(tiny):
    """Block 2's norms, attention, gate/up projections replay; down_proj and block 3 still run."""
    model, tok = tiny
    names = ["input_layernorm", "self_attn", "self_attn.q_proj", "post_attention_layernorm",
             "mlp.gate_proj", "mlp.up_proj", "mlp.act_fn", "mlp.down_proj", "mlp"]
    modules = {n: model.model.layers[2].get_submodule(n) for n in names} | {"above": model.model.layers[3]}
    runs = {n: 0 for n in modules}

    def counting(name, forward):  # counts executions of forward (hooks would fire on replays too)
        def run(*args, **kwargs):
            runs[name] += 1
            return forward(*args, **kwargs)
        return run

    b = batch(tok, [("The capital of Atlantis is", "Zor"), ("Who?", "Ada Quill")])
    plain = uncached_logits(model, b)
    for n, m in modules.items():
        m.forward = counting(n, m.forward)
    try:
        with torch.enable_grad(), PrefixCache(model, "model.layers[2].mlp.down_proj") as cache:
            assert torch.equal(logits(model, b), plain)
            assert all(r == 1 for r in runs.values())
            assert torch.equal(logits(model, b), plain) and torch.equal(logits(model, b), plain)
            # Only the outermost recordings are kept: self_attn, not its q_proj.
            assert {name for name, _ in cache.entries[0].inner} == {
                "input_layernorm", "self_attn", "post_attention_layernorm", "mlp.gate_proj", "mlp.up_proj", "mlp.act_fn"}
        assert {n for n, r in runs.items() if r == 3} == {"mlp.down_proj", "mlp", "above"} and cache.hits == 2
        assert all(r == 1 for n, r in runs.items() if n not in {"mlp.down_proj", "mlp", "above"})
    finally:
        for m in modules.values():
            del m.forward


def test_nothing_downstream_of_a_trainable_parameter_is_replayed(tiny):
    """With gate_proj trainable too, act_fn (fed by it) must run live and gradients stay exact."""
    model, tok = tiny
    mlp = model.model.layers[3].mlp
    b = batch(tok, [("a b c", "d e")])
    params = [mlp.gate_proj.weight, mlp.down_proj.weight]
    for p in params:
        p.requires_grad_(True)
    try:
        def grads():
            out = logits(model, b)
            return out.detach(), torch.autograd.grad(out.square().mean(), params)

        plain = grads()
        with PrefixCache(model, LAYER):
            grads()
            replayed = grads()
        assert torch.equal(replayed[0], plain[0])
        assert all(torch.equal(g, h) for g, h in zip(replayed[1], plain[1]))
    finally:
        for p in params:
            p.requires_grad_(False)


EDITORS = {  # the methods that edit one layer, with a few quick steps
    "ft_m": ["method.steps=4", "method.lr=3e-2"],
    "grace": ["method.n_iter=4"],
    "defer": ["method.steps=4", "method.lr=1e-2"],
    "wise": ["method.n_iter=4", "method.context_templates=1", "method.template_lengths=[3]", "method.early_stop_loss=-1"],
    "rome": ["method.v_steps=4", "method.context_templates=1", "method.context_template_length=3",
             "method.mom2_adjustment=false", "method.stop_loss=0"],  # the cache serves the optimisation of δ
}


@pytest.mark.parametrize("name", sorted(EDITORS))
def test_each_single_layer_editor_learns_the_same_edit_with_the_cache(tiny, compose, monkeypatch, name):
    from wise_bench.data import Request
    from wise_bench.loop import method_config
    from wise_bench.methods import EditContext

    model, tok = tiny
    hits = []
    real_exit = PrefixCache.__exit__
    monkeypatch.setattr(PrefixCache, "__exit__", lambda self, *exc: hits.append(self.hits) or real_exit(self, *exc))
    request = Request(prompt="The capital of Atlantis is", target_new="Zor Ka", loc_prompt="", loc_answer="", subject="Atlantis", index=0)
    states = []
    for cached in (False, True):
        cls, cfg = method_config(compose([f"method={name}", f"method.prefix_cache={cached}", *EDITORS[name]]))
        method = cls(cfg, model, EditContext(tok, ["an irrelevant sentence about the sea"], torch.device("cpu"), 0))
        try:
            method.edit([request])
            states.append(tensors_in(method.state_dict()))
        finally:
            method.restore()
    assert len(hits) == 1 and hits[0] >= 3  # only the cached run entered it, and replayed steps 2-4
    plain, fast = states
    assert len(plain) == len(fast) > 0
    assert all(torch.allclose(a.float(), b.float(), atol=1e-6) for a, b in zip(plain, fast))


@pytest.mark.parametrize("name", ["wise", "memoir", "grace"])
def test_the_prefix_cache_is_exact_on_a_bfloat16_model(compose, name):
    """bf16 weights (the GPU setting): an edit learns the same state with and without the cache; MEMOIR
    keeps its residual memory in float32 whatever the model's dtype."""
    from wise_bench.data import Request
    from wise_bench.loop import method_config
    from wise_bench.methods import EditContext
    from wise_bench.models import load_model, load_tokenizer

    request = Request(prompt="The capital of Atlantis is", target_new="Zor", loc_prompt="nq question: sky", loc_answer="blue", index=0)
    states = []
    for cached in (True, False):
        cfg = compose([f"method={name}", "model.dtype=bfloat16", "method.n_iter=3", f"method.prefix_cache={cached}",
                       *(["method.context_templates=1", "method.template_lengths=[3]"] if name != "grace" else [])])
        tok = load_tokenizer(cfg.model)
        model = load_model(cfg.model, len(tok), torch.device("cpu"))
        cls, method_cfg = method_config(cfg)
        method = cls(method_cfg, model, EditContext(tok, ["nq question: boiling point of water 100 degrees"], torch.device("cpu"), 0))
        method.edit([request])
        if name == "memoir":
            assert method.state_dict()["weight"].dtype == torch.float32
        states.append(tensors_in(method.state_dict()))
    assert len(states[0]) == len(states[1]) and all(torch.equal(a, b) for a, b in zip(*states))
