"""The closed-form ridge editor behind Diff-QuickFix, TIME, UCE, LocoEdit and the Flux/SD3 context edit.

    W = (lam W0 + sum_e v_e k_e^T + sum_p W0 c_p c_p^T) (lam I + sum_e k_e k_e^T + sum_p c_p c_p^T)^-1

minimises lam ||W - W0||^2 + sum_e ||W k_e - v_e||^2 + sum_p ||W c_p - W0 c_p||^2.
"""
from __future__ import annotations

import math

import torch

from .leace import ErasureInputError


def ridge_solve(W0: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, preserve: torch.Tensor | None = None,
                lam: float = 0.1, preserve_weight: float = 1.0) -> torch.Tensor:
    """New weight [out, in] for y = W x: keys [n, in] -> values [n, out], preserve keys [m, in] kept, ridge lam.

    Solved in float64; returned in W0's dtype. `preserve_weight` scales the preservation terms.
    """
    if W0.dim() != 2:
        raise ValueError(f"W0 must be a [out, in] weight matrix, got shape {tuple(W0.shape)}")
    out_dim, in_dim = W0.shape
    k = keys.reshape(-1, keys.shape[-1]).double()
    v = values.reshape(-1, values.shape[-1]).double()
    if k.shape[1] != in_dim or v.shape[1] != out_dim or k.shape[0] != v.shape[0]:
        raise ValueError(f"keys {tuple(keys.shape)} and values {tuple(values.shape)} do not fit a weight of shape "
                         f"{tuple(W0.shape)}: keys need {in_dim} features, values {out_dim}, and one value per key")
    try:
        lam = float(lam)
    except (TypeError, ValueError):
        raise ErasureInputError(f"lam must be a number, got {lam!r}") from None
    if not math.isfinite(lam):
        raise ErasureInputError(f"lam must be a finite number >= 0, got {lam!r}")
    for name, t in (("keys", k), ("values", v), ("W0", W0)):
        if not bool(torch.isfinite(t).all()):
            raise ErasureInputError(f"the ridge edit's {name} hold NaN / inf values: check the model's activations")
    if lam < 0 or (lam == 0 and k.shape[0] < in_dim and preserve is None):
        raise ValueError(f"lam must be > 0 (got {lam}) unless the keys span the input space")
    W = W0.double()
    eye = torch.eye(in_dim, dtype=torch.float64, device=W.device)
    lhs = lam * W + v.T @ k
    gram = lam * eye + k.T @ k
    if preserve is not None and preserve.numel():
        c = preserve.reshape(-1, preserve.shape[-1]).double()
        if c.shape[1] != in_dim:
            raise ValueError(f"preservation keys have {c.shape[1]} features, the weight takes {in_dim}")
        cc = preserve_weight * (c.T @ c)
        lhs = lhs + W @ cc
        gram = gram + cc
    return torch.linalg.solve(gram, lhs.T).T.to(W0.dtype)


def ridge_objective(W: torch.Tensor, W0: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                    preserve: torch.Tensor | None = None, lam: float = 0.1) -> torch.Tensor:
    """The objective ridge_solve minimises (for checks)."""
    W, W0 = W.double(), W0.double()
    k, v = keys.double(), values.double()
    f = lam * ((W - W0) ** 2).sum() + ((k @ W.T - v) ** 2).sum()
    if preserve is not None:
        c = preserve.double()
        f = f + ((c @ W.T - c @ W0.T) ** 2).sum()
    return f
