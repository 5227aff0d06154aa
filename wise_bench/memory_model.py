"""Predicted peak accelerator memory of an editing run: weights + what the method keeps + the largest
transient of its phases (docs/performance.md, "7B on one GPU").

A run goes through phases that never overlap: building the method (AlphaEdit's statistics and
projections), optimising an edit, merging (WISE at a shard boundary) and evaluating. What the method keeps (side memory, codebook,
statistics, originals) is resident in all of them; each phase adds its own transient. So

    peak = weights + state + max(init, edit, merge, eval)

Every term is a count of tensor elements times their size, from the model's shapes alone (hidden
size h, MLP width i, key/value width kv, layers, vocabulary V), the dtype's size b, the method's
config and the number of edits T. Activation terms count what autograd saves per token and per
decoder block (``block_saved_bytes_per_token``); they are approximations stated where they are made,
to be held against measured peaks (scripts/gpu_check.py prints both).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

import torch

FP32, FP64, INDEX, BOOL = 4, 8, 8, 1  # bytes per element


def dtype_bytes(dtype: torch.dtype | str) -> int:
    """Bytes per element of a torch dtype or its name ("bfloat16")."""
    return (getattr(torch, dtype) if isinstance(dtype, str) else dtype).itemsize


@dataclass(frozen=True)
class ModelShape:
    """The sizes of a LLaMA/Mistral-layout decoder that memory depends on."""

    hidden: int
    intermediate: int
    layers: int
    vocab: int
    heads: int
    kv_heads: int
    head_dim: int
    tied_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False

    @classmethod
    def of(cls, config: Any) -> "ModelShape":
        """From a transformers config (LlamaConfig, MistralConfig, ...)."""
        heads = config.num_attention_heads
        return cls(
            hidden=config.hidden_size, intermediate=config.intermediate_size, layers=config.num_hidden_layers,
            vocab=config.vocab_size, heads=heads, kv_heads=getattr(config, "num_key_value_heads", None) or heads,
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
            tied_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
            attention_bias=bool(getattr(config, "attention_bias", False)), mlp_bias=bool(getattr(config, "mlp_bias", False)))

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim


def parameter_count(s: ModelShape) -> int:
    """Embedding V·h (+ an untied LM head V·h), per block q/o (h·q_dim each), k/v (h·kv each),
    gate/up/down (h·i each), two RMSNorm vectors (h each), and the final norm (h)."""
    attention = 2 * s.hidden * s.q_dim + 2 * s.hidden * s.kv_dim
    if s.attention_bias:
        attention += s.q_dim + 2 * s.kv_dim + s.hidden
    mlp = 3 * s.hidden * s.intermediate + (2 * s.intermediate + s.hidden if s.mlp_bias else 0)
    block = attention + mlp + 2 * s.hidden
    embeddings = s.vocab * s.hidden * (1 if s.tied_embeddings else 2)
    return embeddings + s.layers * block + s.hidden


def weights_bytes(s: ModelShape, dtype: torch.dtype | str) -> int:
    return parameter_count(s) * dtype_bytes(dtype)


# --- edited modules ---------------------------------------------------------------------------------

_IN_OUT = {"down_proj": ("intermediate", "hidden"), "up_proj": ("hidden", "intermediate"),
           "gate_proj": ("hidden", "intermediate"), "q_proj": ("hidden", "q_dim"), "o_proj": ("q_dim", "hidden"),
           "k_proj": ("hidden", "kv_dim"), "v_proj": ("hidden", "kv_dim")}


def linear_shape(s: ModelShape, path: str) -> tuple[int, int]:
    """(out, in) of the linear module at ``path`` (``model.layers[27].mlp.down_proj``), by its name."""
    name = re.split(r"[.\]]", path.rstrip("]"))[-1]
    if name not in _IN_OUT:
        raise ValueError(f"the memory model knows the linear modules {sorted(_IN_OUT)}, not '{path}'")
    d_in, d_out = (getattr(s, a) for a in _IN_OUT[name])
    return d_out, d_in


def layer_index(path: str) -> int:
    """The decoder block a module path sits in: ``model.layers[27].mlp.down_proj`` -> 27."""
    found = re.search(r"layers[.\[](\d+)", path)
    if found is None:
        raise ValueError(f"'{path}' names no decoder block (model.layers[i])")
    return int(found.group(1))


# --- activations ------------------------------------------------------------------------------------


def rmsnorm_saved_bytes(h: int, b: int) -> int:
    """HF's RMSNorm keeps for backward its input cast to fp32 (4h, none when the model is fp32), the
    normalised fp32 tensor (4h) and its output in the model's dtype (b·h, which the next linear reuses)."""
    return (FP32 * h if b != FP32 else 0) + FP32 * h + b * h


