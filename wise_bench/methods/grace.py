"""GRACE: a codebook of (key, value, radius) entries on one layer (docs/baselines.md, GRACE).

Routing is per token position: a position whose layer input lies within the radius of its nearest
key is "edited". The edit key is the layer input at the position that predicts the first target
token (the last prompt token), so under teacher forcing of ``prompt + " " + target`` the same
position of the same prompt finds its own key at distance ~0 without the adapter knowing where the
prompt ends, while paraphrases and unrelated texts fall outside the radius.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from omegaconf import MISSING
from torch import nn

from wise_bench.data import Request
from wise_bench.methods.base import Calibration, Method
from wise_bench.metrics import Encoded, TokenBatch, encode_pair
from wise_bench.models import get_module, linear_weight, set_module
from wise_bench.prefix_cache import prefix_cache


class Replacement(str, enum.Enum):
    replace_last = "replace_last"  # every matched position gets its own key's value
    replace_prompt = "replace_prompt"  # positions up to the last matched one get that key's value
    replace_all = "replace_all"  # every position of a matched sequence gets that key's value


class Distance(str, enum.Enum):
    euclidean = "euclidean"


@dataclass
class GRACEConfig:
    name: str = MISSING
    layer: str = MISSING  # e.g. ${model.edit_layers.grace}
    lr: float = 1.0
    n_iter: int = 50
    eps_init: float = 1.0
    replacement: Replacement = Replacement.replace_last
    distance: Distance = Distance.euclidean
    prefix_cache: bool = True  # replay the frozen computation below the layer across steps (exact)


# --- module swapping (shared with DEFER) ---------------------------------------------------------


def layer_inputs(model: nn.Module, layer: nn.Module, batch: TokenBatch) -> torch.Tensor:
    """The input of ``layer`` at every position of ``batch`` ([batch, seq, in]), without gradients."""
    captured: list[torch.Tensor] = []
    handle = layer.register_forward_pre_hook(lambda _m, args: captured.append(args[0].detach()))
    try:
        with torch.no_grad():
            batch.last_logits(model)  # run for the hooks; the LM head on one position only
    finally:
        handle.remove()
    return captured[0]


# --- the codebook (pure tensor logic, testable on hand-made keys) ---------------------------------


@dataclass
class Codebook:
    keys: torch.Tensor  # [n, in], float32
    values: torch.Tensor  # [n, out], float32
    eps: torch.Tensor  # [n] deferral radii
    labels: list[str] = field(default_factory=list)

    @classmethod
    def empty(cls, key_dim: int, value_dim: int, device) -> "Codebook":
        return cls(torch.zeros(0, key_dim, device=device), torch.zeros(0, value_dim, device=device), torch.zeros(0, device=device))

    def __len__(self) -> int:
        return len(self.labels)

    def nearest(self, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(distance, index) of each query's nearest key; queries [..., in]. Ties go to the newest key."""
        flat = queries.reshape(-1, queries.shape[-1]).float()
        # Exact pairwise differences: the matmul shortcut loses precision near distance 0, where a
        # query meets its own key, and can depend on the batch composition.
        d = torch.cdist(flat, self.keys.flip(0), compute_mode="donot_use_mm_for_euclid_dist")
        dist, rev = d.min(-1)  # min returns the first of equal values: on flipped keys, the newest
        idx = len(self) - 1 - rev
        return dist.view(queries.shape[:-1]), idx.view(queries.shape[:-1])

    def add(self, key: torch.Tensor, value: torch.Tensor, eps: float, label: str) -> int:
        self.keys = torch.cat([self.keys, key.float()[None]])
        self.values = torch.cat([self.values, value.float()[None]])
        self.eps = torch.cat([self.eps, self.eps.new_tensor([eps])])
        self.labels.append(label)
        return len(self) - 1

    def insert(self, key: torch.Tensor, label: str, eps_init: float, new_value: torch.Tensor) -> tuple[int, str]:
        """GRACE's update rule for one edit; returns (entry the edit trains, what happened)."""
        if len(self) == 0:
            return self.add(key, new_value, eps_init, label), "new"
        dist, idx = (float(t) for t in self.nearest(key[None]))
        idx = int(idx)
        if dist > eps_init + float(self.eps[idx]):
            return self.add(key, new_value, eps_init, label), "new"
        if self.labels[idx] != label:
            # Conflict: both balls shrink to half the distance so that neither covers the other key
            # (the old one slightly less, so that the midpoint belongs to the new edit).
            new = self.add(key, new_value, dist / 2, label)
            self.eps[idx] = dist / 2 - 1e-5
            return new, "split"
        self.eps[idx] = max(float(self.eps[idx]), dist)  # same label: grow the ball to cover the key
        return idx, "expand"

    def state(self) -> dict[str, Any]:
        return {"keys": self.keys.clone(), "values": self.values.clone(), "eps": self.eps.clone(), "labels": list(self.labels)}


# --- the adapter that replaces the layer -----------------------------------------------------------


