"""The generation protocol: greedy answers to the questions, scored as text.

Teacher forcing feeds the target and scores each target token given the gold ones before it, so
the target's content and length leak into the score (Yang et al., ACL 2025, "The Mirage of Model
Editing"). Here the model answers the question alone: greedy decoding, stopped by EOS or a stop
string, never cut to the target's length. The answer is scored against the target by exact match
and token F1 after normalisation; locality is the share of locality prompts answered as the
unedited model answered them.

Decoding is batched with left padding and a KV cache. Position ids count real tokens only and the
attention mask covers the padding, so every prompt gets exactly the tokens it gets alone.
"""
from __future__ import annotations

import inspect
import re
import string
import unicodedata
from collections import Counter
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import DynamicCache

from wise_bench.config import GenerationContext, MetricName, Protocol
from wise_bench.data import Request
from wise_bench.errors import UserError
from wise_bench.metrics import length_sorted_batches

# Tokens generated beyond the longest target when eval.max_new_tokens is null: room for an answer
# a little longer than any target (a trailing word, punctuation) without decoding whole paragraphs.
MAX_NEW_TOKENS_MARGIN = 8
QUESTION_TEMPLATE = "{prompt}"
# Metric key -> scorer name; the protocol id (which names the context) keys the map holding them.
SCORER_NAMES = {
    "rel": "generation_exact_match_normalised", "rel_f1": "generation_token_f1",
    "gen": "generation_exact_match_normalised", "gen_f1": "generation_token_f1",
    "portability": "generation_exact_match_normalised", "portability_f1": "generation_token_f1",
    "loc": "generation_agreement_with_unedited",
}


# --- answer scoring (pure; hand-checked in tests) --------------------------------------------------

