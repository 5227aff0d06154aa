"""Scorers of docs/metrics.md: teacher-forced token accuracy, locality agreement, perplexity, OOD.

All scores come from one teacher-forced forward pass over ``prompt + " " + target``. Evaluation is
batched with left padding and explicit position ids, so every request gets exactly the values it
would get alone; sequences are sorted by length so that batches carry little padding.
"""
from __future__ import annotations

import math
import statistics
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Iterable, Optional, Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from wise_bench.config import DataFormat, MetricName
from wise_bench.data import Request, field_error

# Names stored with every value, so that numbers from different protocols are never mixed.
SCORERS = {
    "rel": "teacher_forced_token_acc",
    "gen": "teacher_forced_token_acc",
    "portability": "teacher_forced_token_acc",
    "loc": "argmax_agreement_with_unedited",
    "ppl": "target_ppl_clipped_at_100",
    "ood": "frac_mean_nll_below_-log0.8",
}
PPL_CLIP = 100.0
OOD_NLL_THRESHOLD = -math.log(0.8)  # WISE paper, Table 5


@dataclass(frozen=True)
class Encoded:
    """Token ids of ``prompt + " " + target`` and the positions of the target tokens in them."""

    ids: tuple[int, ...]
    target_pos: tuple[int, ...]


def encode_pair(tokenizer, prompt: str, target: str, count_lone_space: bool = False) -> Encoded:
    """Tokenise the joined text once; target tokens are those holding a character of the target.

    Tokenising the joined text (not prompt and target apart) keeps the merges the model sees at the
    boundary; character offsets then say where the target starts, for any fast tokenizer. A token
    that is only the separating space (byte-level tokenizers without merges) is not a target token.
    ``count_lone_space``: where the target itself starts with whitespace, the joined text holds a lone
    space token before it, which the reference toolkit counts as the target's first token; so does this.
    """
    enc = tokenizer(f"{prompt} {target}", return_offsets_mapping=True)
    ids = enc["input_ids"]
    special = tokenizer.get_special_tokens_mask(ids, already_has_special_tokens=True)
    cut = len(prompt) + 1  # the separating space
    target_pos = tuple(
        i for i, ((_, end), sp) in enumerate(zip(enc["offset_mapping"], special)) if i > 0 and not sp and end > cut
    )
    first = target_pos[0] if target_pos else None
    if count_lone_space and first and target[:1].isspace() and enc["offset_mapping"][first - 1][0] >= len(prompt):
        target_pos = (first - 1, *target_pos)  # the token before is whitespace only, past the prompt
    return Encoded(tuple(ids), target_pos)


@dataclass
class TokenScores:
    pred: list[int]  # argmax prediction at each target position
    gold: list[int]  # the target tokens
    nll: list[float]  # -log p(gold) at each target position


# The prompt positions ([batch, length] bool) of the TokenBatch being run. A model call does not carry
# them, and a layer that routes by the prompt alone (MEMOIR) needs them; None outside such a call.
PROMPT_MASK: ContextVar[Optional[torch.Tensor]] = ContextVar("prompt_mask", default=None)


