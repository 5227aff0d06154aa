"""UltraEdit: training-free lifelong editing by one closed-form ridge solve per turn (docs/ultraedit.md).

One ``edit`` call is one turn. With the weights as at the start of the turn, each micro-batch of
requests gets one forward and backward pass of the mean target NLL; every edited linear module
gives, at the positions that predict a target token, its input k (key) and the gradient g of the
loss w.r.t. its output. A running normaliser per weight shape (shared by every edited module of
that shape, kept across turns) is updated with the rows [k ‖ g] and then standardises them; the
pseudo-values are V_i = −η ‖k̂_i‖² ĝ_i, and Δ = (KᵀK + λI)⁻¹ KᵀV with the raw keys K is added to the
module's weight (as Δᵀ in the (out, in) layout), for all modules once every Δ is computed.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List

import torch
from omegaconf import MISSING
from torch import nn

from wise_bench.data import Request
from wise_bench.errors import UserError
from wise_bench.methods.base import WeightEditor
from wise_bench.metrics import TokenBatch, encode_pair
from wise_bench.models import get_module, linear_weight

EPS = torch.finfo(torch.float32).eps  # the reference's ε, in σ and in the standardisation


@dataclass
class UltraEditConfig:
    name: str = MISSING
    layers: List[str] = MISSING  # linear modules, e.g. ${model.edit_layers.ultraedit}
    lr: float = 1.0e-6  # η: pseudo-value scale (the reference's value assumes d_in in the thousands)
    ridge: float = 1.0  # λ of the ridge solve
    micro_batch: int = 10  # requests per forward/backward pass (the loss is a mean over its tokens)


# --- the algebra (pure functions) -------------------------------------------------------------------


def ridge_solve(keys: torch.Tensor, values: torch.Tensor, ridge: float) -> torch.Tensor:
    """Δ = (KᵀK + λI)⁻¹ KᵀV in fp32, [d_in, d_out]: argmin Σ_i ‖k_iᵀΔ − V_i‖² + λ‖Δ‖²_F."""
    K, V = keys.float(), values.float()
    gram = K.T @ K + ridge * torch.eye(K.shape[1], dtype=K.dtype, device=K.device)
    return torch.linalg.solve(gram, K.T @ V)


def running_update(count: int, mean: torch.Tensor, m2: torch.Tensor,
                   rows: torch.Tensor) -> tuple[int, torch.Tensor, torch.Tensor]:
    """(count, mean, M2) after adding the chunk ``rows`` [n_b, dim], with the reference's arithmetic.

    The reference adds n_b × the chunk's *unbiased* variance to M2 (Chan's update would add
    n_b × the population variance). For a chunk of one row that variance is 0/0 = NaN, which would
    poison the statistics for good; here such a chunk's within-chunk variance counts as 0 (exact
    for one row under either convention), the only departure from the reference arithmetic.
    """
    n_b = rows.shape[0]
    chunk_mean = rows.mean(0)
    chunk_var = rows.var(0, correction=1) if n_b > 1 else torch.zeros_like(chunk_mean)
    delta = chunk_mean - mean
    total = count + n_b
    mean = mean + delta * (n_b / total)
    m2 = m2 + n_b * chunk_var + delta.square() * (count * n_b / total)
    return total, mean, m2


def running_std(count: int, m2: torch.Tensor) -> torch.Tensor:
    """σ = sqrt(M2 / (n − 1 + ε)), as in the reference."""
    return (m2 / (count - 1 + EPS)).sqrt()


def standardise(rows: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    return (rows - mean) / (std + EPS)


def pseudo_values(keys_hat: torch.Tensor, grads_hat: torch.Tensor, lr: float) -> torch.Tensor:
    """V_i = −η ‖k̂_i‖² ĝ_i: a gradient step on the normalised output, scaled by the key's size."""
    return -lr * keys_hat.square().sum(-1, keepdim=True) * grads_hat


class Normaliser:
    """Running count, mean and M2 of rows [k ‖ g] of one weight shape, kept across turns."""

    def __init__(self, dim: int, device: torch.device):
        self.dim, self.device = dim, device
        self.reset()

    def reset(self) -> None:
        self.count = 0
        self.mean = torch.zeros(self.dim, device=self.device)
        self.m2 = torch.zeros(self.dim, device=self.device)

    def update(self, rows: torch.Tensor) -> None:
        self.count, self.mean, self.m2 = running_update(self.count, self.mean, self.m2, rows.to(self.device))

    def standardise(self, rows: torch.Tensor) -> torch.Tensor:
        return standardise(rows.to(self.device), self.mean, running_std(self.count, self.m2))

    def state(self) -> dict[str, Any]:
        return {"count": self.count, "mean": self.mean.clone(), "m2": self.m2.clone()}

    def load(self, state: dict[str, Any]) -> None:
        self.count = int(state["count"])
        self.mean = state["mean"].to(self.device, torch.float32).clone()
        self.m2 = state["m2"].to(self.device, torch.float32).clone()


def shape_key(weight: torch.Tensor) -> str:
    """``"192x768"``: d_in x d_out of an (out, in) weight; modules with the same key share a normaliser."""
    d_out, d_in = weight.shape
    return f"{d_in}x{d_out}"


# --- the method -------------------------------------------------------------------------------------


