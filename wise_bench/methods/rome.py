"""ROME: rank-one model editing of one MLP output matrix (docs/locate_edit.md).

Locate: the key k* is the layer's input at the subject's last token, averaged over context
templates. Value: a vector δ added to the layer's output at that token is optimised until the
model predicts the new target, so v* = W k* + δ. Edit: the rank-one update that maps k* to v*
while moving other keys least, whitened by the keys' second moment C (u = C⁻¹k*).

The helpers below (context templates, subject lookup, keys, δ) are shared with MEMIT and AlphaEdit.
"""
from __future__ import annotations

import enum
import logging
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from omegaconf import MISSING
from torch import nn

from wise_bench.config import DType
from wise_bench.data import Request
from wise_bench.errors import UserError
from wise_bench.methods.base import WeightEditor
from wise_bench.metrics import Encoded, TokenBatch, encode_pair
from wise_bench.models import get_module, input_device, linear_weight
from wise_bench.prefix_cache import prefix_cache
from wise_bench.stats import DEFAULT_STATS_DIR, TRAIN_TEXTS, second_moments

log = logging.getLogger(__name__)

FORWARD_BATCH = 32  # sequences per forward pass when reading keys
TEMPLATE_STARTS = ["The", "Therefore", "Because", "I", "You"]


class MissingSubject(str, enum.Enum):
    skip = "skip"  # leave the request unedited (counted in the stats as skipped_missing_subject)
    last_token = "last_token"  # edit at the prompt's last token instead of the subject's


@dataclass
class LocateConfig:
    """Keys, values and statistics: shared by ROME, MEMIT and AlphaEdit."""

    name: str = MISSING
    context_templates: int = 20  # generated prefixes, besides the bare prompt
    context_template_length: int = 10  # tokens generated per prefix
    v_lr: float = 0.5
    v_steps: int = 25
    v_weight_decay: float = 1e-3  # on ‖δ‖² / ‖initial value‖²
    kl_factor: float = 0.0625  # KL to the unedited prediction on "{subject} is a"
    clamp_norm_factor: float = 4.0  # ‖δ‖ ≤ this × ‖initial value‖
    stop_loss: float = 0.05
    prefix_cache: bool = True  # replay the frozen computation below the δ layer across steps (exact)
    on_missing_subject: MissingSubject = MissingSubject.skip
    # Corpus of the second-moment statistics: train_texts (the run's irrelevant texts), wikitext
    # (needs internet or a cached copy), or a local .txt/.json/.jsonl file.
    mom2_dataset: str = TRAIN_TEXTS
    mom2_n_samples: int = 100_000
    mom2_dtype: DType = DType.float32
    stats_dir: str = DEFAULT_STATS_DIR


@dataclass
class ROMEConfig(LocateConfig):
    layer: str = MISSING  # e.g. ${model.edit_layers.rome}
    mom2_adjustment: bool = True  # u = C⁻¹k*; false: u = k*


# --- locating the subject ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Located:
    """A request with the place to edit: just past the subject's last character in the prompt."""

    request: Request
    subject_end: int
    subject: str  # for the KL prompt "{subject} is a"


def subject_end(prompt: str, subject: Optional[str]) -> Optional[int]:
    """Index just past the subject in the prompt (case-insensitive as a fallback), None if absent."""
    if not subject:
        return None
    start = prompt.find(subject)
    if start < 0:
        start = prompt.lower().find(subject.lower())
    return None if start < 0 else start + len(subject)


def locate(requests: Sequence[Request], policy: MissingSubject) -> tuple[list[Located], int]:
    """The requests that can be edited, and how many had no subject in their prompt."""
    located, missing = [], 0
    for r in requests:
        end = subject_end(r.prompt, r.subject)
        if end is None:
            missing += 1
            log.warning("request %d: subject %r not in prompt %r (%s)",
                        r.index, r.subject, r.prompt, MissingSubject(policy).value)
            if MissingSubject(policy) is MissingSubject.skip:
                continue
            end = len(r.prompt)
        located.append(Located(r, end, r.subject or r.prompt))
    return located, missing


# --- context templates and token lookup -------------------------------------------------------------


def template_tokens(cfg: LocateConfig, tokenizer) -> int:
    """Bound on a context template's tokens: start word + generated tokens + ". " (+ slack for
    decoding and re-encoding the sampled text)."""
    if cfg.context_templates == 0:
        return 0
    start = max(len(tokenizer(s, add_special_tokens=False)["input_ids"]) for s in TEMPLATE_STARTS)
    return start + cfg.context_template_length + 4


