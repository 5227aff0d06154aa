"""WISE: a side memory in one FFN output projection, chosen per sequence by an activation router.

Wang et al., NeurIPS 2024 (arXiv 2405.14768). docs/wise.md describes the method as the paper and
its reference implementation define it, and where and why this code departs from the reference.

The edited linear layer is replaced by ``SideMemoryLayer``, which keeps the original module (the
main memory W, bias included) untouched and adds a ``MemoryBank``: the trainable side memory W',
its gradient mask, the stored shards, the merged memory (WISE-Merge) or the retrievable memories
(WISE-Retrieve), thresholds and counters. ``restore`` puts the original module back.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, List, Optional, Sequence

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn
from transformers.activations import ACT2FN

from wise_bench.data import Request
from wise_bench.errors import UserError
from wise_bench.merge import MergeAlg, merge
from wise_bench.methods.base import Calibration
from wise_bench.methods.side_memory import (
    EditBatch,
    SideMemoryEditor,
    TemplatedEditConfig,
    build_edit_batch,
    edit_nll,
    real_positions,
    run_model,
    seeded,
    should_stop,
)
from wise_bench.metrics import Encoded, TokenBatch, encode_pair
from wise_bench.models import linear_weight
from wise_bench.prefix_cache import prefix_cache


@dataclass
class WiseConfig(TemplatedEditConfig):
    retrieve: bool = False  # WISE-Retrieve (one retrievable memory per merge) instead of WISE-Merge
    replay: bool = False  # WISE-Retrieve only: keep past groups' edits routed away from the side memory
    mask_ratio: float = 0.2  # keep probability of the per-shard gradient mask
    act_margin: List[float] = field(default_factory=lambda: [5.0, 20.0, 10.0])  # alpha, beta, gamma
    act_ratio: float = 0.88  # threshold = act_ratio * min in-scope score
    norm_constraint: float = 1.0  # W' stays element-wise within W +- this
    save_freq: int = 500  # edits per shard
    merge_freq: int = 1000  # edits per merge (a multiple of save_freq)
    merge_alg: MergeAlg = MergeAlg.ties
    density: float = 0.53
    weights: float = 1.0  # total weight of the shards in a first merge
    merged_weight: float = 0.6  # weight of the previous merge in later merges (new shards share the rest)
    max_mean_positions: int = 100  # at inference, longer sequences are scored by their largest delta


# --- scores and losses (pure) ----------------------------------------------------------------------


def activation_fn(model_config: Any) -> Callable[[torch.Tensor], torch.Tensor]:
    name = getattr(model_config, "hidden_act", None) or getattr(model_config, "activation_function", None)
    if name not in ACT2FN:
        raise UserError(f"WISE needs the model's activation function; config names {name!r}")
    return ACT2FN[name]


def activation_delta(original_out: torch.Tensor, memory_out: torch.Tensor, act: Callable) -> torch.Tensor:
    """||act(W' h_t) - act(W h_t)||_2 at every position, [batch, seq] (in float32)."""
    return (act(memory_out.float()) - act(original_out.float())).norm(dim=-1)


def sequence_scores(delta: torch.Tensor, real: torch.Tensor, max_mean_positions: Optional[int] = None) -> torch.Tensor:
    """Per sequence: the mean delta over its real (non-pad) positions, so that padding never changes
    a sequence's score; with ``max_mean_positions``, the max for sequences longer than that."""
    n = real.sum(-1)
    mean = (delta * real).sum(-1) / n.clamp(min=1)
    if max_mean_positions is None:
        return mean
    peak = delta.masked_fill(~real, float("-inf")).amax(-1)
    return torch.where(n > max_mean_positions, peak, mean)


def positive_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean of the positive entries, 0 when there are none (the reference's hinge averaging)."""
    positive = x > 0
    return (x * positive).sum() / positive.sum().clamp(min=1)


def routing_losses(in_scores: torch.Tensor, out_scores: torch.Tensor, margins: Sequence[float]) -> tuple[torch.Tensor, ...]:
    """(L_out, L_in, L_gap): x_loc scores below alpha, edit-row scores above beta, and every edit row
    at least gamma above every x_loc row."""
    alpha, beta, gamma = margins
    return (
        positive_mean(out_scores - alpha),
        positive_mean(beta - in_scores),
        positive_mean(out_scores[:, None] - in_scores[None, :] + gamma),
    )


def route_merge(scores: torch.Tensor, threshold: float) -> torch.Tensor:
    """WISE-Merge, per sequence: the memory with the largest score (the first on ties), or -1 (main
    memory) when every score is below the threshold. ``scores`` is [memories, batch]."""
    best, choice = scores.max(0).values, scores.argmax(0)
    return torch.where(best >= threshold, choice, -1)


def route_retrieve(scores: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """WISE-Retrieve, per sequence: memory 0 (the side memory) if its score reaches its threshold,
    else -1 (main memory); then each stored memory replaces the choice if its score is above its
    own threshold and above the best score so far, which starts at the side memory's score."""
    choice = torch.where(scores[0] >= thresholds[0], 0, -1)
    best = scores[0]
    for k in range(1, len(scores)):
        take = (scores[k] > thresholds[k]) & (scores[k] > best)
        choice = torch.where(take, k, choice)
        best = torch.where(take, scores[k], best)
    return choice


MASK_STREAM, MERGE_STREAM, REPLAY_STREAM = 1, 2, 3


# --- the memories ------------------------------------------------------------------------------


@dataclass
class Memory:
    """A stored side memory and the smallest in-scope score of the edits it holds."""

    weight: torch.Tensor  # (out, in)
    min_score: float
    edits: list[list[int]]  # token ids of each edit's prompt + target (for replay)


@dataclass
class Routing:
    """What the layer may answer with at inference, in routing order, and each one's threshold."""

    weights: list[torch.Tensor]
    thresholds: list[float]
    retrieve: bool


class MemoryBank:
    """The WISE state of one layer: side memory, its mask, shards, merges, thresholds, counters."""

    def __init__(self, original: torch.Tensor, cfg: WiseConfig, seed: int):
        self.original = original  # W, (out, in); never changed
        self.cfg = cfg
        self.seed = seed
        self.n_edits = 0
        self.side = original.detach().clone(memory_format=torch.contiguous_format)
        self.mask: Optional[torch.Tensor] = None
        self.mask_shard = -1  # the shard the mask was drawn for
        # Min in-scope score behind the side memory's threshold: over all edits for WISE-Merge,
        # over the current shard for WISE-Retrieve.
        self.side_min = math.inf
        self.side_edits: list[list[int]] = []  # edits in the current shard
        self.shards: list[Memory] = []  # saved, not yet merged
        self.merged: Optional[torch.Tensor] = None  # WISE-Merge: the merged memory
        self.retrieved: list[Memory] = []  # WISE-Retrieve: one memory per merge
        self._routing: Optional[Routing] = None  # inference view, rebuilt after each edit

    def start_edit(self) -> None:
        """Draw the gradient mask at the first edit of a shard; forget the inference view."""
        shard = self.n_edits // self.cfg.save_freq
        if shard != self.mask_shard:
            keep = torch.rand(self.side.shape, generator=seeded(self.seed, MASK_STREAM, shard)) < self.cfg.mask_ratio
            self.mask, self.mask_shard = keep.to(self.side.device), shard
        self._routing = None

    def finish_edit(self, scores: Sequence[float], edits: list[list[int]]) -> None:
        """Count the edits (one in-scope score each), then save and merge at the shard boundaries."""
        before = self.n_edits
        self.n_edits += len(edits)
        self.side_min = min(self.side_min, *scores)
        self.side_edits += edits
        if self.n_edits // self.cfg.save_freq > before // self.cfg.save_freq:
            self._save_shard()
        if self.n_edits // self.cfg.merge_freq > before // self.cfg.merge_freq:
            self._merge_shards()
        self._routing = None

    def _save_shard(self) -> None:
        self.shards.append(Memory(self.side.detach().clone(), self.side_min, self.side_edits))
        self.side = self.original.detach().clone(memory_format=torch.contiguous_format)
        self.side_edits = []
        if self.cfg.retrieve:
            self.side_min = math.inf

    def _merge(self, weights: list[torch.Tensor], shares: list[float]) -> torch.Tensor:
        c = self.cfg
        generator = seeded(self.seed, MERGE_STREAM, self.n_edits)
        return merge(c.merge_alg, self.original, weights, shares, c.density, generator)

    def _merged_with(self, weights: list[torch.Tensor]) -> torch.Tensor:
        """WISE-Merge: ``weights`` merged with the previous merge (0.6 vs 0.4 shared), or alone at first."""
        n, c = len(weights), self.cfg
        if self.merged is None:
            return self._merge(weights, [c.weights / n] * n)
        return self._merge(weights + [self.merged], [(1 - c.merged_weight) / n] * n + [c.merged_weight])

    def _merge_shards(self) -> None:
        if not self.cfg.retrieve:
            self.merged = self._merged_with([s.weight for s in self.shards])
        else:
            n = len(self.shards)
            weight = self._merge([s.weight for s in self.shards], [self.cfg.weights / n] * n)
            edits = [e for s in self.shards for e in s.edits]
            self.retrieved.append(Memory(weight, min(s.min_score for s in self.shards), edits))
        self.shards = []

    def routing(self) -> Routing:
        if self._routing is None:
            self._routing = self._inference_routing()
        return self._routing

    def _inference_routing(self) -> Routing:
        """The memories inference chooses from. WISE-Merge merges what is not merged yet (shards and
        a partial side memory) lazily, once T >= save_freq; that merge lives only in this view, so an
        intermediate evaluation never changes the edits that follow."""
        ratio = self.cfg.act_ratio
        if self.cfg.retrieve:
            stored = self.retrieved + self.shards
            return Routing(
                [self.side] + [m.weight for m in stored],
                [ratio * self.side_min] + [ratio * m.min_score for m in stored],
                retrieve=True,
            )
        pending = [s.weight for s in self.shards] + ([self.side] if self.side_edits else [])
        if pending and self.n_edits >= self.cfg.save_freq:
            weights = [self._merged_with(pending)]
        else:
            weights = [self.side] + ([self.merged] if self.merged is not None else [])
        return Routing(weights, [ratio * self.side_min] * len(weights), retrieve=False)

    def replay_groups(self) -> list[list[list[int]]]:
        """Edits of each stored memory, in routing order (WISE-Retrieve replay)."""
        return [m.edits for m in self.retrieved + self.shards]

    # --- persistence ---

    def state(self) -> dict[str, Any]:
        def memories(ms: list[Memory]) -> list[dict]:
            return [{"weight": m.weight.detach().clone(), "min_score": m.min_score, "edits": m.edits} for m in ms]

        return {
            "n_edits": self.n_edits,
            "side": self.side.detach().clone(),
            "mask": None if self.mask is None else self.mask.clone(),
            "mask_shard": self.mask_shard,
            "side_min": self.side_min,
            "side_edits": [list(e) for e in self.side_edits],
            "shards": memories(self.shards),
            "merged": None if self.merged is None else self.merged.detach().clone(),
            "retrieved": memories(self.retrieved),
        }

    def load(self, state: dict[str, Any]) -> None:
        like = self.original

        def memories(ms: list[dict]) -> list[Memory]:
            return [Memory(m["weight"].to(like), m["min_score"], [list(e) for e in m["edits"]]) for m in ms]

        self.n_edits = state["n_edits"]
        self.side = state["side"].to(like).clone()
        self.mask = None if state["mask"] is None else state["mask"].to(like.device)
        self.mask_shard = state["mask_shard"]
        self.side_min = state["side_min"]
        self.side_edits = [list(e) for e in state["side_edits"]]
        self.shards = memories(state["shards"])
        self.merged = None if state["merged"] is None else state["merged"].to(like)
        self.retrieved = memories(state["retrieved"])
        self._routing = None


class SideMemoryLayer(nn.Module):
    """Stands in for the edited linear layer (nn.Linear or Conv1D).

    While editing it answers with the side memory and keeps each sequence's activation score for the
    loss. At inference it scores every memory per sequence (over the sequence's real positions, taken
    from the attention mask the model was called with) and answers with the routed one, so batched
    left-padded evaluation gives each sequence what it would get alone.
    """

    def __init__(self, base: nn.Module, bank: MemoryBank, act: Callable, max_mean_positions: int):
        super().__init__()
        self.base = base  # the original module: the main memory, bias included
        self.bank = bank
        self.act = act
        self.max_mean_positions = max_mean_positions
        self.editing = False
        self.attention_mask: Optional[torch.Tensor] = None  # set around each model call by a hook
        self.scores: Optional[torch.Tensor] = None  # per-sequence scores of the last editing forward

    def _linear(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.linear(x, weight, self.base.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        original = self.base(x)
        real = real_positions(self.attention_mask, x)
        if self.editing:
            out = self._linear(x, self.bank.side)
            self.scores = sequence_scores(activation_delta(original, out, self.act), real)
            return out
        routing = self.bank.routing()
        outs = [self._linear(x, w) for w in routing.weights]
        scores = torch.stack(
            [sequence_scores(activation_delta(original, o, self.act), real, self.max_mean_positions) for o in outs]
        )
        if routing.retrieve:
            choice = route_retrieve(scores, torch.tensor(routing.thresholds, device=scores.device))
        else:
            choice = route_merge(scores, routing.thresholds[0])
        out = original
        for k, o in enumerate(outs):
            out = torch.where((choice == k)[:, None, None], o, out)
        return out


@dataclass
class ReplayBatch:
    tokens: TokenBatch  # rows without targets: only their activation scores count
    n_past: int  # the first n_past rows come from past groups, the rest from the current one


def scoring_batch(rows: Sequence[Sequence[int]], pad_id: int, device) -> TokenBatch:
    return TokenBatch.build([Encoded(tuple(r), ()) for r in rows], pad_id, device)


OUT_MARGIN_OFF = 1e9  # an alpha no score reaches: L_out never acts


def margins_from_probe(in_scope: torch.Tensor, irrelevant: torch.Tensor) -> list[float]:
    """(alpha, beta, gamma) from edits made without routing terms.

    beta = the median in-scope score such an edit reaches (``in_scope``, one edit each from the unedited
    model). If the irrelevant texts' scores after those edits in sequence (``irrelevant``) stay below
    beta / 4 at their median, alpha and gamma keep the reference's proportions (5 : 20 : 10). If not,
    edits by themselves make unrelated text louder than alpha, so L_out could only be met by undoing
    them: it would act at every step of every edit (on `small` that erased earlier edits, docs/wise.md).
    Then L_out is off and gamma = the 99% quantile of those irrelevant scores, so edit rows are kept
    that far above their irrelevant row instead (routing by the gap)."""
    def four_digits(x: float) -> float:
        return float(f"{x:.4g}")

    beta = float(in_scope.float().median())
    if float(irrelevant.float().median()) <= beta / 4:
        return [four_digits(beta / k) for k in (4, 1, 2)]
    return [OUT_MARGIN_OFF, four_digits(beta), four_digits(float(irrelevant.float().quantile(0.99)))]


def routing_ratio(irrelevant: torch.Tensor, floor: float, max_routed: float = 0.01) -> float:
    """The smallest act_ratio in 0.30, 0.35, ..., 0.95 whose threshold (ratio x ``floor``, the smallest
    in-scope score) routes at most ``max_routed`` of the irrelevant scores to a side memory."""
    ratios = [round(0.30 + 0.05 * i, 2) for i in range(14)]
    return next((q for q in ratios if float((irrelevant >= q * floor).float().mean()) <= max_routed), ratios[-1])


# --- the method ---------------------------------------------------------------------------------


class WISE(SideMemoryEditor):
    Config = WiseConfig

    def __init__(self, cfg: WiseConfig, model: nn.Module, ctx):
        super().__init__(cfg, model, ctx)
        if cfg.save_freq < 1 or cfg.merge_freq % cfg.save_freq:
            raise UserError(f"method.merge_freq={cfg.merge_freq} must be a multiple of method.save_freq={cfg.save_freq} >= 1")
        if len(cfg.act_margin) != 3:
            raise UserError(f"method.act_margin must be [alpha, beta, gamma], got {list(cfg.act_margin)}")
        if not ctx.train_texts:
            raise UserError("WISE trains against irrelevant texts: the dataset needs a train_file")
        self.act = activation_fn(model.config)

    def make_layer(self, base: nn.Module) -> SideMemoryLayer:
        bank = MemoryBank(linear_weight(base), self.cfg, self.ctx.seed)
        return SideMemoryLayer(base, bank, self.act, self.cfg.max_mean_positions)

    # --- editing ---

    def edit(self, requests: list[Request]) -> dict[str, float]:
        layer = self._install()
        bank = layer.bank
        texts = self.ctx.train_texts
        batch = build_edit_batch(
            self.ctx.tokenizer, requests, self.context_prefixes(), [texts[r.index % len(texts)] for r in requests], self.ctx.device
        )
        bank.start_edit()
        replay = self._replay_batch(bank)
        cache = prefix_cache(self.model, self.cfg.layer, self.cfg.prefix_cache)
        layer.editing = True
        bank.side.requires_grad_(True)
        try:
            with cache:
                loss, in_scores = self._optimise(layer, batch, replay)
        finally:
            layer.editing, layer.scores = False, None
            bank.side.requires_grad_(False)
            bank.side.grad = None
        # The edit's in-scope score: the mean over its rows, from the last forward pass.
        per_request = in_scores.view(len(requests), -1).mean(1).tolist()
        bank.finish_edit(per_request, batch.plain)
        return {"loss_start": self.losses[0] if self.losses else loss, "loss": loss, "steps": len(self.losses), "score": min(per_request)}

    def _optimise(self, layer: SideMemoryLayer, batch: EditBatch, replay: Optional[ReplayBatch]) -> tuple[float, torch.Tensor]:
        c, bank = self.cfg, layer.bank
        opt = torch.optim.SGD([bank.side], lr=c.edit_lr, weight_decay=c.weight_decay)
        lo, hi = bank.original - c.norm_constraint, bank.original + c.norm_constraint
        self.losses = []
        for _ in range(c.n_iter):
            loss, in_scores = self._loss(layer, batch, replay)
            if should_stop(self.losses, c.early_stop_delta, c.early_stop_loss):
                break
            opt.zero_grad()
            loss.backward()
            bank.side.grad.mul_(bank.mask)
            opt.step()
            with torch.no_grad():
                bank.side.copy_(torch.minimum(torch.maximum(bank.side, lo), hi))
            self.losses.append(loss.item())
        return loss.item(), in_scores.detach()

    def _loss(self, layer: SideMemoryLayer, batch: EditBatch, replay: Optional[ReplayBatch]) -> tuple[torch.Tensor, torch.Tensor]:
        target_logits = batch.tokens.target_logits(self.model)
        scores, n = layer.scores, batch.n_edit_rows
        nll = edit_nll(batch.tokens, target_logits)  # on the input device; the scores on the layer's
        loss = nll + sum(routing_losses(scores[:n], scores[n:], self.cfg.act_margin)).to(nll.device)
        if replay is not None:
            run_model(self.model, replay.tokens)
            loss = loss + self._replay_loss(layer.scores, replay.n_past).to(nll.device)
        return loss, scores[:n]

    # --- WISE-Retrieve replay (paper App. B.3) ---

    def _replay_batch(self, bank: MemoryBank) -> Optional[ReplayBatch]:
        """One stored edit of each past group, then one earlier edit of the current group.

        Drawn once per edit (not per step), so the prefix cache serves the replay batch too.
        """
        groups = bank.replay_groups()
        if not (self.cfg.retrieve and self.cfg.replay and groups):
            return None
        g = seeded(self.ctx.seed, REPLAY_STREAM, bank.n_edits)
        pick = [group[int(torch.randint(len(group), (1,), generator=g))] for group in groups + [bank.side_edits] if group]
        return ReplayBatch(scoring_batch(pick, self.ctx.tokenizer.pad_token_id, self.ctx.device), len(groups))

    def _replay_loss(self, scores: torch.Tensor, n_past: int) -> torch.Tensor:
        """Past groups' edits below alpha, the current group's edit above beta."""
        alpha, beta, _ = self.cfg.act_margin
        return positive_mean(scores[:n_past] - alpha) + positive_mean(beta - scores[n_past:])

    # --- persistence ---

    def state_dict(self) -> dict[str, Any]:
        return {} if self.layer is None else self.layer.bank.state()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.restore()
        if state:
            self._install().bank.load(state)

    # --- calibration (python -m wise_bench.calibrate) ---

    def side_memory_scores(self, seqs: list[Encoded]) -> torch.Tensor:
        """Each sequence's activation score under the current side memory (no routing)."""
        layer = self._install()
        layer.editing = True
        try:
            with torch.no_grad():
                run_model(self.model, TokenBatch.build(seqs, self.ctx.tokenizer.pad_token_id, self.ctx.device))
            return layer.scores.float().cpu()
        finally:
            layer.editing, layer.scores = False, None

    @classmethod
    def calibrate(cls, cfg: WiseConfig, model: nn.Module, ctx, requests: list[Request]) -> Calibration:
        """Margins and act_ratio from the activation scores edits produce on this model.

        1. Probe edits with the edit loss alone (routing terms off), one request each from the
           unedited model: beta = the median in-scope score such an edit reaches by itself. The same
           edits in sequence, then the requests' irrelevant texts scored: alpha and gamma follow from
           both (``margins_from_probe``: the reference's proportions, or L_out off and a gap).
        2. A sequential run with those margins on the same requests: act_ratio is the smallest ratio
           (0.30-0.95, steps of 0.05) whose threshold (ratio x the smallest in-scope score) keeps at
           least 99% of the requests' irrelevant texts on the main memory; paraphrases above it are
           what Gen can reach."""
        tok = ctx.tokenizer
        probe = cls(OmegaConf.merge(cfg, {"act_margin": [OUT_MARGIN_OFF, -1e9, -1e9]}), model, ctx)  # no routing term acts
        natural = []
        for r in requests:
            natural.append(probe.edit([r])["score"])
            probe.restore()
        irrelevant_pairs = [encode_pair(tok, r.loc_prompt, r.loc_answer) for r in requests]
        for r in requests:
            probe.edit([r])
        unrouted = probe.side_memory_scores(irrelevant_pairs)
        probe.restore()
        natural = torch.tensor(natural)
        margins = margins_from_probe(natural, unrouted)

        run = cls(OmegaConf.merge(cfg, {"act_margin": margins}), model, ctx)
        for r in requests:
            run.edit([r])
        floor = run.layer.bank.side_min
        irrelevant = run.side_memory_scores(irrelevant_pairs)
        para = run.side_memory_scores([encode_pair(tok, r.rephrase_prompt, r.target_new) for r in requests if r.rephrase_prompt])
        run.restore()
        ratio = routing_ratio(irrelevant, floor)
        measured = {"requests": len(requests), "probe_in_scope_score_median": float(natural.median()),
                    "probe_in_scope_score_q10": float(natural.quantile(0.1)),
                    "unrouted_irrelevant_score_median": float(unrouted.median()),
                    "unrouted_irrelevant_score_q99": float(unrouted.quantile(0.99)),
                    "l_out": "on" if margins[0] < OUT_MARGIN_OFF else "off",
                    "sequential_min_in_scope_score": floor,
                    "irrelevant_score_q99": float(irrelevant.quantile(0.99)),
                    "irrelevant_routed_at_ratio": float((irrelevant >= ratio * floor).float().mean())}
        if len(para):
            measured["paraphrases_routed_at_ratio"] = float((para >= ratio * floor).float().mean())
        return Calibration({"wise_act_margin": margins, "wise_act_ratio": ratio}, measured)
