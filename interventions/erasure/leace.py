"""LEACE (Belrose et al. 2023): least-squares concept erasure, fitted from streaming statistics.

r(x) = x - W+ P W (x - mu) with W = Sigma_xx^(-1/2) and P the projection onto col(W Sigma_xz). Stored as
L = W+ U and R = U^T W (U: left singular vectors of W Sigma_xz above a tolerance), applied as
x' = x - ((x - mu) R^T) L^T — the form interp's `Project` op and kernels take. After erasure no linear
classifier of z beats a constant predictor (class-conditional means of x' are equal).

Eigen-directions of Sigma_xx count as null only below the numerical-rank cutoff d * eps(float64) * lambda_max
(the cutoff of torch.linalg.pinv and of the reference implementation): a larger relative cutoff would, on a
residual stream with one dominant direction (an attention sink: lambda_max ~ 1e7), call most directions null
and leave the concept in them. Every fit checks the guarantee itself: the cross-covariance of the erased
features with z must vanish (relative to its size before), else ErasureGuaranteeError naming the site.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from interp import Project, Where
from interp.errors import InterpError

GUARANTEE_TOL = 1e-6  # largest |Cov(x', z)| allowed after erasure, relative to |Cov(x, z)| before


class ErasureGuaranteeError(InterpError, RuntimeError):
    """A fitted eraser does not remove the linear cross-covariance with the concept."""


class ErasureInputError(InterpError, ValueError):
    """Features, labels or settings of an erasure fit that cannot give a valid eraser (NaN, inf, wrong shape)."""


def _cutoff(values: torch.Tensor, size: int, tol: float | None) -> torch.Tensor:
    """Values above the numerical-rank cutoff (size * eps * max), or above tol * max when tol is given."""
    top = values.max().clamp_min(0) if values.numel() else values.new_zeros(())
    rel = size * torch.finfo(values.dtype).eps if tol is None else tol
    return values > rel * top


def _labels(z: torch.Tensor, n_classes: int | None) -> torch.Tensor:
    """Integer labels [n] -> one-hot [n, k] (k = n_classes; 2 classes -> one column); float [n, k] as is."""
    z = torch.as_tensor(z)
    if z.dim() == 1 and not z.dtype.is_floating_point:
        k = int(n_classes if n_classes is not None else int(z.max()) + 1)
        if k < 2:
            raise ValueError(f"concept labels have only {k} class; LEACE needs at least two "
                             f"(got labels {z.unique().tolist()})")
        if int(z.min()) < 0 or int(z.max()) >= k:
            raise ValueError(f"labels must lie in 0..{k - 1}, got {int(z.min())}..{int(z.max())}")
        return (z == 1).double()[:, None] if k == 2 else nn.functional.one_hot(z.long(), k).double()
    if z.dim() == 1:
        return z.double()[:, None]
    if z.dim() != 2:
        raise ValueError(f"z must be labels [n] or a concept matrix [n, k], got shape {tuple(z.shape)}")
    return z.double()


@dataclass(frozen=True)
class LeaceEraser:
    """x -> x - ((x - mu) @ R.T) @ L.T, a rank-r affine eraser ([d, r] L, [r, d] R, [d] mu).

    Pass it to `interp.Project(site, eraser)` to apply inside a model, or call it on a tensor.
    """

    L: torch.Tensor
    R: torch.Tensor
    mu: torch.Tensor

    @classmethod
    def fit(cls, x: torch.Tensor, z: torch.Tensor, n_classes: int | None = None, **kw) -> LeaceEraser:
        """Fit on features x [n, d] and labels z ([n] ints or [n, k] values) in one go."""
        x = torch.as_tensor(x)
        zz = _labels(z, n_classes)
        return LeaceFitter(x.shape[-1], zz.shape[1], **kw).update(x, zz).eraser

    @property
    def dim(self) -> int:
        return self.L.shape[0]

    @property
    def rank(self) -> int:
        return self.L.shape[1]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.dim:
            raise ValueError(f"this eraser acts on {self.dim}-dim features, got a tensor of shape {tuple(x.shape)}")
        L, R, mu = (t.to(x.device, x.dtype) for t in (self.L, self.R, self.mu))
        return x - ((x - mu) @ R.T) @ L.T

    def projection(self) -> torch.Tensor:
        """The [d, d] oblique projection L R that the eraser removes (x' = x - L R (x - mu))."""
        return self.L @ self.R

    def to(self, *args, **kw) -> LeaceEraser:
        return LeaceEraser(self.L.to(*args, **kw), self.R.to(*args, **kw), self.mu.to(*args, **kw))

    def op(self, site: str, where: Where | None = None) -> Project:
        """The engine op that applies this eraser at `site`."""
        return Project(site, self, where=where)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"L": self.L, "R": self.R, "mu": self.mu}


