"""wise_bench/memory_model.py: every term against numbers computed by hand for a tiny shape, and the
weights term against real parameter bytes.

The tiny shape: hidden h=8, MLP width i=16, 2 layers, 2 heads of 4 (q_dim 8), 1 key/value head
(kv 4), vocabulary V=10, untied LM head, bf16 (b=2).
"""
import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig

from wise_bench import memory_model as mm


def tiny_config(**overrides):
    settings = dict(vocab_size=10, hidden_size=8, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
                    num_key_value_heads=1, tie_word_embeddings=False)
    return LlamaConfig(**{**settings, **overrides})


SHAPE = mm.ModelShape.of(tiny_config())
DOWN0, DOWN1 = "model.layers[0].mlp.down_proj", "model.layers[1].mlp.down_proj"


def test_weights_of_the_tiny_shape_counted_by_hand():
    # embedding 10*8 + LM head 10*8 = 160; per block q 64 + k 32 + v 32 + o 64 + gate/up/down 3*128 + norms 16 = 592;
    # 2 blocks 1184; final norm 8: 1352 parameters, 2704 bytes in bf16.
    assert mm.parameter_count(SHAPE) == 1352
    assert mm.weights_bytes(SHAPE, torch.bfloat16) == 2704
    assert mm.weights_bytes(mm.ModelShape.of(tiny_config(tie_word_embeddings=True)), "float32") == (1352 - 80) * 4


def test_weights_equal_the_parameter_bytes_of_the_tiny_random_model(tiny):
    model, _ = tiny
    measured = sum(p.numel() * p.element_size() for p in model.parameters())
    assert mm.weights_bytes(mm.ModelShape.of(model.config), next(model.parameters()).dtype) == measured


@pytest.mark.parametrize("config, published", [
    (LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=32), 6_738_415_616),  # LLaMA-2-7B
    (MistralConfig(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                   num_attention_heads=32, num_key_value_heads=8), 7_241_732_096),  # Mistral-7B
    (LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=8), 8_030_261_248),  # LLaMA-3-8B
])
def test_weights_of_the_7b_shapes_equal_their_published_sizes_and_a_weightless_build(config, published):
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    measured = sum(p.numel() * p.element_size() for p in model.parameters())
    assert mm.weights_bytes(mm.ModelShape.of(config), torch.bfloat16) == measured == 2 * published


def test_linear_shapes_and_layer_indices():
    assert mm.linear_shape(SHAPE, DOWN1) == (8, 16)
    assert mm.linear_shape(SHAPE, "model.layers.0.mlp.up_proj") == (16, 8)
    assert mm.linear_shape(SHAPE, "model.layers[0].self_attn.k_proj") == (4, 8)
    assert mm.layer_index("model.layers[27].mlp.down_proj") == 27
    with pytest.raises(ValueError, match="lm_head"):
        mm.linear_shape(SHAPE, "lm_head")


def test_activation_terms_counted_by_hand():
    # Saved per token per block: each RMSNorm 4h + 4h + 2h = 80, two: 160; attention 2*(3*8 + 2*4) = 64;
    # MLP 2*4*16 = 128: 352. Transient per token: 2*(3*16 + 2*8) + 2*4*8 = 192.
    assert mm.block_saved_bytes_per_token(SHAPE, 2) == 352
    assert mm.block_transient_bytes_per_token(SHAPE, 2) == 192
    # LM head per target token: V*(2 + 4 + 4) = 100 forward, + V*(4 + 2) = 160 with backward.
    assert mm.lm_head_bytes(SHAPE, 2, 4, backward=False) == 400
    assert mm.lm_head_bytes(SHAPE, 2, 4, backward=True) == 640
    batch = mm.Batch(rows=3, width=5, targets=4)  # 15 tokens
    # down_proj of block 0: block 1 above (352) + the module's input 2*16 = 32; cache: 2*(0*8 + 3*8 + 3*16) = 144.
    assert mm.edit_activation_bytes(SHAPE, 2, batch, DOWN0, prefix_cache=True) == {
        "saved_for_backward": 15 * 384, "prefix_cache": 15 * 144, "one_block_forward": 15 * 192, "lm_head": 640}
    # gate_proj of block 1: no block above; its input 2*8 plus the MLP's three i-wide tensors 2*48 = 112;
    # cache: 2*(1*8 + 24 + 48) = 160 per token; none without the cache.
    acts = mm.edit_activation_bytes(SHAPE, 2, batch, "model.layers[1].mlp.gate_proj", prefix_cache=False)
    assert (acts["saved_for_backward"], acts["prefix_cache"]) == (15 * 112, 0)
    assert mm.edit_activation_bytes(SHAPE, 2, batch, "model.layers[1].mlp.gate_proj", True)["prefix_cache"] == 15 * 160
    # Eval: 12 tokens * (192 + 2*8) = 2496, LM head 3 * 100 = 300.
    assert mm.eval_activation_bytes(SHAPE, 2, mm.Batch(2, 6, 3)) == {"eval_forward": 2496, "eval_lm_head": 300}
    # Generation, 2 rows of 6 + 3 new tokens: KV 2*9 * 2 layers * 2 * 4 * 2 = 576; prompt 2496; last logits 2*10*6 = 120.
    assert mm.generation_bytes(SHAPE, 2, mm.Batch(2, 6, 0), 3) == {"kv_cache": 576, "prompt_forward": 2496, "last_logits": 120}


