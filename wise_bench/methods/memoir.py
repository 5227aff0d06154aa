"""MEMOIR: a residual memory in one FFN output projection, its columns chosen per edit by TopHash.

Wang et al., NeurIPS 2025 (arXiv 2506.07899). docs/memoir.md describes the method as implemented,
the calibration of tau and where this code departs from the reference.

The edited layer computes ``W0 a + W_res (m * a)``: W0 is the original module (untouched), W_res a
zero-initialised matrix of the same shape, and m a 0/1 mask over the layer's input units. An edit
trains W_res through the mask of its own prompt. At inference each sequence computes the mask of its
prompt, finds the stored mask it overlaps most, and, if that overlap reaches tau, answers with the
residual under the stored mask; otherwise the layer is the original one.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from wise_bench.data import Request
from wise_bench.errors import UserError
from wise_bench.methods.base import Calibration
from wise_bench.methods.side_memory import (
    SideMemoryEditor,
    TemplatedEditConfig,
    build_edit_batch,
    edit_nll,
    real_positions,
    seeded,
    should_stop,
)
from wise_bench.metrics import PROMPT_MASK, Encoded, TokenBatch, encode_pair
from wise_bench.models import get_module, linear_weight
from wise_bench.prefix_cache import prefix_cache


@dataclass
class MemoirConfig(TemplatedEditConfig):
    n_iter: int = 30
    top_k: int = 4096  # mask size k: input units an edit writes to (LLaMA-3-8B: 4096 of 14336)
    tau: float = 0.4  # overlap |M_q & M_j| / k at which a query is routed to stored mask j
    grad_clip: float = 1.0  # gradient-norm clipping of W_res before each step
    background_texts: int = 100  # irrelevant texts averaged into the background feature


PERMUTATION_STREAM = 4


# --- TopHash and routing (pure) ---------------------------------------------------------------------


def mean_over(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """[batch, seq, D] averaged over each row's ``positions`` ([batch, seq] bool), in float32."""
    weights = positions.to(torch.float32)
    return torch.einsum("bs,bsd->bd", weights, x.float()) / weights.sum(-1, keepdim=True).clamp(min=1)


def tophash(features: torch.Tensor, background: torch.Tensor, k: int, permutation: torch.Tensor) -> torch.Tensor:
    """[batch, D] masks: the k units where the feature differs most from the background, permuted."""
    top = (features - background).abs().topk(k, dim=-1).indices
    masks = torch.zeros(features.shape, dtype=torch.bool, device=features.device)
    return masks.scatter_(1, permutation[top], True)


def overlaps(queries: torch.Tensor, bank: torch.Tensor, k: int, chunk: int = 4096) -> torch.Tensor:
    """[batch, M]: |M_q & M_j| / k of every query mask with every stored mask (both bool [., D]).

    Counts are exact in float32 (integers below 2**24); the bank is converted a chunk at a time."""
    q = queries.float()
    counts = [q @ bank[i:i + chunk].float().T for i in range(0, len(bank), chunk)]
    return torch.cat(counts, dim=1) / k


def route(overlap: torch.Tensor, tau: float) -> torch.Tensor:
    """Per query, the stored mask it overlaps most (the first on ties), or -1 below tau."""
    best, choice = overlap.max(-1).values, overlap.argmax(-1)
    return torch.where(best >= tau, choice, -1)


def pack_masks(masks: torch.Tensor) -> torch.Tensor:
    """[M, D] bool -> [M, ceil(D/8)] uint8 (8 units per byte), for state dicts."""
    bits = F.pad(masks, (0, -masks.shape[1] % 8)).view(len(masks), -1, 8).to(torch.uint8)
    return (bits << torch.arange(8, dtype=torch.uint8, device=masks.device)).sum(-1, dtype=torch.uint8)


def unpack_masks(packed: torch.Tensor, width: int) -> torch.Tensor:
    bits = (packed[..., None] >> torch.arange(8, dtype=torch.uint8, device=packed.device)) & 1
    return bits.view(len(packed), -1)[:, :width].bool()


# --- the memory and the layer -------------------------------------------------------------------