class GRACEAdapter(nn.Module):
    """Wraps the original layer; replaces its output at positions routed to a codebook entry."""

    def __init__(self, layer: nn.Module, codebook: Codebook, replacement: Replacement):
        super().__init__()
        self.layer = layer
        self.codebook = codebook
        self.replacement = Replacement(replacement)
        self.token_mask: Optional[torch.Tensor] = None  # [batch, seq] real tokens, set per forward
        self.training_values: Optional[tuple[torch.Tensor, torch.Tensor]] = None  # (entry ids, trainable rows)

    def values(self) -> torch.Tensor:
        if self.training_values is None:
            return self.codebook.values
        idx, rows = self.training_values
        return self.codebook.values.index_put((idx,), rows)  # differentiable in ``rows`` only

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        out = self.layer(h)
        if len(self.codebook) == 0:
            return out
        dist, idx = self.codebook.nearest(h)
        real = self._real_tokens(h)
        matched = (dist <= self.codebook.eps[idx]) & real
        values = self.values()
        if self.replacement is Replacement.replace_last:
            replace, chosen = matched, values[idx]
        else:
            # One entry per sequence: the last matched position's (the query the reference reads
            # at the last token of the prompt).
            pos = torch.arange(h.shape[1], device=h.device).expand_as(matched)
            last = torch.where(matched, pos, -1).max(-1).values  # [batch], -1: no match
            trigger_idx = idx.gather(1, last.clamp(min=0)[:, None])[:, 0]
            chosen = values[trigger_idx][:, None, :].expand(*h.shape[:2], -1)
            replace = real & (last[:, None] >= 0)
            if self.replacement is Replacement.replace_prompt:
                replace = replace & (pos <= last[:, None])
        return torch.where(replace[..., None], chosen.to(out.dtype), out)

    def _real_tokens(self, h: torch.Tensor) -> torch.Tensor:
        """Non-padding positions of this forward (the mask's last columns when a KV cache is used)."""
        mask = self.token_mask
        if mask is None or mask.shape[0] != h.shape[0]:
            return torch.ones(h.shape[:2], dtype=torch.bool, device=h.device)
        return mask[:, -h.shape[1]:].bool().to(h.device)


# --- the method ------------------------------------------------------------------------------------