def block_saved_bytes_per_token(s: ModelShape, b: int) -> int:
    """Bytes one decoder block keeps for backward per token when its input requires grad:
    two RMSNorms; q after rotary (q_dim), k and v (kv each), the attention output and its reshaped copy
    for o_proj (q_dim each); gate and up outputs, act(gate) and act(gate)·up (i each). Rotary cos/sin
    and the attention's per-head log-sum-exp are per position, not per channel, and left out."""
    attention = b * (3 * s.q_dim + 2 * s.kv_dim)
    mlp = b * 4 * s.intermediate
    return 2 * rmsnorm_saved_bytes(s.hidden, b) + attention + mlp


def block_transient_bytes_per_token(s: ModelShape, b: int) -> int:
    """Bytes live inside one block's forward without autograd, per token, at its widest point (the
    MLP): gate, up and act(gate) outputs (i each), the residual and the normalised input (h each) and
    RMSNorm's fp32 copies (8h)."""
    return b * (3 * s.intermediate + 2 * s.hidden) + 2 * FP32 * s.hidden


def lm_head_bytes(s: ModelShape, b: int, target_tokens: int, backward: bool) -> int:
    """The LM head at the target positions only (``TokenBatch.target_logits``): logits (b·V), their
    fp32 copy and log-softmax (4V each); with backward, the log-softmax gradient (4V) and the
    logits' gradient (b·V) too. Per target token."""
    forward = b + 2 * FP32
    return target_tokens * s.vocab * (forward + (FP32 + b if backward else 0))


@dataclass(frozen=True)
class Batch:
    """A padded batch: rows, padded width, and target tokens in it (the LM head's positions)."""

    rows: int
    width: int
    targets: int

    @property
    def tokens(self) -> int:
        return self.rows * self.width


def edit_activation_bytes(s: ModelShape, b: int, batch: Batch, edited: str, prefix_cache: bool) -> dict[str, int]:
    """Activations of one optimisation step on ``batch``.

    - ``saved_for_backward``: the blocks above the edited module's block keep
      ``block_saved_bytes_per_token`` per token; the edited block keeps the edited module's input
      (b·d_in) and, when the module is a gate/up projection, the MLP's three i-wide tensors after it.
      ``edited`` is the lowest module where the graph starts (``edited_module``).
    - ``prefix_cache``: the cache keeps each lower block's output (h per token per block) and, in the
      edited block, the outputs of the submodules that run before the edited one (norms, attention,
      gate, up, act: 3h + 3i per token).
    - ``one_block_forward``: the frozen computation's own transient, one block at a time.
    - ``lm_head``: ``lm_head_bytes`` with backward.
    """
    index = layer_index(edited)
    _, d_in = linear_shape(s, edited)
    name = edited.rstrip("]").split(".")[-1]
    edited_block = b * d_in + (b * 3 * s.intermediate if name in ("gate_proj", "up_proj") else 0)
    above = s.layers - 1 - index
    cache = b * (index * s.hidden + 3 * s.hidden + 3 * s.intermediate) if prefix_cache else 0
    return {
        "saved_for_backward": batch.tokens * (above * block_saved_bytes_per_token(s, b) + edited_block),
        "prefix_cache": batch.tokens * cache,
        "one_block_forward": batch.tokens * block_transient_bytes_per_token(s, b),
        "lm_head": lm_head_bytes(s, b, batch.targets, backward=True),
    }


def eval_activation_bytes(s: ModelShape, b: int, batch: Batch) -> dict[str, int]:
    """A teacher-forced evaluation batch under inference mode: one block's transient at a time over
    all its tokens, the hidden state carried between blocks (b·h per token) and the LM head at the
    target positions (forward only)."""
    return {"eval_forward": batch.tokens * (block_transient_bytes_per_token(s, b) + b * s.hidden),
            "eval_lm_head": lm_head_bytes(s, b, batch.targets, backward=False)}