_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalise(text: str) -> str:
    """SQuAD's answer normalisation: lowercase; drop punctuation (ASCII and Unicode), the articles
    a/an/the and extra whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in string.punctuation and not unicodedata.category(ch).startswith("P"))
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(answer: str, target: str) -> float:
    return float(normalise(answer) == normalise(target))


def token_f1(answer: str, target: str) -> float:
    """F1 of the normalised whitespace tokens (SQuAD): overlap counted with multiplicity; two empty
    answers agree (1.0), one empty answer scores 0."""
    got, want = normalise(answer).split(), normalise(target).split()
    if not got or not want:
        return float(got == want)
    overlap = sum((Counter(got) & Counter(want)).values())
    if overlap == 0:
        return 0.0
    precision, recall = overlap / len(got), overlap / len(want)
    return 2 * precision * recall / (precision + recall)


def command_line_escapes(stop: str) -> str:
    r"""A stop string with ``\n`` or ``\t`` typed as two characters, read as newline or tab: Hydra's
    command line passes ``eval.stop_strings=['\n','. ']`` literally, backslash included."""
    return stop.replace("\\n", "\n").replace("\\t", "\t")


def cut_at_stop(text: str, stop_strings: Sequence[str]) -> str:
    """The text before the first stop string (the whole text if none occurs)."""
    ends = [i for i in (text.find(s) for s in stop_strings if s) if i >= 0]
    return text[:min(ends)] if ends else text


# --- greedy decoding -------------------------------------------------------------------------------


def _cache_kwarg(model: nn.Module) -> str:
    # transformers 5 renamed past_key_values to cache (the old name warns, then goes away).
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def eos_ids(model: nn.Module, tokenizer) -> set[int]:
    """Every token id that ends an answer: the tokenizer's EOS and the model's (one id or a list)."""
    ids = {tokenizer.eos_token_id}
    for config in (model.config, getattr(model, "generation_config", None)):
        value = getattr(config, "eos_token_id", None)
        ids |= set(value) if isinstance(value, (list, tuple)) else {value}
    return {i for i in ids if i is not None}


@torch.inference_mode()
def greedy_batch(model: nn.Module, tokenizer, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                 stop_strings: Sequence[str], stop_ids: set[int]) -> list[str]:
    """Greedy answers of one left-padded batch, each cut at its first stop string (EOS excluded).

    One forward pass over the prompts fills the KV cache; each step then feeds one token per row.
    A finished row keeps being fed (its tokens are discarded) so that the batch keeps its shape;
    the attention mask keeps rows apart, so each row gets the tokens it gets alone.
    """
    device = model.get_input_embeddings().weight.device
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[row, width - len(p):] = 1
    ids, mask = ids.to(device), mask.to(device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = {_cache_kwarg(model): DynamicCache()}
    tokens: list[list[int]] = [[] for _ in prompts]
    texts = [""] * len(prompts)
    done = [False] * len(prompts)
    for _ in range(max_new_tokens):
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1,
                       **cache).logits[:, -1]
        ids = logits.argmax(-1, keepdim=True)
        for row, token in enumerate(ids[:, 0].tolist()):
            if done[row]:
                continue
            if token in stop_ids:
                done[row] = True
                continue
            tokens[row].append(token)
            texts[row] = tokenizer.decode(tokens[row], skip_special_tokens=True)
            done[row] = cut_at_stop(texts[row], stop_strings) != texts[row]
        if all(done):
            break
        mask = torch.cat([mask, mask.new_ones((len(prompts), 1))], dim=1)
        positions = positions[:, -1:] + 1
    return [cut_at_stop(t, stop_strings) for t in texts]


def greedy_answers(model: nn.Module, tokenizer, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                   stop_strings: Sequence[str], batch_size: int, max_batch_tokens: int | None = None) -> list[str]:
    """Greedy answers of all prompts, in length-sorted batches of at most ``batch_size`` rows and
    ``max_batch_tokens`` tokens (prompt width + max_new_tokens per row, padding included)."""
    stop_ids = eos_ids(model, tokenizer)
    answers: list[str] = [""] * len(prompts)
    batches = length_sorted_batches([len(p) + max_new_tokens for p in prompts], batch_size, max_batch_tokens)
    for batch in tqdm(batches, desc="generating", unit="batch", leave=False, disable=len(batches) < 8):
        out = greedy_batch(model, tokenizer, [prompts[i] for i in batch], max_new_tokens, stop_strings, stop_ids)
        for i, answer in zip(batch, out):
            answers[i] = answer
    return answers


# --- the evaluator ---------------------------------------------------------------------------------


def protocol_id(context: GenerationContext) -> str:
    """The key of a generation context in results: the default context is plain "generation"."""
    return "generation" if context is GenerationContext.question else f"generation/{context.value}"


@dataclass(frozen=True)
class Query:
    """One prompt to answer: the request it belongs to, what it scores, and the target to compare."""

    request: int
    key: str  # rel | gen | loc | portability
    context: GenerationContext
    ids: tuple[int, ...]
    target: str  # "" for loc: its answer is compared with the unedited model's


class GenerationEvaluator:
    """Scores requests by greedy generation under each configured context; prompts are tokenised
    once, at construction (no model needed, so bad settings fail before the weights load)."""

    def __init__(self, tokenizer, requests: Sequence[Request], metrics: Iterable, eval_cfg: Any):
        self.tokenizer = tokenizer
        self.metrics = {MetricName(m).value for m in metrics}
        self.batch_size = eval_cfg.batch_size
        self.max_batch_tokens = eval_cfg.max_batch_tokens
        self.stop_strings = [command_line_escapes(s) for s in eval_cfg.stop_strings]
        if "{prompt}" not in eval_cfg.qa_template:
            raise UserError(f"eval.qa_template must contain {{prompt}} (where the question goes), got {eval_cfg.qa_template!r}")
        self.templates = {GenerationContext.question: QUESTION_TEMPLATE, GenerationContext.qa: eval_cfg.qa_template}
        self.contexts = list(dict.fromkeys(GenerationContext(c) for c in eval_cfg.contexts))
        if not self.contexts:
            raise UserError("eval.contexts is empty: name at least one of question, qa")
        self.queries = [q for i, r in enumerate(requests) for c in self.contexts for q in self._queries(i, r, c)]
        self.by_request: dict[int, list[int]] = {}
        for n, q in enumerate(self.queries):
            self.by_request.setdefault(q.request, []).append(n)
        if eval_cfg.max_new_tokens is None:
            targets = {q.target for q in self.queries if q.key != "loc"}  # every target an answer is scored against
            longest = max(len(tokenizer(" " + t, add_special_tokens=False)["input_ids"]) for t in targets)
            self.max_new_tokens = longest + MAX_NEW_TOKENS_MARGIN
        elif eval_cfg.max_new_tokens < 1:
            raise UserError(f"eval.max_new_tokens must be >= 1 (or null: the longest target + {MAX_NEW_TOKENS_MARGIN}), "
                            f"got {eval_cfg.max_new_tokens}")
        else:
            self.max_new_tokens = eval_cfg.max_new_tokens
        self.unedited: dict[int, str] | None = None  # query number -> the unedited model's answer (loc)

    def _queries(self, index: int, req: Request, context: GenerationContext) -> list[Query]:
        texts = [("rel", req.prompt, req.target_new)]
        if "gen" in self.metrics and req.rephrase_prompt:
            texts.append(("gen", req.rephrase_prompt, req.target_new))
        # The same requests as the teacher-forced protocol scores, so that the two compare.
        if "loc" in self.metrics and req.loc_answer.strip():
            texts.append(("loc", req.loc_prompt, ""))
        if "portability" in self.metrics:
            texts += [("portability", q, a) for q, a in req.portability]
        template = self.templates[context]
        return [Query(index, key, context, tuple(self.tokenizer(template.replace("{prompt}", prompt))["input_ids"]), target)
                for key, prompt, target in texts]

    def settings(self) -> dict[str, Any]:
        """What defines this protocol's numbers, recorded with every value (results, points, samples)."""
        return {"max_new_tokens": self.max_new_tokens, "stop_strings": self.stop_strings, "stops_at_eos": True,
                "greedy": True, "contexts": {protocol_id(c): self.templates[c] for c in self.contexts}}

    def scorers(self) -> dict[str, dict[str, str]]:
        keys = [k for k in ("rel", "gen", "portability") if k == "rel" or k in self.metrics]
        names = {m: SCORER_NAMES[m] for k in keys for m in (k, f"{k}_f1")}
        if "loc" in self.metrics:
            names["loc"] = SCORER_NAMES["loc"]
        # Keyed like results["protocols"]; each name says its context too ("generation_token_f1/qa").
        return {protocol_id(c): {m: f"{name}/{c.value}" for m, name in names.items()} for c in self.contexts}

    def _answers(self, model: nn.Module, queries: list[int]) -> list[str]:
        return greedy_answers(model, self.tokenizer, [self.queries[n].ids for n in queries], self.max_new_tokens,
                              self.stop_strings, self.batch_size, self.max_batch_tokens)

    def record_unedited(self, model: nn.Module) -> None:
        """The unedited model's answers to every locality prompt (computed once per run)."""
        locs = [n for n, q in enumerate(self.queries) if q.key == "loc"]
        self.unedited = dict(zip(locs, self._answers(model, locs)))

    def score(self, model: nn.Module, indices: Sequence[int]) -> list[dict[str, dict]]:
        """Per index: {protocol id: {metric: score, ..., "answers": {...}}} on the model as it is now."""
        if self.unedited is None:
            raise RuntimeError("record_unedited must run on the unedited model first")
        wanted = [n for i in indices for n in self.by_request.get(i, [])]
        answers = dict(zip(wanted, self._answers(model, wanted)))
        return [self._request_scores(i, answers) for i in indices]

    def _request_scores(self, index: int, answers: dict[int, str]) -> dict[str, dict]:
        out: dict[str, dict] = {}
        for context in self.contexts:
            scores: dict[str, Any] = {}
            said: dict[str, Any] = {}
            portability: list[tuple[float, float]] = []
            for n in self.by_request.get(index, []):
                q, answer = self.queries[n], answers[n]
                if q.context is not context:
                    continue
                if q.key == "loc":
                    said["loc"], said["loc_unedited"] = answer, self.unedited[n]
                    scores["loc"] = exact_match(answer, self.unedited[n])
                elif q.key == "portability":
                    said.setdefault("portability", []).append(answer)
                    portability.append((exact_match(answer, q.target), token_f1(answer, q.target)))
                else:
                    said[q.key] = answer
                    scores[q.key], scores[f"{q.key}_f1"] = exact_match(answer, q.target), token_f1(answer, q.target)
            if portability:
                scores["portability"] = sum(em for em, _ in portability) / len(portability)
                scores["portability_f1"] = sum(f1 for _, f1 in portability) / len(portability)
            out[protocol_id(context)] = {**scores, "answers": said}
        return out


def generation_evaluator(tokenizer, requests: Sequence[Request], metrics: Iterable, eval_cfg: Any) -> GenerationEvaluator | None:
    """The run's generation evaluator, or None when eval.protocols does not ask for generation."""
    if Protocol.generation not in {Protocol(p) for p in eval_cfg.protocols}:
        return None
    return GenerationEvaluator(tokenizer, requests, metrics, eval_cfg)