@dataclass
class TokenBatch:
    """A left-padded batch; position ids count real tokens only, so padding never shifts positions."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    target_mask: torch.Tensor  # True at target-token positions

    @classmethod
    def build(cls, seqs: Sequence[Encoded], pad_id: int, device) -> "TokenBatch":
        width = max(len(s.ids) for s in seqs)
        ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        target = torch.zeros((len(seqs), width), dtype=torch.bool)
        for row, s in enumerate(seqs):
            shift = width - len(s.ids)
            ids[row, shift:] = torch.tensor(s.ids, dtype=torch.long)
            mask[row, shift:] = 1
            target[row, [shift + p for p in s.target_pos]] = True
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        return cls(ids.to(device), mask.to(device), positions.to(device), target.to(device))

    def logits(self, model: nn.Module) -> torch.Tensor:
        """Logits at every position, [batch, length, vocab]."""
        return self._forward(model).logits

    def last_logits(self, model: nn.Module) -> torch.Tensor:
        """Logits at the last position, [batch, vocab] (left padding: every row's last token)."""
        return self._forward(model, logits_to_keep=1).logits[:, -1]

    def target_logits(self, model: nn.Module) -> torch.Tensor:
        """Logits predicting each target token (from the previous position), [N target tokens, vocab].

        Only the N positions that predict a target go through the LM head: a pre-hook on the output
        embeddings hands it the gathered hidden states [1, N, hidden] instead of [batch, length,
        hidden] (with a large vocabulary the head over every position costs as much as the layers
        on small models). Whatever the model does after the head is element-wise (e.g. soft-capping)
        and applies unchanged. Rows are in row-major order, so each sequence's targets come in order.
        """
        rows, cols = self.target_mask.nonzero(as_tuple=True)
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if head is None:  # no head module to hook: keep the columns that hold a target
            keep, column = torch.unique(cols - 1, return_inverse=True)
            return self._forward(model, logits_to_keep=keep).logits[rows, column]

        def gather_targets(_head: nn.Module, args: tuple) -> tuple:
            hidden = args[0]  # with device_map, on the last block's device
            return (hidden[rows.to(hidden.device), (cols - 1).to(hidden.device)][None], *args[1:])

        handle = head.register_forward_pre_hook(gather_targets)
        try:
            return self._forward(model).logits[0]
        finally:
            handle.remove()

    def prompt_mask(self) -> torch.Tensor:
        """True at each row's prompt tokens: its real positions before its first target token (all of
        them in a row without targets)."""
        width = self.target_mask.shape[1]
        first = torch.where(self.target_mask.any(-1), self.target_mask.int().argmax(-1), width)
        columns = torch.arange(width, device=first.device)
        return self.attention_mask.bool() & (columns[None] < first[:, None])

    def _forward(self, model: nn.Module, **kwargs):
        token = PROMPT_MASK.set(self.prompt_mask())
        try:
            return model(input_ids=self.input_ids, attention_mask=self.attention_mask, position_ids=self.position_ids,
                         use_cache=False, **kwargs)
        finally:
            PROMPT_MASK.reset(token)

    def target_logprobs(self, target_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(logp [N, vocab], gold [N], row [N]) over the N target tokens, from ``target_logits``."""
        rows, cols = self.target_mask.nonzero(as_tuple=True)
        return torch.log_softmax(target_logits.float(), dim=-1), self.input_ids[rows, cols], rows

    def mean_target_nll(self, target_logits: torch.Tensor) -> torch.Tensor:
        """Per-sequence mean NLL of the target tokens (differentiable), shape [batch]."""
        logp, gold, rows = self.target_logprobs(target_logits)
        nll = -logp.gather(-1, gold[:, None])[:, 0]
        total = torch.zeros(len(self.input_ids), device=nll.device).index_add(0, rows, nll)
        return total / self.target_mask.sum(-1)


def length_sorted_batches(lengths: Sequence[int], batch_size: int, max_tokens: int | None = None) -> list[list[int]]:
    """Indices sorted by length, cut into batches of at most ``batch_size`` sequences and, padding
    included, at most ``max_tokens`` tokens (a longer sequence gets a batch of its own)."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batches: list[list[int]] = []
    for i in order:
        # Sorted ascending, so the padded width of a batch is the length of the sequence joining it.
        if batches and len(batches[-1]) < batch_size and (max_tokens is None or (len(batches[-1]) + 1) * lengths[i] <= max_tokens):
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


@torch.inference_mode()
def teacher_forced(model: nn.Module, seqs: Sequence[Encoded], pad_id: int, batch_size: int,
                   max_tokens: int | None = None) -> list[TokenScores]:
    """One forward pass per batch; for each sequence, predictions and NLL at its target positions."""
    device = next(model.parameters()).device
    out: list[TokenScores | None] = [None] * len(seqs)
    batches = length_sorted_batches([len(s.ids) for s in seqs], batch_size, max_tokens)
    for batch_idx in tqdm(batches, desc="evaluating", unit="batch", leave=False, disable=len(batches) < 8):
        batch = TokenBatch.build([seqs[i] for i in batch_idx], pad_id, device)
        logp, gold, rows = batch.target_logprobs(batch.target_logits(model))
        nll = -logp.gather(-1, gold[:, None])[:, 0]
        pred = logp.argmax(-1)
        for row, i in enumerate(batch_idx):
            at = rows == row
            out[i] = TokenScores(pred=pred[at].tolist(), gold=gold[at].tolist(), nll=nll[at].tolist())
    return out  # type: ignore[return-value]


# --- per-request scores from token scores (pure; hand-checked in tests) ----------------------------


def token_accuracy(pred: Sequence[int], gold: Sequence[int]) -> float:
    return sum(p == g for p, g in zip(pred, gold)) / len(gold)


def agreement(post: Sequence[int], pre: Sequence[int]) -> float:
    return sum(a == b for a, b in zip(post, pre)) / len(pre)


def perplexity(nll: Sequence[float]) -> float:
    return math.exp(sum(nll) / len(nll))


def below_ood_threshold(nll: Sequence[float]) -> float:
    return float(sum(nll) / len(nll) < OOD_NLL_THRESHOLD)


def aggregate(rows: Iterable[dict]) -> dict[str, float]:
    """Mean of each per-request score over the requests that have it; PPL clipped, with raw stats."""
    rows = list(rows)
    out: dict[str, float] = {}
    for key in ("rel", "gen", "loc", "portability", "ood"):
        values = [r[key] for r in rows if r.get(key) is not None]
        if values:
            out[key] = sum(values) / len(values)
    ppls = [r["ppl"] for r in rows if r.get("ppl") is not None]
    if ppls:
        out["ppl"] = sum(min(p, PPL_CLIP) for p in ppls) / len(ppls)
        out["ppl_unclipped"] = sum(ppls) / len(ppls)
        out["ppl_median"] = statistics.median(ppls)
    core = [out[k] for k in ("rel", "gen", "loc") if k in out]
    if core:
        out["avg"] = sum(core) / len(core)
    return out


def retention(rows: Iterable[dict], metric: str) -> float | None:
    """Mean over requests of the final score ÷ the score right after the request's own edit
    (``<metric>_at_edit``); requests that scored 0 right after their edit have no ratio and are left
    out. None when no request has one."""
    ratios = [r[metric] / r[f"{metric}_at_edit"] for r in rows
              if r.get(metric) is not None and r.get(f"{metric}_at_edit")]
    return sum(ratios) / len(ratios) if ratios else None


def collapse_point(points: Sequence[dict], fraction: float) -> int | None:
    """n_edits of the first evaluation point whose avg is below ``fraction`` × the first point's avg."""
    if not points:
        return None
    floor = fraction * points[0]["avg"]
    return next((p["n_edits"] for p in points if p["avg"] < floor), None)


# --- uncertainty, and every protocol's summary of one evaluation ------------------------------------

CI_RESAMPLES = 1000
CI_SEED = 0
TEACHER_FORCED_KEYS = ("rel", "gen", "loc", "portability", "ood", "ppl")
AVG_OF = ("rel", "gen", "loc")


def percentile_half_width(estimates: np.ndarray) -> float:
    """Half the width of the central 95% of bootstrap estimates (resamples without a value ignored)."""
    low, high = np.nanpercentile(estimates, [2.5, 97.5])
    return float((high - low) / 2)


def bootstrap_ci95(rows: Sequence[dict], keys: Iterable[str], n_resamples: int = CI_RESAMPLES,
                   seed: int = CI_SEED) -> dict[str, float]:
    """Half-width of the 95% percentile-bootstrap interval of each key's mean over requests, and of
    avg (the mean of the rel, gen and loc means) when one of those is present.

    Requests are drawn with replacement, the same draws for every key (so avg comes from the same
    resamples); in each resample a key's mean is over the drawn requests that have it, as in
    ``aggregate`` (perplexity clipped the same way). A fixed seed: the same rows, the same intervals.
    """
    if not rows:
        return {}
    draws = np.random.default_rng(seed).integers(0, len(rows), size=(n_resamples, len(rows)))
    estimates: dict[str, np.ndarray] = {}
    for key in keys:
        values = np.array([np.nan if r.get(key) is None else r[key] for r in rows], dtype=float)
        if np.isnan(values).all():
            continue
        if key == "ppl":
            values = np.minimum(values, PPL_CLIP)
        drawn = values[draws]
        present = ~np.isnan(drawn)
        counts = present.sum(1)
        totals = np.where(present, drawn, 0.0).sum(1)
        estimates[key] = np.divide(totals, counts, out=np.full(n_resamples, np.nan), where=counts > 0)
    core = [estimates[k] for k in AVG_OF if k in estimates]
    if core:
        estimates["avg"] = np.mean(core, axis=0)
    return {k: percentile_half_width(v) for k, v in estimates.items()}


def mean_scores(rows: Sequence[dict], keys: Iterable[str]) -> dict[str, float]:
    """Each key's mean over the rows that have it, then avg of the rel, gen and loc means."""
    out: dict[str, float] = {}
    for key in keys:
        values = [r[key] for r in rows if r.get(key) is not None]
        if values:
            out[key] = sum(values) / len(values)
    core = [out[k] for k in AVG_OF if k in out]
    if core:
        out["avg"] = sum(core) / len(core)
    return out


def protocol_summary(rows: Sequence[dict]) -> dict[str, Any]:
    """``{"ci95": ..., "protocols": ...}`` of one evaluation's per-request rows.

    The teacher-forced scores are the rows' top-level keys; other protocols' scores are nested under
    each row's ``protocols`` (e.g. ``{"generation": {"rel": 1.0, "rel_f1": 1.0, ...}}``). Each
    protocol gets its means and their bootstrap half-widths; ``ci95`` is the teacher-forced one's.
    """
    rows = list(rows)
    if not rows:
        return {}
    teacher_forced_ci = bootstrap_ci95(rows, TEACHER_FORCED_KEYS)
    protocols: dict[str, Any] = {"teacher_forced": {**aggregate(rows), "ci95": teacher_forced_ci}}
    for name in dict.fromkeys(p for r in rows for p in r.get("protocols", {})):
        nested = [r["protocols"][name] for r in rows if name in r.get("protocols", {})]
        keys = list(dict.fromkeys(k for r in nested for k, v in r.items() if isinstance(v, (int, float))))
        protocols[name] = {**mean_scores(nested, keys), "ci95": bootstrap_ci95(nested, keys)}
    return {"ci95": teacher_forced_ci, "protocols": protocols}


# --- the evaluator used by the edit loop -----------------------------------------------------------


class Evaluator:
    """Scores requests on the current model. Texts are tokenised once, at construction.

    Construction also validates that every scored target has at least one token, raising a
    DataError that names the file, record and field; it needs only the tokenizer, not the model.
    """

    def __init__(self, tokenizer, requests: Sequence[Request], fmt: DataFormat, metrics: Iterable, batch_size: int,
                 max_batch_tokens: int | None = None, count_lone_space: bool = False):
        self.metrics = {MetricName(m).value for m in metrics}
        self.pad_id = tokenizer.pad_token_id
        self.batch_size = batch_size
        self.max_batch_tokens = max_batch_tokens
        self.count_lone_space = count_lone_space
        # Scorer names record the target-token rule when it is not the default.
        suffix = "+lone_space" if count_lone_space else ""
        self.scorers = {m: SCORERS[m] + (suffix if SCORERS[m].startswith("teacher_forced") else "") for m in SCORERS}
        # Per request: (metric key, Encoded) for every text it is scored on.
        self.items: list[list[tuple[str, Encoded]]] = []
        for req in requests:
            texts = [("rel", req.prompt, req.target_new, "target_new")]
            if req.loc_answer.strip():
                texts.append(("loc", req.loc_prompt, req.loc_answer, "loc_answer"))
            if "gen" in self.metrics and req.rephrase_prompt:
                texts.append(("gen", req.rephrase_prompt, req.target_new, "target_new"))
            if "ood" in self.metrics and req.ood_prompt:
                texts.append(("ood", req.ood_prompt, req.target_new, "target_new"))
            if "portability" in self.metrics:
                texts += [("portability", q, a, "portability") for q, a in req.portability]
            encoded = []
            for key, prompt, target, attr in texts:
                enc = encode_pair(tokenizer, prompt, target, count_lone_space)
                if not enc.target_pos:
                    raise field_error(fmt, req, attr, f"target {target!r} tokenizes to no tokens after the prompt")
                encoded.append((key, enc))
            self.items.append(encoded)
        self.loc_before: dict[int, list[int]] | None = None

    def record_unedited_locality(self, model: nn.Module) -> None:
        """Argmax tokens of the unedited model on every locality text (computed once per run)."""
        locs = {i: enc for i, items in enumerate(self.items) for key, enc in items if key == "loc"}
        scores = teacher_forced(model, list(locs.values()), self.pad_id, self.batch_size, self.max_batch_tokens)
        self.loc_before = {i: s.pred for i, s in zip(locs, scores)}

    def score(self, model: nn.Module, indices: Sequence[int]) -> list[dict]:
        """Per-request scores (one dict per index) on the model as it is now."""
        if self.loc_before is None:
            raise RuntimeError("record_unedited_locality must run on the unedited model first")
        flat = [(i, key, enc) for i in indices for key, enc in self.items[i]]
        scores = teacher_forced(model, [enc for _, _, enc in flat], self.pad_id, self.batch_size, self.max_batch_tokens)
        rows = {i: {"index": i} for i in indices}
        portability: dict[int, list[float]] = {}
        for (i, key, _), s in zip(flat, scores):
            row = rows[i]
            if key == "loc":
                if "loc" in self.metrics:
                    row["loc"] = agreement(s.pred, self.loc_before[i])
            elif key == "rel":
                if "rel" in self.metrics:
                    row["rel"] = token_accuracy(s.pred, s.gold)
                if "ppl" in self.metrics:
                    row["ppl"] = perplexity(s.nll)
            elif key == "gen":
                row["gen"] = token_accuracy(s.pred, s.gold)
            elif key == "ood":
                row["ood"] = below_ood_threshold(s.nll)
            elif key == "portability":
                portability.setdefault(i, []).append(token_accuracy(s.pred, s.gold))
        for i, accs in portability.items():
            rows[i]["portability"] = sum(accs) / len(accs)
        return [rows[i] for i in indices]

    def evaluate(self, model: nn.Module, indices: Sequence[int]) -> tuple[dict[str, float], list[dict]]:
        rows = self.score(model, indices)
        return aggregate(rows), rows
