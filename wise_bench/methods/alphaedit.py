"""AlphaEdit: MEMIT's update projected onto the null space of preserved knowledge (docs/locate_edit.md).

Keys and target residuals are MEMIT's. The update is ΔW = R Kᵀ P (K Kᵀ P + K_p K_pᵀ P + L2·I)⁻¹, where
P = U₀U₀ᵀ projects onto the eigenvectors of the keys' second moment C with eigenvalues below a
threshold: every ΔW ends in P, so keys the corpus uses (C's large directions) are left unchanged.
K_p K_pᵀ accumulates the keys of all earlier edit steps, so later steps do not undo earlier ones.
Designed for batch-sequential editing (edit_mode=batch, 100 requests per step in the paper).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List

import torch
from omegaconf import MISSING

from wise_bench.methods.memit import MEMIT
from wise_bench.methods.rome import LocateConfig


@dataclass
class AlphaEditConfig(LocateConfig):
    layers: List[str] = MISSING  # e.g. ${model.edit_layers.alphaedit}, lowest first
    nullspace_threshold: float = 1e-2  # eigenvalues of C below this span the null space
    L2: float = 10.0  # ridge term of the solve


def null_space_projection(C: torch.Tensor, threshold: float) -> torch.Tensor:
    """P = U₀U₀ᵀ over the eigenvectors U₀ of the symmetric C whose eigenvalues are below ``threshold``."""
    values, vectors = torch.linalg.eigh(C.double())
    U0 = vectors[:, values < threshold]
    return (U0 @ U0.T).to(C.dtype)


def alphaedit_update(R: torch.Tensor, K: torch.Tensor, P: torch.Tensor, prev_cov: torch.Tensor, l2: float) -> torch.Tensor:
    """ΔW = R Kᵀ P ((K Kᵀ + K_p K_pᵀ) P + L2·I)⁻¹ for keys K (in × n), residuals R (out × n), in float64."""
    R, K, P, prev_cov = R.double(), K.double(), P.double(), prev_cov.double()
    A = (K @ K.T + prev_cov) @ P + l2 * torch.eye(len(P), dtype=P.dtype, device=P.device)
    return torch.linalg.solve(A.T, (R @ K.T @ P).T).T  # X A = B  <=>  Aᵀ Xᵀ = Bᵀ


class AlphaEdit(MEMIT):
    Config = AlphaEditConfig
    calibrate = None  # MEMIT's λ is not AlphaEdit's; its null-space threshold is tuned by sweep

    def precompute(self, moments: list[torch.Tensor]) -> None:
        self.projections = [null_space_projection(C, self.cfg.nullspace_threshold) for C in moments]
        self.prev_cov = [torch.zeros_like(C) for C in moments]  # Σ K_p K_pᵀ of earlier edit steps

    def layer_update(self, i: int, R: torch.Tensor, K: torch.Tensor) -> torch.Tensor:
        delta = alphaedit_update(R, K, self.projections[i], self.prev_cov[i], self.cfg.L2)
        # The keys at layer i do not depend on layers ≥ i, so these are the keys after the whole step.
        self.prev_cov[i] += (K @ K.T).to(self.prev_cov[i].dtype)
        return delta

    def restore(self) -> None:
        super().restore()
        for cov in self.prev_cov:
            cov.zero_()

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "prev_cov": [c.clone() for c in self.prev_cov]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        for cov, saved in zip(self.prev_cov, state["prev_cov"]):
            cov.copy_(saved)