class LeaceFitter:
    """Streaming LEACE statistics: `update(x, z)` with batches, then `.eraser`.

    Means and (co)variances are merged per batch (Chan et al.) in float64, so any batching gives the
    same eraser as one pass over all the data.
    """

    def __init__(self, x_dim: int, z_dim: int, n_classes: int | None = None, tol: float | None = None,
                 device: str | torch.device | None = None, site: str = ""):
        if tol is not None and not (math.isfinite(tol) and 0 <= tol < 1):
            raise ErasureInputError(f"tol must be a finite number in [0, 1) or None (numerical rank), got {tol!r}")
        self.x_dim, self.z_dim, self.n_classes, self.tol, self.site = x_dim, z_dim, n_classes, tol, site
        kw = dict(dtype=torch.float64, device=device)
        self.n = 0
        self.mean_x = torch.zeros(x_dim, **kw)
        self.mean_z = torch.zeros(z_dim, **kw)
        self.m2_xx = torch.zeros(x_dim, x_dim, **kw)
        self.m2_xz = torch.zeros(x_dim, z_dim, **kw)
        self.m2_zz = torch.zeros(z_dim, **kw)  # diagonal only: the variances of z, for the guarantee's noise floor

    def update(self, x: torch.Tensor, z: torch.Tensor) -> LeaceFitter:
        """Add a batch: x [..., d] (leading axes flattened) and labels / concept values for each row."""
        x = torch.as_tensor(x).detach()
        x = x.reshape(-1, x.shape[-1]).to(self.mean_x)
        z = torch.as_tensor(z).detach()
        for name, t in (("features x", x), ("labels z", z)):
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                bad = int((~torch.isfinite(t)).sum())
                raise ErasureInputError(f"LEACE{self._at()}: {name} hold {bad} NaN / inf values: fix the activations "
                                        "or labels (a non-finite row would make the eraser NaN)")
        if z.dim() >= 1 and z.shape[0] != x.shape[0] and z.numel() == x.shape[0]:
            z = z.reshape(-1)
        if z.dim() == 0 or z.shape[0] != x.shape[0]:
            raise ValueError(f"z has shape {tuple(z.shape)} for {x.shape[0]} rows of x: pass one label per row of x")
        k = self.n_classes if self.n_classes is not None else (2 if self.z_dim == 1 else self.z_dim)
        zz = _labels(z, k).to(self.mean_x)
        if x.shape[1] != self.x_dim:
            raise ValueError(f"this fitter was made for {self.x_dim}-dim features, got {x.shape[1]}")
        if zz.shape != (x.shape[0], self.z_dim):
            raise ValueError(f"z gives {tuple(zz.shape)} concept values for {x.shape[0]} rows; expected "
                             f"({x.shape[0]}, {self.z_dim}): pass one label per row of x")
        m = x.shape[0]
        if m == 0:
            return self
        bx, bz = x.mean(0), zz.mean(0)
        dx, dz = x - bx, zz - bz
        n = self.n
        tot = n + m
        delta_x, delta_z = bx - self.mean_x, bz - self.mean_z
        self.m2_xx += dx.T @ dx + torch.outer(delta_x, delta_x) * (n * m / tot)
        self.m2_xz += dx.T @ dz + torch.outer(delta_x, delta_z) * (n * m / tot)
        self.m2_zz += (dz * dz).sum(0) + delta_z * delta_z * (n * m / tot)
        self.mean_x += delta_x * (m / tot)
        self.mean_z += delta_z * (m / tot)
        self.n = tot
        return self

    @property
    def sigma_xx(self) -> torch.Tensor:
        return self.m2_xx / max(self.n - 1, 1)

    @property
    def sigma_xz(self) -> torch.Tensor:
        return self.m2_xz / max(self.n - 1, 1)

    def _at(self) -> str:
        return f" at {self.site!r}" if self.site else ""

    @property
    def eraser(self) -> LeaceEraser:
        """The fitted eraser, after checking that it removes the cross-covariance (ErasureGuaranteeError)."""
        if self.n < 2:
            raise ValueError(f"LEACE needs at least 2 samples, got {self.n}")
        evals, V = torch.linalg.eigh(self.sigma_xx)
        keep = _cutoff(evals, self.x_dim, self.tol)
        root = evals.clamp_min(0).sqrt()
        inv = torch.where(keep, 1.0 / root.clamp_min(1e-300), torch.zeros_like(root))
        W = (V * inv) @ V.T                      # Sigma^(-1/2) on the support
        W_pinv = (V * torch.where(keep, root, torch.zeros_like(root))) @ V.T
        U, S, _ = torch.linalg.svd(W @ self.sigma_xz, full_matrices=False)
        keep_s = _cutoff(S, max(self.x_dim, self.z_dim), self.tol)
        if self.tol is None:  # what rounding leaves in W @ Sigma_xz (e.g. the k-th direction of one-hot labels)
            noise = max(self.x_dim, self.z_dim) * torch.finfo(S.dtype).eps * float(inv.max()) * float(
                torch.linalg.matrix_norm(self.sigma_xz, ord=2))
            keep_s = keep_s & (S > noise)
        U = U[:, keep_s] if S.numel() and S.max() > 0 else U[:, :0]
        er = LeaceEraser(W_pinv @ U, U.T @ W, self.mean_x.clone())
        # what rounding alone can leave: Cauchy-Schwarz over the directions below the numerical-rank floor
        floor = self.x_dim * torch.finfo(evals.dtype).eps * float(evals.max().clamp_min(0))
        var_z = float(self.m2_zz.sum()) / max(self.n - 1, 1)
        self.check(er, slack=math.sqrt(int((~keep).sum()) * floor * var_z))
        return er

    def residual(self, eraser: LeaceEraser) -> tuple[float, float]:
        """(|Cov(x', z)|, |Cov(x, z)|) in Frobenius norm for the fitted data erased by `eraser`."""
        P = eraser.projection().to(self.sigma_xz)
        xz = self.sigma_xz
        return float((xz - P @ xz).norm()), float(xz.norm())

    def check(self, eraser: LeaceEraser, tol: float = GUARANTEE_TOL, slack: float = 0.0) -> None:
        """ErasureGuaranteeError unless the erased features' cross-covariance with z is at most tol (relative to
        before) plus `slack` (absolute: what directions at the numerical noise floor may carry)."""
        after, before = self.residual(eraser)
        if not math.isfinite(after) or after > tol * before + slack:
            raise ErasureGuaranteeError(
                f"LEACE{self._at()}: after erasure the cross-covariance with the concept is {after:.3g} "
                f"({after / max(before, 1e-300):.2g} of the {before:.3g} before; allowed {tol:g}): the eraser "
                "does not remove the concept; " + (f"tol={self.tol:g} treats directions that carry it as null: "
                                                   "leave tol=None (numerical rank)" if self.tol is not None else
                                                   "check the features for degenerate directions"))