class GRACE(Method):
    Config = GRACEConfig

    @staticmethod
    def module_paths(cfg: GRACEConfig) -> list[str]:
        return [cfg.layer]

    def __init__(self, cfg: GRACEConfig, model, ctx):
        super().__init__(cfg, model, ctx)
        self.original = get_module(model, cfg.layer)
        self.device = linear_weight(self.original).device  # the codebook lives beside the layer
        out_dim, in_dim = linear_weight(self.original).shape
        self.codebook = Codebook.empty(in_dim, out_dim, self.device)
        self.adapter: Optional[GRACEAdapter] = None
        self._mask_hook = None
        self._rng = torch.Generator().manual_seed(ctx.seed)

    def _install(self) -> GRACEAdapter:
        """Swap the adapter in (first edit only); a model pre-hook hands it each forward's mask."""
        if self.adapter is None:
            self.adapter = GRACEAdapter(self.original, self.codebook, self.cfg.replacement)
            set_module(self.model, self.cfg.layer, self.adapter)
            self._mask_hook = self.model.register_forward_pre_hook(self._capture_mask, with_kwargs=True)
        return self.adapter

    def _capture_mask(self, _module, args, kwargs):
        mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
        self.adapter.token_mask = mask

    def _cold_value(self) -> torch.Tensor:
        # The reference's "cold" init: uniform in [0, 1); seeded, so runs are reproducible.
        out_dim = self.codebook.values.shape[1]
        return torch.rand(out_dim, generator=self._rng).to(self.device)

    def edit(self, requests: list[Request]) -> dict[str, float]:
        adapter = self._install()
        tok = self.ctx.tokenizer
        encoded = [encode_pair(tok, r.prompt, r.target_new) for r in requests]
        batch = TokenBatch.build(encoded, tok.pad_token_id, self.ctx.device)  # token ids go where the embedding is
        keys = key_vectors(layer_inputs(self.model, self.original, batch), encoded)

        outcomes = [self.codebook.insert(k, r.target_new, self.cfg.eps_init, self._cold_value()) for k, r in zip(keys, requests)]
        trained = torch.tensor(sorted({i for i, _ in outcomes}), device=self.device)
        rows = nn.Parameter(self.codebook.values[trained].clone())
        opt = torch.optim.Adam([rows], lr=self.cfg.lr)
        adapter.training_values = (trained, rows)
        first: Optional[torch.Tensor] = None  # read after the loop: no host sync per step
        try:
            with prefix_cache(self.model, self.cfg.layer, self.cfg.prefix_cache):
                for _ in range(self.cfg.n_iter):
                    loss = batch.mean_target_nll(batch.target_logits(self.model)).mean()
                    first = loss.detach() if first is None else first
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
        finally:
            adapter.training_values = None
            self.codebook.values[trained] = rows.detach()
        with torch.no_grad():
            final = batch.mean_target_nll(batch.target_logits(self.model)).mean().item()
        kinds = [kind for _, kind in outcomes]
        return {"loss_start": final if first is None else first.item(), "loss": final, "keys": len(self.codebook),
                "splits": kinds.count("split"), "expands": kinds.count("expand")}

    def restore(self) -> None:
        if self.adapter is not None:
            set_module(self.model, self.cfg.layer, self.original)
            self._mask_hook.remove()
            self.adapter = self._mask_hook = None
        out_dim, in_dim = linear_weight(self.original).shape
        self.codebook = Codebook.empty(in_dim, out_dim, self.device)
        self._rng.manual_seed(self.ctx.seed)

    def state_dict(self) -> dict[str, Any]:
        # The generator's state too: a resumed run must draw the cold values an uninterrupted one draws.
        return {**self.codebook.state(), "rng": self._rng.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.restore()
        self.codebook = Codebook(*(state[k].to(self.device, copy=True) for k in ("keys", "values", "eps")), list(state["labels"]))
        self._rng.set_state(state["rng"])
        if len(self.codebook):
            self._install()

    @classmethod
    def calibrate(cls, cfg: GRACEConfig, model, ctx, requests: list[Request]) -> Calibration:
        """eps_init from the geometry of the layer's inputs on a tuning split.

        GRACE edits one input: a new key's ball should reach no other input, neither unrelated text
        (locality) nor a paraphrase (GRACE does not generalise by design). eps_init is half the 1%
        quantile of the distance from those other inputs (every position of the requests' irrelevant
        texts, and each paraphrase where it predicts the target) to the nearest edit key."""
        layer, tok, pad = get_module(model, cfg.layer), ctx.tokenizer, ctx.tokenizer.pad_token_id
        edits = [encode_pair(tok, r.prompt, r.target_new) for r in requests]
        keys = last_prompt_inputs(model, layer, edits, pad, ctx.device)
        irrelevant = [Encoded(tuple(tok(f"{r.loc_prompt} {r.loc_answer}".rstrip())["input_ids"]), ()) for r in requests]
        d_irrelevant = nearest_distances(all_position_inputs(model, layer, irrelevant, pad, ctx.device), keys)
        paraphrases = [encode_pair(tok, r.rephrase_prompt, r.target_new) for r in requests if r.rephrase_prompt]
        d_para = torch.zeros(0)
        if paraphrases:
            d_para = nearest_distances(last_prompt_inputs(model, layer, paraphrases, pad, ctx.device), keys)
        others = torch.cat([d_irrelevant, d_para])
        eps = 0.5 * float(torch.quantile(others[others > 0], 0.01))  # 0: a paraphrase equal to a prompt
        measured = {"requests": len(requests), "irrelevant_positions": len(d_irrelevant),
                    "other_inputs_to_nearest_key_q01": 2 * eps,
                    "irrelevant_to_nearest_key_median": float(d_irrelevant.median()),
                    "irrelevant_within_eps": float((d_irrelevant <= eps).float().mean())}
        if paraphrases:
            measured |= {"paraphrase_to_nearest_key_median": float(d_para.median()),
                         "paraphrases_within_eps": float((d_para <= eps).float().mean())}
        return Calibration({"grace_eps_init": float(f"{eps:.4g}")}, measured)


def last_prompt_inputs(model, layer, seqs: list[Encoded], pad_id: int, device, batch_size: int = 32) -> torch.Tensor:
    """The layer's input at the position predicting each sequence's first target token, [n, in]."""
    out = []
    for s in range(0, len(seqs), batch_size):
        chunk = seqs[s:s + batch_size]
        out.append(key_vectors(layer_inputs(model, layer, TokenBatch.build(chunk, pad_id, device)), chunk))
    return torch.cat(out).float()


def all_position_inputs(model, layer, seqs: list[Encoded], pad_id: int, device, batch_size: int = 32) -> torch.Tensor:
    """The layer's input at every real position of every sequence, [positions, in]."""
    out = []
    for s in range(0, len(seqs), batch_size):
        batch = TokenBatch.build(seqs[s:s + batch_size], pad_id, device)
        inputs = layer_inputs(model, layer, batch)  # on the layer's device, the mask on the input device
        out.append(inputs[batch.attention_mask.bool().to(inputs.device)])
    return torch.cat(out).float()


def nearest_distances(queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    return torch.cdist(queries, keys, compute_mode="donot_use_mm_for_euclid_dist").min(-1).values


def key_vectors(inputs: torch.Tensor, encoded: list[Encoded]) -> torch.Tensor:
    """Each sequence's layer input at the position predicting its first target token (left padding)."""
    width = inputs.shape[1]
    cols = [width - len(e.ids) + e.target_pos[0] - 1 for e in encoded]
    return inputs[torch.arange(len(encoded)), cols]