class ResidualMemory:
    """W_res, the permutation, the background feature and the bank of stored masks of one layer."""

    def __init__(self, original: torch.Tensor, cfg: MemoirConfig, seed: int, background: torch.Tensor):
        out_features, width = original.shape
        device = original.device
        # float32 whatever the model's dtype: lr-1 SGD steps of a few 1e-3 would round away in bf16.
        self.weight = torch.zeros(out_features, width, dtype=torch.float32, device=device)
        self.permutation = torch.randperm(width, generator=seeded(seed, PERMUTATION_STREAM, 0)).to(device)
        self.background = background.to(device=device, dtype=torch.float32)
        self.bank = torch.zeros(0, width, dtype=torch.bool, device=device)
        self.k, self.tau = cfg.top_k, cfg.tau
        self.steps = 0  # optimisation steps taken over all edits: weight decay reaches every column

    def masks(self, features: torch.Tensor) -> torch.Tensor:
        return tophash(features, self.background, self.k, self.permutation)

    def store(self, mask: torch.Tensor) -> None:
        """Append an edit's mask; one equal to a stored mask is not stored twice (they share columns)."""
        if not (self.bank == mask).all(-1).any():
            self.bank = torch.cat([self.bank, mask[None]])

    def routed_columns(self, queries: torch.Tensor) -> Optional[torch.Tensor]:
        """[batch, D] float: per query, the stored mask it is routed to, or zeros; None if none is."""
        if not len(self.bank):
            return None
        choice = route(overlaps(queries, self.bank, self.k), self.tau)
        if (choice < 0).all():
            return None
        return self.bank[choice.clamp(min=0)].float() * (choice >= 0)[:, None]

    def state(self) -> dict[str, Any]:
        return {"weight": self.weight.clone(), "permutation": self.permutation.clone(), "background": self.background.clone(),
                "bank": pack_masks(self.bank), "width": self.bank.shape[1], "top_k": self.k, "tau": self.tau,
                "steps": self.steps}

    def load(self, state: dict[str, Any]) -> None:
        device = self.weight.device
        self.weight = state["weight"].to(device=device, dtype=torch.float32).clone()
        self.permutation = state["permutation"].to(device)
        self.background = state["background"].to(device)
        self.bank = unpack_masks(state["bank"].to(device), state["width"])
        self.k, self.tau, self.steps = state["top_k"], state["tau"], state["steps"]