# ---------------------------------------------------------------------------------------------
# folding an eraser into a neighbouring linear layer
# ---------------------------------------------------------------------------------------------

def fold_weights(weight: torch.Tensor, bias: torch.Tensor | None, eraser: LeaceEraser, side: str
                 ) -> tuple[torch.Tensor, torch.Tensor | None, bool]:
    """New (weight, bias) of y = A x + b with the eraser folded in, and whether the mean is kept.

    side="before": the eraser acts on the layer's input, A' = A (I - L R), b' = b + A L R mu.
    side="after": on its output, A' = (I - L R) A, b' = (I - L R) b + L R mu.
    A bias-free layer keeps its bias-free shape: the erasure guarantee holds, only the constant mean
    term is lost (outputs shift by a constant), reported by the third value (False).
    """
    if side not in ("before", "after"):
        raise ValueError(f"side must be 'before' (eraser on the layer input) or 'after' (on its output), not {side!r}")
    A = weight.double()
    dim = A.shape[1] if side == "before" else A.shape[0]
    if eraser.dim != dim:
        io = "input" if side == "before" else "output"
        raise ValueError(f"eraser acts on {eraser.dim}-dim features but the layer's {io} "
                         f"has {dim} (weight {tuple(weight.shape)}): fold it on the other side or fit it at this site")
    P = eraser.projection().to(A)
    mu = eraser.mu.to(A)
    eye = torch.eye(dim, dtype=A.dtype, device=A.device)
    if side == "before":
        A2 = A @ (eye - P)
        shift = A @ (P @ mu)
        b2 = None if bias is None else bias.double() + shift
    else:
        A2 = (eye - P) @ A
        shift = P @ mu
        b2 = None if bias is None else (eye - P) @ bias.double() + shift
    return A2.to(weight.dtype), (None if b2 is None else b2.to(bias.dtype)), bias is not None