class UltraEdit(WeightEditor):
    Config = UltraEditConfig

    @staticmethod
    def module_paths(cfg: UltraEditConfig) -> list[str]:
        return list(cfg.layers)

    @staticmethod
    def check_modules(cfg: UltraEditConfig, modules: dict[str, nn.Module]) -> None:
        check_config(cfg)
        for path, module in modules.items():
            weight_of(path, module)

    def __init__(self, cfg: UltraEditConfig, model, ctx):
        super().__init__(cfg, model, ctx)
        check_config(cfg)
        self.modules: list[nn.Module] = [get_module(model, layer) for layer in cfg.layers]
        self.weights = [weight_of(path, m) for path, m in zip(cfg.layers, self.modules)]  # (out, in) views
        self.keep_originals(self.weights)
        self.normalisers: dict[str, Normaliser] = {}
        for w in self.weights:
            key = shape_key(w)
            if key not in self.normalisers:
                self.normalisers[key] = Normaliser(sum(w.shape), w.device)
        self.groups = [self.normalisers[shape_key(w)] for w in self.weights]

    def edit(self, requests: list[Request]) -> dict[str, float]:
        keys: list[list[torch.Tensor]] = [[] for _ in self.modules]
        grads: list[list[torch.Tensor]] = [[] for _ in self.modules]
        losses = []
        size = self.cfg.micro_batch
        for start in range(0, len(requests), size):
            k, g, loss = self.capture(requests[start:start + size])
            losses.append(loss)
            for i, normaliser in enumerate(self.groups):
                normaliser.update(torch.cat([k[i], g[i]], dim=1))  # once per module: shared groups see every module
                keys[i].append(k[i])
                grads[i].append(g[i])
        deltas = []
        for i, normaliser in enumerate(self.groups):
            K, G = torch.cat(keys[i]), torch.cat(grads[i])
            d_in = K.shape[1]
            rows_hat = normaliser.standardise(torch.cat([K, G], dim=1))
            V = pseudo_values(rows_hat[:, :d_in], rows_hat[:, d_in:], self.cfg.lr)
            deltas.append(ridge_solve(K.to(V.device), V, self.cfg.ridge))
        with torch.no_grad():
            for weight, delta in zip(self.weights, deltas):
                weight.add_(delta.T.to(weight.device, weight.dtype))
        return {"loss": sum(losses) / len(losses), "keys": float(sum(len(k) for k in keys[0]))}

    def capture(self, requests: list[Request]) -> tuple[list[torch.Tensor], list[torch.Tensor], float]:
        """One forward/backward pass: per module, the keys and output gradients (fp32) at the positions
        that predict a target token, [N, d_in] and [N, d_out], rows in the order of the target tokens;
        and the mean NLL over the N target tokens."""
        tok = self.ctx.tokenizer
        batch = TokenBatch.build([encode_pair(tok, r.prompt, r.target_new) for r in requests], tok.pad_token_id,
                                 self.ctx.device)
        rows, cols = batch.target_mask.nonzero(as_tuple=True)
        cols = cols - 1  # the position before a target token predicts it

        def at(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return rows.to(x.device), cols.to(x.device)  # a model spread over devices
        keys: list[Any] = [None] * len(self.modules)
        grads: list[Any] = [None] * len(self.modules)

        def hook_for(i: int):
            def save_grad(grad: torch.Tensor) -> None:
                grads[i] = grad[at(grad)].float()

            def hook(_module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
                keys[i] = args[0].detach()[at(args[0])].float()
                # The weights never require grad: the first edited module's output becomes the start
                # of the graph; a later one already requires grad through it and must stay connected.
                if not output.requires_grad:
                    output.requires_grad_(True)
                output.register_hook(save_grad)
                return output

            return hook

        handles = [m.register_forward_hook(hook_for(i)) for i, m in enumerate(self.modules)]
        try:
            with torch.enable_grad():
                logp, gold, _ = batch.target_logprobs(batch.target_logits(self.model))
                loss = -logp.gather(-1, gold[:, None]).mean()
                loss.backward()
        finally:
            for h in handles:
                h.remove()
        return keys, grads, loss.item()

    def restore(self) -> None:
        super().restore()
        for normaliser in self.normalisers.values():
            normaliser.reset()

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "normalisers": {k: n.state() for k, n in self.normalisers.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        for key, normaliser in self.normalisers.items():
            normaliser.load(state["normalisers"][key])

    def edited_tensors(self) -> list[torch.Tensor]:
        # The statistics too: a non-finite mean or M2 would spoil every later turn.
        return [*super().edited_tensors(), *(t for n in self.normalisers.values() for t in (n.mean, n.m2))]


def weight_of(path: str, module: nn.Module) -> torch.Tensor:
    """The (out, in) weight of an edited module; UserError naming the path unless it is linear."""
    try:
        return linear_weight(module)
    except UserError as e:
        raise UserError(f"method.layers: '{path}': {e}") from None


def check_config(cfg: UltraEditConfig) -> None:
    if not cfg.layers:
        raise UserError("method.layers is empty: UltraEdit needs at least one linear module to edit")
    if len(set(cfg.layers)) != len(cfg.layers):
        raise UserError(f"method.layers lists a module twice: {list(cfg.layers)}")
    if not cfg.lr > 0:
        raise UserError(f"method.lr must be > 0, got {cfg.lr}")
    if not cfg.ridge > 0:
        raise UserError(f"method.ridge must be > 0, got {cfg.ridge}")
    if cfg.micro_batch < 1:
        raise UserError(f"method.micro_batch must be >= 1, got {cfg.micro_batch}")