def generation_bytes(s: ModelShape, b: int, batch: Batch, new_tokens: int) -> dict[str, int]:
    """Greedy generation of one batch: the KV cache (2 × kv per token per layer, prompt + new
    tokens), the prompt's forward pass (as ``eval_activation_bytes``) and the last position's logits."""
    return {"kv_cache": batch.rows * (batch.width + new_tokens) * s.layers * 2 * s.kv_dim * b,
            "prompt_forward": batch.tokens * (block_transient_bytes_per_token(s, b) + b * s.hidden),
            "last_logits": batch.rows * s.vocab * (b + FP32)}


# --- what each method adds ------------------------------------------------------------------------


@dataclass
class MethodMemory:
    """A method's bytes by phase: ``state`` is resident from its first edit on; ``init`` (building
    the method), ``edit`` (one optimisation step, beside its activations), ``merge`` (after the step's
    gradients are gone) and ``eval`` (evaluating the edited model) are transients of phases that never
    overlap."""

    state: dict[str, int] = field(default_factory=dict)
    init: dict[str, int] = field(default_factory=dict)
    edit: dict[str, int] = field(default_factory=dict)
    merge: dict[str, int] = field(default_factory=dict)
    eval: dict[str, int] = field(default_factory=dict)


def _get(cfg: Any, key: str) -> Any:
    return cfg[key] if isinstance(cfg, Mapping) else getattr(cfg, key)


def ties_merge_bytes(n: int, matrix: int, b: int) -> int:
    """Live temporaries of a TIES merge of n matrices of ``matrix`` elements (wise_bench/merge.py):
    the stacked deltas and the stacked trimmed deltas (n each), the weighted product and its masked
    copy during the sign election (n each), the agreement mask (n, bool), and the elected sign and the
    result (1 each). The top-k of the trimming runs one delta at a time and is smaller."""
    return 4 * n * matrix * b + n * matrix * BOOL + 2 * matrix * b