@torch.no_grad()
def context_templates(model: nn.Module, tokenizer, n: int, length: int, seed: int) -> list[str]:
    """Prefixes the prompt is read after: "" (the bare prompt) and n short texts sampled from the model.

    Averaging over them makes keys and values hold for the subject in many contexts, not one.
    """
    if n == 0:
        return [""]
    device = input_device(model)
    starts = [TEMPLATE_STARTS[i % len(TEMPLATE_STARTS)] for i in range(n)]
    enc = tokenizer(starts, return_tensors="pt", padding=True, return_token_type_ids=False).to(device)
    with torch.random.fork_rng():  # sampling must not move the run's global RNG
        torch.manual_seed(seed)
        out = model.generate(**enc, do_sample=True, top_k=5, max_new_tokens=length, min_new_tokens=length,
                             pad_token_id=tokenizer.pad_token_id)
    texts = tokenizer.batch_decode(out, skip_special_tokens=True)
    return [""] + [" ".join(t.split()) + ". " for t in texts]


def encode_at(tokenizer, text: str, char_end: int, target: Optional[str] = None) -> tuple[Encoded, int]:
    """``text`` (+ " " + target) encoded, and the index of the token that holds text[char_end - 1]."""
    full = text if target is None else f"{text} {target}"
    enc = tokenizer(full, return_offsets_mapping=True)
    special = tokenizer.get_special_tokens_mask(enc["input_ids"], already_has_special_tokens=True)
    pos = max(i for i, ((start, _), sp) in enumerate(zip(enc["offset_mapping"], special)) if not sp and start < char_end)
    encoded = Encoded(tuple(enc["input_ids"]), ()) if target is None else encode_pair(tokenizer, text, target)
    return encoded, pos


@dataclass
class Lookup:
    """A left-padded batch and, per row, the column of the token edits act on."""

    batch: TokenBatch
    rows: torch.Tensor
    cols: torch.Tensor

    @classmethod
    def build(cls, seqs: Sequence[tuple[Encoded, int]], pad_id: int, device) -> "Lookup":
        batch = TokenBatch.build([e for e, _ in seqs], pad_id, device)
        width = batch.input_ids.shape[1]
        cols = torch.tensor([width - len(e.ids) + pos for e, pos in seqs], device=device)
        return cls(batch, torch.arange(len(seqs), device=device), cols)

    def positions(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows, cols) on ``device``: a hooked layer may sit on another GPU than the input ids."""
        return self.rows.to(device), self.cols.to(device)


def templated(tokenizer, loc: Located, templates: Sequence[str], target: Optional[str] = None) -> list[tuple[Encoded, int]]:
    return [encode_at(tokenizer, prefix + loc.request.prompt, len(prefix) + loc.subject_end, target) for prefix in templates]


@torch.no_grad()
def vectors_at(model: nn.Module, lookup: Lookup, points: Sequence[tuple[nn.Module, str]]) -> list[torch.Tensor]:
    """For each (module, "input" | "output"), that vector at every row's lookup token, [rows, d]."""
    found: list[torch.Tensor] = [torch.empty(0)] * len(points)

    def keep(i: int, h: torch.Tensor) -> None:
        h = h[0] if isinstance(h, tuple) else h  # decoder blocks may return (hidden, ...)
        found[i] = h[lookup.positions(h.device)].float()

    handles = [
        m.register_forward_pre_hook(lambda _m, args, i=i: keep(i, args[0])) if kind == "input"
        else m.register_forward_hook(lambda _m, _args, out, i=i: keep(i, out))
        for i, (m, kind) in enumerate(points)
    ]
    try:
        lookup.batch.last_logits(model)  # run for the hooks; the LM head on one position only
    finally:
        for h in handles:
            h.remove()
    return found


def template_average(model, tokenizer, located: Sequence[Located], templates: Sequence[str],
                     points: Sequence[tuple[nn.Module, str]]) -> list[torch.Tensor]:
    """``vectors_at`` each request's subject token, averaged over the context templates: [requests, d]."""
    device = input_device(model)
    seqs = [s for loc in located for s in templated(tokenizer, loc, templates)]
    chunks = [vectors_at(model, Lookup.build(seqs[i:i + FORWARD_BATCH], tokenizer.pad_token_id, device), points)
              for i in range(0, len(seqs), FORWARD_BATCH)]
    return [torch.cat([c[p] for c in chunks]).view(len(located), len(templates), -1).mean(1) for p in range(len(points))]


# --- the value: δ at the subject's last token --------------------------------------------------------