def fold_eraser(linear: nn.Linear, eraser: LeaceEraser, side: str) -> bool:
    """Fold `eraser` into `linear` in place (see fold_weights); returns whether the mean is preserved."""
    if not isinstance(linear, nn.Linear):
        raise TypeError(f"can only fold an eraser into an nn.Linear, got {type(linear).__name__}")
    W, b, kept = fold_weights(linear.weight.data, None if linear.bias is None else linear.bias.data, eraser, side)
    with torch.no_grad():
        linear.weight.copy_(W)
        if b is not None:
            linear.bias.copy_(b)
    return kept


def fit_at_site(lm, batches: Sequence, labels: Sequence[torch.Tensor], site: str, *, n_classes: int = 2,
                pool=None, tol: float | None = None, **run_kw) -> LeaceEraser:
    """Fit an eraser on the activations of `site`, captured through the engine batch by batch.

    batches: model inputs; labels: one label tensor per batch, either per item ([B]) — every position of
    the item gets its item's label — or per position ([B, T]). pool(act, batch) -> [B, d] reduces the
    positions first (e.g. a masked mean) when the concept is a sentence-level property. Integer labels
    name one of `n_classes` classes; float labels [B(, T), k] are concept values used as they are.
    """
    fitter = None
    for inp, z in zip(batches, labels):
        act = lm.run(inp, capture=[site], **run_kw).cache[site].double()
        z = torch.as_tensor(z)
        if pool is not None:
            act = pool(act, inp)
        elif act.dim() == 3 and z.dim() == 1:
            z = z[:, None].expand(-1, act.shape[1])
        if fitter is None:
            k = z.shape[-1] if z.dtype.is_floating_point and z.dim() > 1 else (1 if n_classes == 2 else n_classes)
            fitter = LeaceFitter(act.shape[-1], k, n_classes=None if z.dtype.is_floating_point else n_classes, tol=tol,
                                 site=site)
        flat_z = z.reshape(-1, z.shape[-1]) if z.dtype.is_floating_point and z.dim() > 1 else z.reshape(-1)
        fitter.update(act.reshape(-1, act.shape[-1]), flat_z)
    if fitter is None:
        raise ValueError("fit_at_site got no batches")
    return fitter.eraser
