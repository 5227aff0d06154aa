"""Merging several edited copies of one weight into one (WISE knowledge merging, paper Table 11).

Every operator works on task vectors: for a base weight W and edited copies W_i it merges the
deltas d_i = W_i - W, weighted by w_i, and returns W + merged delta. The functions are pure; the
random ones (DARE) take an explicit generator.
"""
from __future__ import annotations

import enum
from typing import Optional, Sequence

import torch


class MergeAlg(str, enum.Enum):
    ties = "ties"  # trim to the largest entries, elect a sign per entry, mean of the agreeing entries
    linear = "linear"  # weighted mean of the deltas
    slerp = "slerp"  # spherical interpolation of the deltas, folded pairwise
    dare = "dare"  # random drop and rescale, then weighted mean
    dare_ties = "dare_ties"  # random drop and rescale, then sign election as in TIES
    sign = "sign"  # sign election as in TIES without trimming


def keep_top_magnitude(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Zero all but the k = int(density * numel) entries of largest magnitude."""
    k = int(density * delta.numel())
    flat = delta.flatten()
    kept = torch.zeros_like(flat)
    if k > 0:
        top = flat.abs().topk(k).indices
        kept[top] = flat[top]
    return kept.view_as(delta)


def drop_and_rescale(delta: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """Keep each entry with probability ``density`` and divide the kept ones by it (DARE).

    The draw is made on the CPU so that a seed gives the same mask on every device.
    """
    keep = torch.rand(delta.shape, generator=generator) < density
    return delta * keep.to(delta.device) / density


def elect_sign_mean(deltas: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Per entry: the sign of sum_i w_i d_i wins; the weighted mean of the entries with that sign.

    ``deltas`` is [n, ...], ``weights`` [n]. Zero entries (e.g. trimmed) have no sign, so they never
    count in the mean; an entry no delta agrees with stays 0. A zero sum elects +, as mergekit does.
    """
    w = weights.to(deltas).view(-1, *([1] * (deltas.dim() - 1)))
    elected = torch.where((w * deltas).sum(0) >= 0, 1.0, -1.0).to(deltas)
    agree = deltas.sign() == elected
    total = (w * deltas * agree).sum(0)
    weight = (w * agree).sum(0)
    return torch.where(weight != 0, total / torch.where(weight != 0, weight, 1.0), 0.0)


def weighted_mean(deltas: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    w = weights.to(deltas).view(-1, *([1] * (deltas.dim() - 1)))
    return (w * deltas).sum(0) / w.sum()


def slerp_pair(a: torch.Tensor, b: torch.Tensor, t: float, colinear: float = 1 - 1e-6) -> torch.Tensor:
    """Spherical interpolation from ``a`` (t=0) to ``b`` (t=1); linear when they are (anti)parallel."""
    cos = torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0, eps=1e-12)
    if cos.abs() > colinear:
        return (1 - t) * a + t * b
    theta = torch.arccos(cos)
    sin = torch.sin(theta)
    return (torch.sin((1 - t) * theta) / sin).to(a) * a + (torch.sin(t * theta) / sin).to(a) * b


def folded_slerp(deltas: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Slerp generalised to n deltas: fold them in order, each step moving by its share of the weight."""
    merged, seen = deltas[0], float(weights[0])
    for delta, w in zip(deltas[1:], weights[1:].tolist()):
        merged = slerp_pair(merged, delta, w / (seen + w))
        seen += w
    return merged


def merge(
    alg: MergeAlg | str,
    base: torch.Tensor,
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float],
    density: float = 0.53,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """W + the merge of the deltas of ``tensors`` from ``base`` with ``alg``."""
    alg = MergeAlg(alg)
    if len(tensors) != len(weights) or not tensors:
        raise ValueError(f"need one weight per tensor and at least one tensor, got {len(tensors)} and {len(weights)}")
    deltas = torch.stack([t - base for t in tensors])
    w = torch.tensor(list(weights), dtype=torch.float64)
    if alg in (MergeAlg.dare, MergeAlg.dare_ties):
        if generator is None:
            raise ValueError(f"merge_alg={alg.value} drops entries at random and needs a generator")
        deltas = torch.stack([drop_and_rescale(d, density, generator) for d in deltas])
    if alg is MergeAlg.ties:
        merged = elect_sign_mean(torch.stack([keep_top_magnitude(d, density) for d in deltas]), w)
    elif alg in (MergeAlg.sign, MergeAlg.dare_ties):
        merged = elect_sign_mean(deltas, w)
    elif alg in (MergeAlg.linear, MergeAlg.dare):
        merged = weighted_mean(deltas, w)
    else:
        merged = folded_slerp(deltas, w)
    return base + merged