WISE = {"name": "wise", "layer": DOWN1, "save_freq": 2, "merge_freq": 4, "retrieve": False, "prefix_cache": True}


def test_wise_terms_follow_shards_and_merges():
    # M = 8*16 = 128 elements, 256 bytes in bf16. TIES of n: 4*n*256 + n*128 + 2*256.
    at4 = mm.wise_memory(WISE, SHAPE, 2, T=4)  # two shards merged at 4, nothing pending
    assert at4.state == {"side_memory": 256, "gradient_mask": 128, "shards": 0, "merged": 256}
    assert at4.edit == {"side_gradient_and_bounds": 768}
    assert at4.merge == {"ties_merge": 2 * 1024 + 2 * 128 + 512}
    assert at4.eval == {"merged_view": 0}
    at3 = mm.wise_memory(WISE, SHAPE, 2, T=3)  # one shard saved, one edit in the side memory: a lazy merge of 2
    assert at3.state == {"side_memory": 256, "gradient_mask": 128, "shards": 256, "merged": 0}
    assert at3.merge == {"ties_merge": 0}
    assert at3.eval == {"merged_view": 256 + 2 * 1024 + 2 * 128 + 512}
    retrieve = mm.wise_memory({**WISE, "retrieve": True}, SHAPE, 2, T=9)  # two merges kept, no lazy view
    assert (retrieve.state["merged"], retrieve.eval["merged_view"]) == (512, 0)


def test_the_other_methods_terms_counted_by_hand():
    memoir = mm.memoir_memory({"layer": DOWN1}, SHAPE, 2, T=5)
    assert memoir.state == {"residual_fp32": 512, "mask_bank": 80, "permutation_and_background": 16 * 12}
    assert (memoir.edit, memoir.eval) == ({"residual_gradient_and_decay": 1024}, {"bank_fp32_chunk": 320})
    grace = mm.grace_memory({"layer": DOWN1}, SHAPE, 2, T=5)  # entry 4*(16 + 8 + 1) = 100
    assert (grace.state, grace.edit, grace.eval) == ({"codebook": 500}, {"key_and_value_copies": 480}, {"key_copy": 320})
    ft = mm.ft_memory({"layer": DOWN1}, SHAPE, 2, T=5)
    assert (ft.state, ft.edit) == ({"original_weight": 256}, {"gradient_adam_moments_step": 1024})
    alpha = mm.alphaedit_memory({"layers": [DOWN0, DOWN1]}, SHAPE, 2, T=5)  # key width n = 16, n^2 = 256
    assert alpha.state == {"original_weights": 512, "projections_and_key_covariance": 2 * 2 * 4 * 256}
    assert alpha.init == {"second_moments": 2 * 4 * 256, "eigendecomposition": 6 * 8 * 256}
    assert alpha.edit == {"update_fp64": 5 * 8 * 256}
    ups = ["model.layers[0].mlp.up_proj", "model.layers[1].mlp.up_proj"]  # (out, in) = (16, 8), one normaliser
    ultra = mm.ultraedit_memory({"layers": ups}, SHAPE, 2, T=5, turn_targets=3)
    assert ultra.state == {"original_weights": 512, "normalisers": 2 * 4 * 24}
    assert ultra.edit == {"keys_and_gradients": 2 * 3 * 4 * 24 + 3 * 3 * 4 * 24,
                          "ridge_solve": 3 * 4 * 64 + 4 * 128, "deltas": 2 * 4 * 128}


def test_the_peak_is_weights_plus_state_plus_the_largest_phase():
    cfg = {"name": "ft_m", "layer": DOWN1, "prefix_cache": True}
    p = mm.predict(tiny_config(), torch.bfloat16, "ft_m", cfg, 1, mm.Batch(1, 5, 2), mm.Batch(2, 6, 3))
    # edit: 1024 + saved 5*32 + cache 5*2*(8 + 24 + 48) + one block 5*192 + LM head 2*160 = 3264;
    # eval: 2496 + 300 = 2796.
    assert p.phases() == {"init": 0, "edit": 3264, "merge": 0, "eval": 2796}
    assert p.peak == 2704 + 256 + 3264
    with_generation = mm.predict(tiny_config(), torch.bfloat16, "ft_m", cfg, 1, mm.Batch(1, 5, 2), mm.Batch(2, 6, 3),
                                 (mm.Batch(2, 6, 0), 3))
    assert with_generation.eval_activations == {"teacher_forced": 2796, "generation": 576 + 2496 + 120}
    assert mm.fits(p, card_gib=1.5 + 6224 / 2**30) and not mm.fits(p, card_gib=1.5 + 6223 / 2**30)
    with pytest.raises(ValueError, match="rome"):
        mm.predict(tiny_config(), torch.bfloat16, "rome", cfg, 1, mm.Batch(1, 5, 2), mm.Batch(2, 6, 3))