class ResidualMemoryLayer(nn.Module):
    """Stands in for the edited linear layer: the original output plus W_res on masked inputs.

    While editing, ``edit_columns`` (one mask for every row) is set. At inference every sequence is
    routed by the mask of its own prompt: the prompt positions of the TokenBatch being run (``PROMPT_MASK``),
    or all real positions of a call with no such batch (generation: the input is the prompt). A call
    that continues the previous one through a KV cache keeps the previous call's routing.
    """

    def __init__(self, base: nn.Module, memory: ResidualMemory):
        super().__init__()
        self.base = base
        self.memory = memory
        self.attention_mask: Optional[torch.Tensor] = None  # set around each model call by a hook
        self.edit_columns: Optional[torch.Tensor] = None
        self.routed: Optional[torch.Tensor] = None  # the last routing, for KV-cache continuations

    def _residual(self, x: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
        return F.linear(x.float() * columns[:, None, :], self.memory.weight).to(x.dtype)

    def _prompt_positions(self, x: torch.Tensor) -> torch.Tensor:
        prompt = PROMPT_MASK.get()
        if prompt is None:
            return real_positions(self.attention_mask, x)
        if prompt.shape != x.shape[:2]:
            raise RuntimeError(f"prompt mask {tuple(prompt.shape)} does not match the layer input {tuple(x.shape[:2])}")
        return prompt.to(x.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if self.edit_columns is not None:
            return out + self._residual(x, self.edit_columns[None])
        continuing = self.attention_mask is not None and self.attention_mask.shape[1] > x.shape[1]
        if not continuing:
            queries = self.memory.masks(mean_over(x, self._prompt_positions(x)))
            self.routed = self.memory.routed_columns(queries)
        return out if self.routed is None else out + self._residual(x, self.routed)


@torch.no_grad()
def mean_inputs(model: nn.Module, module: nn.Module, seqs: Sequence[Encoded], pad_id: int, device,
                batch_size: int = 32) -> torch.Tensor:
    """[len(seqs), D]: each sequence's input to ``module`` averaged over its real tokens (float32)."""
    captured: list[torch.Tensor] = []
    handle = module.register_forward_pre_hook(lambda _m, args: captured.append(args[0]))
    rows = []
    try:
        for i in range(0, len(seqs), batch_size):
            batch = TokenBatch.build(seqs[i:i + batch_size], pad_id, device)
            captured.clear()
            model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids,
                  use_cache=False, logits_to_keep=1)
            rows.append(mean_over(captured[0], batch.attention_mask.bool().to(captured[0].device)))
    finally:
        handle.remove()
    return torch.cat(rows)


def prompt_only(e: Encoded) -> Encoded:
    """The prompt tokens of ``prompt + " " + target`` as the joined text tokenises them."""
    return Encoded(e.ids[: e.target_pos[0]] if e.target_pos else e.ids, ())


def threshold_above(best: torch.Tensor) -> float:
    """The smallest multiple of 0.01 strictly above every value of ``best``."""
    return round(min(1.0, (int(float(best.max()) * 100 + 1e-6) + 1) / 100), 2)


# --- the method ---------------------------------------------------------------------------------


class MEMOIR(SideMemoryEditor):
    Config = MemoirConfig

    @staticmethod
    def check_modules(cfg: MemoirConfig, modules: dict[str, nn.Module]) -> None:
        if not 0 < cfg.tau <= 1:
            raise UserError(f"method.tau={cfg.tau} must be in (0, 1]: it is a fraction of the mask size top_k")
        width = linear_weight(modules[cfg.layer]).shape[1]
        if not 1 <= cfg.top_k <= width:
            raise UserError(f"method.top_k={cfg.top_k} must be between 1 and the input width of {cfg.layer} ({width})")

    def __init__(self, cfg: MemoirConfig, model: nn.Module, ctx):
        super().__init__(cfg, model, ctx)
        self.check_modules(cfg, {cfg.layer: get_module(model, cfg.layer)})
        if not ctx.train_texts:
            raise UserError("MEMOIR's background feature averages irrelevant texts: the dataset needs a train_file")

    def make_layer(self, base: nn.Module) -> ResidualMemoryLayer:
        tok = self.ctx.tokenizer
        texts = self.ctx.train_texts[: self.cfg.background_texts]
        background = mean_inputs(self.model, base, [Encoded(tuple(tok(t)["input_ids"]), ()) for t in texts],
                                 tok.pad_token_id, self.ctx.device).mean(0)
        return ResidualMemoryLayer(base, ResidualMemory(linear_weight(base), self.cfg, self.ctx.seed, background))

    def prompt_masks(self, seqs: Sequence[Encoded]) -> torch.Tensor:
        """[len(seqs), D]: the TopHash mask of each sequence's prompt (the tokens before its target)."""
        layer = self._install()
        prompts = [prompt_only(e) for e in seqs]
        return layer.memory.masks(mean_inputs(self.model, layer.base, prompts, self.ctx.tokenizer.pad_token_id, self.ctx.device))

    # --- editing ---

    def edit(self, requests: list[Request]) -> dict[str, float]:
        """Edits ``requests`` one after the other (the reference edits one request per step)."""
        runs = [self._edit_one(r) for r in requests]
        memory = self.layer.memory
        return {"loss_start": runs[0][0], "loss": max(r[1] for r in runs), "steps": sum(r[2] for r in runs),
                "masks": len(memory.bank),
                # how far weight decay has shrunk the first edit's columns (reference behaviour, logged)
                "decay": (1 - self.cfg.edit_lr * self.cfg.weight_decay) ** memory.steps}

    def _edit_one(self, request: Request) -> tuple[float, float, int]:
        layer = self._install()
        tok, memory = self.ctx.tokenizer, layer.memory
        mask = self.prompt_masks([encode_pair(tok, request.prompt, request.target_new)])[0]
        batch = build_edit_batch(tok, [request], self.context_prefixes(), [], self.ctx.device).tokens
        c = self.cfg
        opt = torch.optim.SGD([memory.weight], lr=c.edit_lr, weight_decay=c.weight_decay)
        layer.edit_columns = mask.float()
        memory.weight.requires_grad_(True)
        self.losses = []
        try:
            with prefix_cache(self.model, c.layer, c.prefix_cache):
                for _ in range(c.n_iter):
                    loss = edit_nll(batch, batch.target_logits(self.model))
                    if should_stop(self.losses, c.early_stop_delta, c.early_stop_loss):
                        break
                    opt.zero_grad()
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_([memory.weight], c.grad_clip)
                    opt.step()
                    memory.steps += 1
                    self.losses.append(loss.item())
        finally:
            layer.edit_columns = None
            memory.weight.requires_grad_(False)
            memory.weight.grad = None
        memory.store(mask)
        return (self.losses[0] if self.losses else loss.item()), loss.item(), len(self.losses)

    # --- persistence ---

    def state_dict(self) -> dict[str, Any]:
        return {} if self.layer is None else self.layer.memory.state()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.restore()
        if state:
            self._install().memory.load(state)

    def edited_tensors(self) -> list[torch.Tensor]:
        return [] if self.layer is None else [self.layer.memory.weight]

    # --- calibration (python -m wise_bench.calibrate) ---

    @classmethod
    def calibrate(cls, cfg: MemoirConfig, model: nn.Module, ctx, requests: list[Request]) -> Calibration:
        """tau just above the upper tail of irrelevant prompts' best overlaps with a bank of edits.

        The bank holds the masks of the tuning requests' prompts (what editing them all would store;
        masks do not depend on W_res, so no edit is run). Each request's locality prompt is a held-out
        irrelevant query: its best overlap with the bank is what tau must stay above. The paraphrases'
        overlap with their own edit's mask says which share of them tau lets through."""
        method = cls(cfg, model, ctx)
        tok = ctx.tokenizer
        try:
            bank = method.prompt_masks([encode_pair(tok, r.prompt, r.target_new) for r in requests])
            irrelevant = method.prompt_masks([encode_pair(tok, r.loc_prompt, r.loc_answer) for r in requests])
            para_requests = [i for i, r in enumerate(requests) if r.rephrase_prompt]
            para = method.prompt_masks([encode_pair(tok, requests[i].rephrase_prompt, requests[i].target_new) for i in para_requests])
        finally:
            method.restore()
        best_irrelevant = overlaps(irrelevant, bank, cfg.top_k).max(-1).values
        tau = threshold_above(best_irrelevant)
        width = bank.shape[1]
        measured = {"requests": len(requests), "top_k": cfg.top_k, "chance_overlap": round(cfg.top_k / width, 4),
                    "irrelevant_best_overlap_median": float(best_irrelevant.median()),
                    "irrelevant_best_overlap_q99": float(best_irrelevant.quantile(0.99)),
                    "irrelevant_best_overlap_max": float(best_irrelevant.max()),
                    "irrelevant_best_overlap_histogram": histogram(best_irrelevant)}
        if para_requests:
            para_overlap = overlaps(para, bank, cfg.top_k)
            own = para_overlap[torch.arange(len(para_requests)), torch.tensor(para_requests)]
            to_own = route(para_overlap, tau) == torch.tensor(para_requests)
            measured |= {"paraphrase_own_overlap_median": float(own.median()),
                         "paraphrases_routed_to_own_edit": float(to_own.float().mean())}
        return Calibration({"memoir_tau": tau}, measured)


def histogram(values: torch.Tensor, step: float = 0.05) -> str:
    """Counts per bin of width ``step`` from the smallest non-empty bin up: 'lo-hi:count ...'."""
    bins = (values / step).floor().long()
    counts = torch.bincount(bins - bins.min())
    lo = int(bins.min())
    return " ".join(f"{(lo + i) * step:.2f}-{(lo + i + 1) * step:.2f}:{int(c)}" for i, c in enumerate(counts) if c)
