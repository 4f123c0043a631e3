"""A learned λ gate (He et al. 2021): a small torch model from per-token features to λ ∈ (0, 1).

Trained by minimising the NLL of log(λ·p_kNN + (1−λ)·p_LM) on tuning tokens; only the gate
learns. Features are standardised with their fitting statistics, non-finite ones (no neighbour)
replaced by the largest value seen in fitting; the key enters through a learned low-rank
projection. λ is computed in float64 from the gate's logit, so a gate of constant output is
exactly a fixed λ.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..errors import KNNLMError


@dataclass(frozen=True)
class GateConfig:
    """How a gate is shaped and trained."""

    hidden: int = 0  # units of the one hidden layer; 0: logistic regression (chosen by measurement, README)
    rank: int = 8  # width of the learned projection of the key; 0: no key projection
    steps: int = 300  # full-batch Adam steps at most
    lr: float = 0.02  # Adam learning rate
    weight_decay: float = 1e-4  # L2 on the weights
    val_fraction: float = 0.1  # share of the fitting tokens kept aside to pick the best step (early stopping)
    seed: int = 0  # initial weights and the early-stopping split

    def __post_init__(self):
        if self.hidden < 0 or self.rank < 0 or self.steps < 1 or not self.lr > 0 or not 0 < self.val_fraction < 1:
            raise KNNLMError("Gate settings: hidden and rank must be ≥ 0, steps ≥ 1, lr > 0 and the validation "
                             "share in (0, 1); pass e.g. --gate-hidden 0.")


class LambdaGate(torch.nn.Module):
    """features (n, F) and keys (n, d) → the logit of λ (n,)."""

    def __init__(self, n_features: int, dim: int, rank: int = 8, hidden: int = 0):
        super().__init__()
        self.register_buffer("mean", torch.zeros(n_features, dtype=torch.float64))
        self.register_buffer("std", torch.ones(n_features, dtype=torch.float64))
        self.register_buffer("fill", torch.zeros(n_features, dtype=torch.float64))  # stands in for inf
        self.register_buffer("key_scale", torch.ones((), dtype=torch.float64))
        self.proj = torch.nn.Linear(dim, rank, bias=False).double() if rank else None
        width = n_features + rank
        self.net = (torch.nn.Sequential(torch.nn.Linear(width, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, 1))
                    if hidden else torch.nn.Linear(width, 1)).double()
        self.shape = {"n_features": n_features, "dim": dim, "rank": rank, "hidden": hidden}

    def standardise_from(self, feats: torch.Tensor, keys: torch.Tensor) -> None:
        """Set the feature statistics (mean, std, fill for inf) and the key scale from fitting data."""
        finite = torch.isfinite(feats)
        big = torch.where(finite, feats, torch.full_like(feats, -torch.inf)).amax(0)
        self.fill.copy_(torch.where(torch.isfinite(big), big, torch.zeros_like(big)))
        x = torch.where(finite, feats, self.fill)
        self.mean.copy_(x.mean(0))
        self.std.copy_(x.std(0).clamp_min(1e-6) if len(x) > 1 else torch.ones_like(self.std))
        self.key_scale.copy_(keys.norm(dim=1).mean().clamp_min(1e-6))

    def forward(self, feats: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        x = (torch.where(torch.isfinite(feats), feats, self.fill) - self.mean) / self.std  # (n, F)
        if self.proj is not None:
            x = torch.cat([x, self.proj(keys / self.key_scale)], dim=1)  # (n, F + r)
        return self.net(x)[:, 0]

    def lambdas(self, feats: np.ndarray, keys: np.ndarray) -> np.ndarray:
        """(n,) float64 λ = σ(logit)."""
        with torch.no_grad():
            s = self(torch.as_tensor(feats, dtype=torch.float64),
                     torch.as_tensor(np.asarray(keys, np.float64))).numpy()
        with np.errstate(over="ignore"):
            return 1.0 / (1.0 + np.exp(-s))


def mix_nll(logit: torch.Tensor, lm_logp: torch.Tensor, knn_logp: torch.Tensor) -> torch.Tensor:
    """Mean −log(σ(s)·p_kNN + (1−σ(s))·p_LM), differentiable in s (log(1−σ(s)) = logσ(−s))."""
    knn = knn_logp.clamp_min(-1e4)  # a kNN miss: exp(−1e4) is 0 in float64, and the gradient stays finite
    ll = torch.logaddexp(torch.nn.functional.logsigmoid(logit) + knn,
                         torch.nn.functional.logsigmoid(-logit) + lm_logp)
    return -ll.mean()


def fit_gate(feats: np.ndarray, keys: np.ndarray, lm_logp: np.ndarray, knn_logp: np.ndarray,
             cfg: GateConfig = GateConfig()) -> LambdaGate:
    """Train a gate on these tokens only: full-batch Adam, the step best on a held-aside share kept.

    Args:
        feats: (n, F) features (pre_features or post_features).
        keys: (n, d) the tokens' keys (queries).
        lm_logp: (n,) log p_LM(target).
        knn_logp: (n,) log p_kNN(target) at the gate's temperature (-inf on a miss).
        cfg: shape and training.

    Returns:
        The trained LambdaGate (eval mode).
    """
    n = len(lm_logp)
    if n < 4:
        raise KNNLMError(f"{n} tokens are too few to train a λ gate; tune on more text.")
    torch.manual_seed(cfg.seed)
    f, k = torch.as_tensor(feats, dtype=torch.float64), torch.as_tensor(np.asarray(keys, np.float64))
    lm, knn = torch.as_tensor(lm_logp, dtype=torch.float64), torch.as_tensor(knn_logp, dtype=torch.float64)
    gate = LambdaGate(f.shape[1], k.shape[1], cfg.rank, cfg.hidden)
    gate.standardise_from(f, k)

    def loss_on(i):
        fi, ki, lmi, knni = f[i], k[i], lm[i], knn[i]  # gathered once, not at every step
        return lambda: mix_nll(gate(fi, ki), lmi, knni)

    return train_early_stopping(gate, loss_on, n, cfg)


def train_early_stopping(module: torch.nn.Module, loss_on, n: int, cfg: GateConfig) -> torch.nn.Module:
    """Full-batch Adam on loss_on(fit indices); the state best on a seeded held-aside share is kept.

    Args:
        module: the model to train (its parameters).
        loss_on: callable from a LongTensor of token indices to a callable giving the mean loss on them.
        n: number of tokens.
        cfg: steps, learning rate, weight decay, the held-aside share and its seed.

    Returns:
        module, in eval mode, with the best state loaded and gradients off.
    """
    perm = np.random.default_rng(cfg.seed).permutation(n)
    n_val = min(max(int(round(n * cfg.val_fraction)), 1), n - 1)
    val, fit = torch.as_tensor(np.sort(perm[:n_val])), torch.as_tensor(np.sort(perm[n_val:]))
    fit_loss, val_loss = loss_on(fit), loss_on(val)
    opt = torch.optim.Adam(module.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    best, best_state = float("inf"), None
    for step in range(cfg.steps):
        opt.zero_grad()
        fit_loss().backward()
        opt.step()
        if step % 10 == 9 or step == cfg.steps - 1:
            with torch.no_grad():
                v = float(val_loss())
            if best_state is None or v < best:
                best, best_state = v, {name: t.clone() for name, t in module.state_dict().items()}
    module.load_state_dict(best_state)
    return module.eval().requires_grad_(False)


def gate_tensors(gate: LambdaGate, prefix: str) -> dict[str, torch.Tensor]:
    """The gate's weights and statistics under prefix, for a safetensors file."""
    return {f"{prefix}.{name}": t.detach().contiguous() for name, t in gate.state_dict().items()}


def gate_from_tensors(tensors: dict[str, torch.Tensor], prefix: str, shape: dict) -> LambdaGate:
    """A gate rebuilt from gate_tensors' output and its shape (n_features, dim, rank, hidden)."""
    gate = LambdaGate(int(shape["n_features"]), int(shape["dim"]), int(shape["rank"]), int(shape["hidden"]))
    own = {name[len(prefix) + 1:]: t for name, t in tensors.items() if name.startswith(prefix + ".")}
    try:
        gate.load_state_dict(own)
    except RuntimeError as e:
        raise KNNLMError(f"The stored {prefix} gate does not match its description ({str(e).splitlines()[0]}); "
                         "run `knnlm tune-lambda` again.") from e
    return gate.eval().requires_grad_(False)