def compute_delta(model: nn.Module, tokenizer, module_path: str, loc: Located, templates: Sequence[str],
                  cfg: LocateConfig, init_norm: float) -> tuple[torch.Tensor, dict[str, float]]:
    """δ added to the output of the module at ``module_path`` at the subject's last token that makes
    the model predict the target.

    Loss: target NLL over all context templates + KL to the unedited next-token distribution after
    "{subject} is a" (keeps what the subject is) + weight decay; ‖δ‖ is clamped to
    clamp_norm_factor × init_norm after each Adam step.
    """
    device, pad = input_device(model), tokenizer.pad_token_id
    module = get_module(model, module_path)
    rewrite = Lookup.build(templated(tokenizer, loc, templates, loc.request.target_new), pad, device)
    kl = Lookup.build([encode_at(tokenizer, f"{loc.subject} is a", len(loc.subject))], pad, device)
    weight = linear_weight(module)
    delta = torch.zeros(weight.shape[0], device=weight.device, requires_grad=True)
    active = [rewrite]

    def add_delta(_module, _args, out):
        at = active[0].positions(out.device)
        return out.index_put(at, out[at] + delta.to(out.dtype))

    def kl_logprobs() -> torch.Tensor:
        active[0] = kl
        return torch.log_softmax(kl.batch.last_logits(model)[0].float(), dim=-1)

    handle = module.register_forward_hook(add_delta)
    try:
        with torch.no_grad():
            unedited = kl_logprobs()  # δ = 0
        opt = torch.optim.Adam([delta], lr=cfg.v_lr)
        max_norm = cfg.clamp_norm_factor * init_norm
        losses: list[float] = []  # the early stop reads each step's loss; nothing else syncs the device
        nlls: list[torch.Tensor] = []
        with prefix_cache(model, module_path, cfg.prefix_cache):
            for _ in range(cfg.v_steps):
                active[0] = rewrite
                nll = rewrite.batch.mean_target_nll(rewrite.batch.target_logits(model)).mean()
                drift = F.kl_div(kl_logprobs(), unedited, log_target=True, reduction="sum")
                decay = cfg.v_weight_decay * delta.norm() ** 2 / init_norm ** 2  # on the layer's device
                loss = nll + cfg.kl_factor * drift + decay.to(nll.device)
                losses.append(loss.item())
                nlls.append(nll.detach())
                if losses[-1] < cfg.stop_loss:
                    break
                opt.zero_grad()
                loss.backward()
                opt.step()
                with torch.no_grad():
                    delta.mul_((max_norm / delta.norm()).clamp(max=1.0))  # projected back onto the norm ball
    finally:
        handle.remove()
    # Measured before each step: the last values are from before the last step taken (or skipped).
    return delta.detach(), {"loss_start": losses[0], "loss": losses[-1], "nll_start": nlls[0].item(), "nll": nlls[-1].item(),
                            "steps": len(losses)}


# --- the rank-one update ----------------------------------------------------------------------------


def rank_one_update(W: torch.Tensor, k: torch.Tensor, v: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """ΔW = (v − W k) uᵀ / (uᵀ k), so that (W + ΔW) k = v; W is (out, in)."""
    return torch.outer(v - W @ k, u) / (u @ k)


def solve_mom2(C: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    """C⁻¹ X in float64 (C from a finite corpus can be badly conditioned)."""
    try:
        return torch.linalg.solve(C.double(), X.double()).to(X.dtype)
    except torch.linalg.LinAlgError:
        raise UserError("the second-moment matrix C is singular: use a larger mom2 corpus or more mom2_n_samples") from None


def mean_stats(per_request: list[dict[str, float]], missing: int) -> dict[str, float]:
    out = {k: sum(s[k] for s in per_request) / len(per_request) for k in per_request[0]} if per_request else {}
    return {**out, "skipped_missing_subject": missing}


class ROME(WeightEditor):
    Config = ROMEConfig

    prefix_tokens = staticmethod(template_tokens)

    @staticmethod
    def module_paths(cfg: ROMEConfig) -> list[str]:
        return [cfg.layer]

    def __init__(self, cfg: ROMEConfig, model, ctx):
        super().__init__(cfg, model, ctx)
        self.module = get_module(model, cfg.layer)
        self.weight = linear_weight(self.module)  # (out, in) view: works for nn.Linear and Conv1D
        self.keep_originals([self.weight])
        # Both are computed once, on the unedited model.
        self.templates = context_templates(model, ctx.tokenizer, cfg.context_templates, cfg.context_template_length, ctx.seed)
        self.mom2 = None
        if cfg.mom2_adjustment:
            self.mom2 = second_moments(model, ctx.tokenizer, [cfg.layer], cfg.mom2_dataset, ctx.train_texts,
                                       cfg.mom2_n_samples, getattr(torch, DType(cfg.mom2_dtype).value), cfg.stats_dir)[cfg.layer]
            self.mom2 = self.mom2.to(self.weight.device)

    def edit(self, requests: list[Request]) -> dict[str, float]:
        located, missing = locate(requests, self.cfg.on_missing_subject)
        per_request = []
        for loc in located:  # one rank-one update per request, each on top of the previous
            per_request.append(self._edit_one(loc))
        return mean_stats(per_request, missing)

    def _edit_one(self, loc: Located) -> dict[str, float]:
        tok = self.ctx.tokenizer
        k = template_average(self.model, tok, [loc], self.templates, [(self.module, "input")])[0][0]
        W = self.weight.detach().float()
        with torch.no_grad():
            v_init = self.module(k.to(self.weight.dtype)).float()  # the layer's output at k*
        delta, stats = compute_delta(self.model, tok, self.cfg.layer, loc, self.templates, self.cfg, v_init.norm().item())
        v_star = W @ k + delta  # what the linear map must send k* to (a bias cancels out)
        u = k if self.mom2 is None else solve_mom2(self.mom2, k)
        with torch.no_grad():
            self.weight.add_(rank_one_update(W, k, v_star, u).to(self.weight.dtype))
        return {**stats, "delta_norm": delta.norm().item()}
