"""MEMIT: a batch of edits spread over several consecutive MLP output matrices (docs/locate_edit.md).

For each request, a δ at the last edited layer's output (ROME's value, shared code) gives the
target hidden state z* = z + δ of the residual stream after that layer. Then, layer by layer from
the lowest: K = the requests' keys at that layer (with the lower layers already updated), R = the
remaining residual z* − z spread evenly over the layers left, and ΔW = R Kᵀ (λ C + K Kᵀ)⁻¹.
MEMIT-MASS is the same with all T edits in one batch (edit_mode=batch, batch_size=T).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List

import torch
from omegaconf import MISSING

from wise_bench.config import DType
from wise_bench.data import Request
from wise_bench.methods.base import Calibration, WeightEditor
from wise_bench.methods.rome import (Located, LocateConfig, compute_delta, context_templates, locate, mean_stats,
                                     template_average, template_tokens)
from wise_bench.models import get_module, linear_weight
from wise_bench.stats import second_moments

# The reference setting λ is calibrated against: LLaMA-2-7B's down projections (d_ff 11008), λ 15000.
REFERENCE_LAMBDA, REFERENCE_KEY_DIM = 15000.0, 11008


@dataclass
class MEMITConfig(LocateConfig):
    layers: List[str] = MISSING  # e.g. ${model.edit_layers.memit}, lowest first
    mom2_update_weight: float = 15000.0  # λ: how strongly the keys of the corpus are preserved


def block_path(layer: str) -> str:
    """``model.layers[8].mlp.down_proj`` -> ``model.layers[8]``: the decoder block whose output is z."""
    return layer.replace("[", ".").replace("]", "").rsplit(".", 2)[0]


def memit_update(R: torch.Tensor, K: torch.Tensor, C: torch.Tensor, lam: float) -> torch.Tensor:
    """ΔW = R Kᵀ (λC + K Kᵀ)⁻¹ for keys K (in × n) and residuals R (out × n), in float64."""
    R, K, C = R.double(), K.double(), C.double()
    return torch.linalg.solve(lam * C + K @ K.T, K @ R.T).T  # the matrix is symmetric


class MEMIT(WeightEditor):
    Config = MEMITConfig

    prefix_tokens = staticmethod(template_tokens)

    @staticmethod
    def module_paths(cfg: MEMITConfig) -> list[str]:
        return [*cfg.layers, block_path(cfg.layers[-1])]

    def __init__(self, cfg: MEMITConfig, model, ctx):
        super().__init__(cfg, model, ctx)
        self.modules = [get_module(model, layer) for layer in cfg.layers]
        self.weights = [linear_weight(m) for m in self.modules]  # (out, in) views
        self.keep_originals(self.weights)
        self.block = get_module(model, block_path(cfg.layers[-1]))
        # Both are computed once, on the unedited model.
        self.templates = context_templates(model, ctx.tokenizer, cfg.context_templates, cfg.context_template_length, ctx.seed)
        moments = second_moments(model, ctx.tokenizer, cfg.layers, cfg.mom2_dataset, ctx.train_texts,
                                 cfg.mom2_n_samples, getattr(torch, DType(cfg.mom2_dtype).value), cfg.stats_dir)
        self.precompute([moments[layer].to(w.device) for layer, w in zip(cfg.layers, self.weights)])

    def precompute(self, moments: list[torch.Tensor]) -> None:
        """What the updates need from the second moments C of the edited layers (in ``cfg.layers`` order)."""
        self.mom2 = moments

    def edit(self, requests: list[Request]) -> dict[str, float]:
        located, missing = locate(requests, self.cfg.on_missing_subject)
        if not located:
            return mean_stats([], missing)
        z_star, per_request = self.target_hidden(located)
        for i, (module, weight) in enumerate(zip(self.modules, self.weights)):
            K, z = self.subject_vectors(located, [(module, "input"), (self.block, "output")])
            R = (z_star - z) / (len(self.modules) - i)  # this layer's share of what is left
            with torch.no_grad():
                weight.add_(self.layer_update(i, R.T.to(weight.device), K.T).to(weight.dtype))
        return mean_stats(per_request, missing)

    def target_hidden(self, located: list[Located]) -> tuple[torch.Tensor, list[dict[str, float]]]:
        """z* = z + δ for each request, [n, d]: the hidden state after the last edited layer to reach."""
        (z,) = self.subject_vectors(located, [(self.block, "output")])
        deltas, per_request = [], []
        for loc, z_i in zip(located, z):
            # δ is added to the last MLP's output, i.e. to the block output z, so it is clamped against ‖z‖.
            delta, stats = compute_delta(self.model, self.ctx.tokenizer, self.cfg.layers[-1], loc, self.templates,
                                         self.cfg, z_i.norm().item())
            deltas.append(delta)
            per_request.append({**stats, "delta_norm": delta.norm().item()})
        return z + torch.stack(deltas), per_request

    def subject_vectors(self, located: list[Located], points) -> list[torch.Tensor]:
        """``template_average`` with this method's model, tokenizer and templates."""
        return template_average(self.model, self.ctx.tokenizer, located, self.templates, points)

    def layer_update(self, i: int, R: torch.Tensor, K: torch.Tensor) -> torch.Tensor:
        """ΔW of the i-th edited layer for residuals R (out × n) at keys K (in × n)."""
        return memit_update(R, K, self.mom2[i], self.cfg.mom2_update_weight)

    def whitened_key_norms(self, requests: list[Request]) -> torch.Tensor:
        """kᵀC⁻¹k of each request's subject key at each edited layer (unedited model), flattened."""
        located, _ = locate(requests, self.cfg.on_missing_subject)
        norms = []
        for module, C in zip(self.modules, self.mom2):
            (K,) = self.subject_vectors(located, [(module, "input")])
            K = K.double().T
            norms.append((K * torch.linalg.solve(C.double(), K)).sum(0).cpu())  # layers may sit on different devices
        return torch.cat(norms)

    @classmethod
    def calibrate(cls, cfg: MEMITConfig, model, ctx, requests: list[Request]) -> Calibration:
        """λ (mom2_update_weight) that gives an edit's key the weight it has in the reference.

        A one-key update ΔW = r kᵀ(λC + kkᵀ)⁻¹ moves the key's output by m/(1+m) of r, with
        m = kᵀC⁻¹k / λ. For keys distributed like the corpus, E[kᵀC⁻¹k] = d_ff, so the reference
        (d_ff 11008, λ 15000) gives m = 0.73. λ here = median kᵀC⁻¹k of the tuning split's subject
        keys (all edited layers) × 15000 / 11008: the median edit key gets that same m."""
        method = cls(cfg, model, ctx)
        norms = method.whitened_key_norms(requests)
        lam = float(norms.median()) * REFERENCE_LAMBDA / REFERENCE_KEY_DIM
        measured = {"requests": len(requests), "key_dim": int(method.mom2[0].shape[0]),
                    "whitened_key_norm_median": float(norms.median()),
                    "whitened_key_norm_q10": float(norms.quantile(0.1)),
                    "whitened_key_norm_q90": float(norms.quantile(0.9))}
        return Calibration({"memit_mom2_update_weight": float(f"{lam:.4g}")}, measured)
