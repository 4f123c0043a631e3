"""SPALM's gated memory (Yogatama et al. 2021) with a frozen LM: only the gate (w, b) is trained.

    m_t = Σ_i softmax_i(e(v_i)ᵀ h_t) · e(v_i)     over the k neighbours, e(v) = row v of the output embedding
    g_t = σ(wᵀ h_t + b)
    z_t = (1 − g_t) · m_t + g_t · h_t,   p = softmax(f(lm_head(z_t)))

with f what the model does to its logits after lm_head (`lm.OutputHead`: a scale, Gemma's soft-capping; else
nothing). lm_head is affine, so lm_head(z_t) = (1 − g)·lm_head(m) + g·lm_head(h): the loss of a token is a
function of its scalar g alone (convex where f is the identity). Training tabulates it on a grid of g once (one
pass of two output projections per token) and interpolates, instead of projecting every token at every step.
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import KNNLMError
from .gate import GateConfig, train_early_stopping


class SpalmGate(torch.nn.Module):
    """g = σ(wᵀ h / scale + b): keys (n, d) → (n,) gate in [0, 1]."""

    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("key_scale", torch.ones((), dtype=torch.float64))
        self.linear = torch.nn.Linear(dim, 1).double()
        torch.nn.init.zeros_(self.linear.weight)
        torch.nn.init.zeros_(self.linear.bias)

    def forward(self, keys: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.linear(keys.double() / self.key_scale)[:, 0])


def memory_vectors(h: torch.Tensor, vals: np.ndarray, weight: torch.Tensor) -> torch.Tensor:
    """m_t for each row: (n, d), on weight's device; a row with no neighbour gets h itself (then z = h for any g).

    Args:
        h: (n, d) keys (queries).
        vals: (n, k) the neighbours' stored tokens; -1 where missing.
        weight: (V, d) the output embedding.
    """
    h = h.to(weight.device, weight.dtype)
    v = torch.as_tensor(np.asarray(vals), dtype=torch.long, device=weight.device)
    valid = v >= 0
    idx = v.clamp_min(0)
    scores = (h @ weight.T).gather(1, idx).masked_fill(~valid, -torch.inf)  # (n, k) e(v_i)ᵀ h
    w = torch.softmax(scores, dim=1).nan_to_num(0.0).masked_fill(~valid, 0.0)  # all-missing rows: nan → 0
    dense = torch.zeros(h.shape[0], weight.shape[0], dtype=h.dtype, device=h.device).scatter_add_(1, idx, w)  # (n, V)
    m = dense @ weight  # (n, d)
    return torch.where(valid.any(1, keepdim=True), m, h)


def _parts(head: torch.nn.Module):
    """(lm_head, f) of an output head: an `lm.OutputHead`'s own, or a plain projection and the identity."""
    return (head.linear, head.finish) if hasattr(head, "finish") else (head, lambda x: x)


def spalm_log_probs(h: torch.Tensor, vals: np.ndarray, head: torch.nn.Module, g: torch.Tensor) -> torch.Tensor:
    """log softmax(f(lm_head((1 − g)·m + g·h))): (n, V) float32, on the CPU (head: the LM's `output_head`)."""
    w = head.weight
    h = h.to(w.device, w.dtype)
    m = memory_vectors(h, vals, w)
    g = g.to(w.device, w.dtype)[:, None]
    return torch.log_softmax(head((1 - g) * m + g * h), dim=-1).cpu()


def nll_grid(keys: np.ndarray, vals: np.ndarray, targets: np.ndarray, head: torch.nn.Module,
             grid: np.ndarray, chunk: int = 256) -> np.ndarray:
    """(n, G) −log p(target) at each gate value of grid, for every token."""
    out = np.empty((len(targets), len(grid)))
    linear, finish = _parts(head)
    with torch.no_grad():
        for lo in range(0, len(targets), chunk):
            h = torch.as_tensor(np.asarray(keys[lo:lo + chunk], np.float32)).to(head.weight.device)  # (c, d)
            m = memory_vectors(h, vals[lo:lo + chunk], head.weight)
            a, b = linear(m).cpu(), linear(h).cpu()  # (c, V) each
            t = torch.as_tensor(np.asarray(targets[lo:lo + chunk], np.int64))[:, None]
            for j, g in enumerate(grid):
                logp = torch.log_softmax(finish((1 - g) * a + g * b), dim=-1)
                out[lo:lo + chunk, j] = -logp.gather(1, t)[:, 0].numpy()
    return out


def interpolate_grid(table: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Row-wise piecewise-linear value of table (n, G), tabulated at linspace(0, 1, G), at g (n,)."""
    steps = table.shape[1] - 1
    pos = g * steps
    i0 = pos.detach().floor().clamp(0, steps - 1).long()
    frac = pos - i0
    lo, hi = table.gather(1, i0[:, None])[:, 0], table.gather(1, (i0 + 1)[:, None])[:, 0]
    return lo + frac * (hi - lo)


def fit_spalm(keys: np.ndarray, table: np.ndarray, cfg: GateConfig = GateConfig()) -> SpalmGate:
    """Train SPALM's gate on tokens whose loss at each grid value of g is tabulated (nll_grid).

    Args:
        keys: (n, d) the tokens' keys.
        table: (n, G) −log p(target) at g = linspace(0, 1, G).
        cfg: training settings (the shape fields are unused).

    Returns:
        The trained SpalmGate.
    """
    n = len(table)
    if n < 4:
        raise KNNLMError(f"{n} tokens are too few to train SPALM's gate; tune on more text.")
    torch.manual_seed(cfg.seed)
    k, t = torch.as_tensor(np.asarray(keys, np.float64)), torch.as_tensor(table, dtype=torch.float64)
    gate = SpalmGate(k.shape[1])
    gate.key_scale.copy_(k.norm(dim=1).mean().clamp_min(1e-6))

    def loss_on(i):
        ti, ki = t[i], k[i]
        return lambda: interpolate_grid(ti, gate(ki)).mean()

    return train_early_stopping(gate, loss_on, n, cfg)


def spalm_target_log_probs(keys: np.ndarray, vals: np.ndarray, targets: np.ndarray, head: torch.nn.Module,
                           gate: SpalmGate, chunk: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Exact (n,) log p(target) under SPALM, and the gate g of each token."""
    logp, gs = np.empty(len(targets)), np.empty(len(targets))
    with torch.no_grad():
        for lo in range(0, len(targets), chunk):
            h = torch.as_tensor(np.asarray(keys[lo:lo + chunk], np.float32))
            g = gate(h)
            t = torch.as_tensor(np.asarray(targets[lo:lo + chunk], np.int64))[:, None]
            logp[lo:lo + chunk] = spalm_log_probs(h, vals[lo:lo + chunk], head, g).gather(1, t)[:, 0].double().numpy()
            gs[lo:lo + chunk] = g.numpy()
    return logp, gs