def wise_memory(cfg: Any, s: ModelShape, b: int, T: int) -> MethodMemory:
    """WISE (side memory W' in one FFN projection, d_out × d_in = M elements, model dtype).

    State after T edits: the side memory (M·b); its gradient mask (M, bool); the shards saved since
    the last merge, (T mod merge_freq) // save_freq of them, and the merged memory once T ≥
    merge_freq (WISE-Retrieve: one memory per merge, T // merge_freq); M·b each.
    Edit: the gradient of W' and the clamp bounds W ± norm_constraint (3·M·b). Merge (the edit that
    reaches a multiple of merge_freq): the TIES temporaries of its merge_freq / save_freq shards. Eval: once T ≥ save_freq with unmerged edits, the lazily merged inference view
    (M·b) and its merge's temporaries."""
    d_out, d_in = linear_shape(s, _get(cfg, "layer"))
    m = d_out * d_in
    save, merge_every = _get(cfg, "save_freq"), _get(cfg, "merge_freq")
    retrieve = bool(_get(cfg, "retrieve"))
    pending = (T % merge_every) // save
    merged = T // merge_every if retrieve else int(T >= merge_every)
    state = {"side_memory": m * b, "gradient_mask": m * BOOL if T else 0, "shards": pending * m * b,
             "merged": merged * m * b}
    edit = {"side_gradient_and_bounds": 3 * m * b}
    merge = {"ties_merge": ties_merge_bytes(merge_every // save, m, b) if T >= merge_every else 0}
    unmerged = pending + bool(T % save)
    lazy = not retrieve and T >= save and unmerged
    eval_ = {"merged_view": m * b + ties_merge_bytes(unmerged, m, b) if lazy else 0}
    return MethodMemory(state=state, edit=edit, merge=merge, eval=eval_)


def memoir_memory(cfg: Any, s: ModelShape, b: int, T: int) -> MethodMemory:
    """MEMOIR: W_res in fp32 (d_out × d_in), the bank of stored masks (≤ T rows of d_in bools), the
    permutation (d_in int64) and the background feature (d_in fp32). Edit: W_res's gradient and SGD's
    weight-decayed gradient (2 · 4 · d_out·d_in). Eval: the bank in fp32 for the overlaps, a chunk of
    at most 4096 masks at a time (4 · d_in each)."""
    d_out, d_in = linear_shape(s, _get(cfg, "layer"))
    return MethodMemory(
        state={"residual_fp32": FP32 * d_out * d_in, "mask_bank": T * d_in * BOOL,
               "permutation_and_background": d_in * (INDEX + FP32)},
        edit={"residual_gradient_and_decay": 2 * FP32 * d_out * d_in},
        eval={"bank_fp32_chunk": min(T, 4096) * d_in * FP32})


def grace_memory(cfg: Any, s: ModelShape, b: int, T: int) -> MethodMemory:
    """GRACE: at most one codebook entry per edit, key (d_in) + value (d_out) + radius, fp32. Every
    forward copies the keys (flipped, for ties) and, while training, the values (index_put)."""
    d_out, d_in = linear_shape(s, _get(cfg, "layer"))
    entry = FP32 * (d_in + d_out + 1)
    return MethodMemory(state={"codebook": T * entry}, edit={"key_and_value_copies": T * FP32 * (d_in + d_out)},
                        eval={"key_copy": T * FP32 * d_in})


def ft_memory(cfg: Any, s: ModelShape, b: int, T: int) -> MethodMemory:
    """FT-L/FT-M: the original weight kept for restore (M·b); while editing, its gradient and Adam's
    two moments (model dtype, like the weight) plus one weight-sized temporary of Adam's step."""
    d_out, d_in = linear_shape(s, _get(cfg, "layer"))
    m = d_out * d_in
    return MethodMemory(state={"original_weight": m * b}, edit={"gradient_adam_moments_step": 4 * m * b})


def ultraedit_memory(cfg: Any, s: ModelShape, b: int, T: int, turn_targets: int) -> MethodMemory:
    """UltraEdit: the original weights (restore) and, per weight shape, a running mean and M2 over
    d_in + d_out (fp32). A turn of N = ``turn_targets`` target tokens: per module, keys and gradients
    (N × (d_in + d_out) fp32) kept for the turn, their concatenation, standardised copy and the
    pseudo-values (3 more); the ridge solve's Gram matrix, identity and LU copy (3 · d_in² fp32) and
    KᵀV; then every module's Δ (d_in × d_out fp32) before any is added."""
    shapes = [linear_shape(s, p) for p in _get(cfg, "layers")]
    normalisers = {(o, i) for o, i in shapes}
    rows = turn_targets
    largest_in = max(i for _, i in shapes)
    largest = max(o * i for o, i in shapes)
    return MethodMemory(
        state={"original_weights": sum(o * i for o, i in shapes) * b,
               "normalisers": sum(2 * FP32 * (o + i) for o, i in normalisers)},
        edit={"keys_and_gradients": sum(rows * FP32 * (o + i) for o, i in shapes) + 3 * rows * FP32 * max(o + i for o, i in shapes),
              "ridge_solve": 3 * FP32 * largest_in ** 2 + FP32 * largest,
              "deltas": sum(FP32 * o * i for o, i in shapes)})


def alphaedit_memory(cfg: Any, s: ModelShape, b: int, T: int) -> MethodMemory:
    """AlphaEdit over L layers with key width n (d_in): the originals (L · M · b); the null-space
    projections P and the accumulated K_pK_pᵀ (2 · L · 4n², fp32).
    Init: every layer's second moment C (L · 4n²) is alive while the projections are built, and one
    eigendecomposition in fp64 at a time: C in fp64, its eigenvectors, the solver's workspace
    (~2 · 8n²), U₀ and U₀U₀ᵀ (8n² each) — 6 · 8n².
    Edit: the update's fp64 temporaries: P and K_pK_pᵀ in fp64, (KKᵀ + K_pK_pᵀ)P, the identity and
    its multiple (8n² each), i.e. 5 · 8n² (the solve's LU copy replaces two of them)."""
    shapes = [linear_shape(s, p) for p in _get(cfg, "layers")]
    n = max(i for _, i in shapes)
    layers = len(shapes)
    return MethodMemory(
        state={"original_weights": sum(o * i for o, i in shapes) * b,
               "projections_and_key_covariance": 2 * layers * FP32 * n * n},
        init={"second_moments": layers * FP32 * n * n, "eigendecomposition": 6 * FP64 * n * n},
        edit={"update_fp64": 5 * FP64 * n * n})


def method_memory(name: str, cfg: Any, s: ModelShape, b: int, T: int, turn_targets: int = 0) -> MethodMemory:
    """The method's terms by its registered name (``cfg.name``): wise, wise_retrieve, memoir, grace,
    ft_l, ft_m, alphaedit, ultraedit."""
    if name in ("wise", "wise_retrieve"):
        return wise_memory(cfg, s, b, T)
    if name == "memoir":
        return memoir_memory(cfg, s, b, T)
    if name == "grace":
        return grace_memory(cfg, s, b, T)
    if name in ("ft_l", "ft_m"):
        return ft_memory(cfg, s, b, T)
    if name == "ultraedit":
        return ultraedit_memory(cfg, s, b, T, turn_targets)
    if name == "alphaedit":
        return alphaedit_memory(cfg, s, b, T)
    raise ValueError(f"the memory model has no terms for method '{name}'")


def edited_module(name: str, cfg: Any) -> str:
    """The module whose optimisation step sets the activations: the single layer, MEMIT/AlphaEdit's
    last layer (where δ is optimised), UltraEdit's lowest layer (where its graph starts)."""
    if name == "ultraedit":
        return min(_get(cfg, "layers"), key=layer_index)
    if name == "alphaedit":
        return max(_get(cfg, "layers"), key=layer_index)
    return _get(cfg, "layer")


# --- the prediction --------------------------------------------------------------------------------


@dataclass
class Prediction:
    weights: int
    method: MethodMemory
    edit_activations: dict[str, int]
    eval_activations: dict[str, int]

    def phases(self) -> dict[str, int]:
        """Transient bytes of each phase (what comes on top of weights + state)."""
        m = self.method
        return {"init": sum(m.init.values()),
                "edit": sum(m.edit.values()) + sum(self.edit_activations.values()),
                "merge": sum(m.merge.values()),
                "eval": sum(m.eval.values()) + max(self.eval_activations.values(), default=0)}

    @property
    def state(self) -> int:
        return sum(self.method.state.values())

    @property
    def peak(self) -> int:
        return self.weights + self.state + max(self.phases().values())

    def as_dict(self) -> dict[str, Any]:
        return {"peak": self.peak, "weights": self.weights, "state": self.state, "phases": self.phases(),
                "terms": {"state": self.method.state, "init": self.method.init, "edit": self.method.edit,
                          "merge": self.method.merge, "eval": self.method.eval, "edit_activations": self.edit_activations,
                          "eval_activations": self.eval_activations}}


def predict(config: Any, dtype: torch.dtype | str, name: str, cfg: Any, T: int, edit_batch: Batch,
            eval_batch: Batch, generation: Optional[tuple[Batch, int]] = None, turn_targets: int = 0) -> Prediction:
    """Peak bytes of ``name`` (config ``cfg``) after T edits on a model of ``config`` in ``dtype``.

    ``edit_batch``: one optimisation step's batch (UltraEdit: one micro-batch; ``turn_targets``: the
    target tokens of its whole turn). ``eval_batch``: the largest teacher-forced evaluation batch.
    ``generation``: the largest generation batch and its new tokens, when answers are generated.
    The eval phase takes the larger of teacher forcing and generation (they run one after the other).
    """
    s, b = ModelShape.of(config), dtype_bytes(dtype)
    method = method_memory(name, cfg, s, b, T, turn_targets)
    uses_cache = name != "ultraedit" and bool(_get(cfg, "prefix_cache"))
    edit = edit_activation_bytes(s, b, edit_batch, edited_module(name, cfg), uses_cache)
    tf = eval_activation_bytes(s, b, eval_batch)
    phases = {"teacher_forced": sum(tf.values())}
    if generation is not None:
        phases["generation"] = sum(generation_bytes(s, b, *generation).values())
    return Prediction(weights_bytes(s, dtype), method, edit, phases)


def gib(n_bytes: float) -> float:
    return n_bytes / 2**30


def fits(prediction: Prediction, card_gib: float, reserve_gib: float = 1.5) -> bool:
    """Whether the predicted peak fits a card of ``card_gib`` GiB with ``reserve_gib`` left for what
    max_memory_allocated does not count: the CUDA context and the caching allocator's fragmentation."""
    return gib(prediction.peak) + reserve_gib <= card_gib
