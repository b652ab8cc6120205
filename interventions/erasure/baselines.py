"""Concept-erasure baselines beside LEACE, and their held-out evaluation.

oracle LEACE     x' = x - S_xz S_zz^+ (z - E z): uses the labels at erase time (Belrose et al. 2023, sec. 4)
quadratic LEACE  per class k, the Gaussian optimal-transport map N(mu_k, S_k) -> N(mu, S) onto the pooled
                 mean and the class-weighted mean covariance: class means and covariances become equal, so no
                 quadratic classifier beats chance on Gaussian data (needs the labels at erase time)
INLP             iterated null-space projection (Ravfogel et al. 2020): fit a linear classifier, project its
                 directions out, repeat
RLACE            relaxed linear adversarial concept erasure (Ravfogel et al. 2022): a rank-k projection that
                 maximises the loss of the best linear classifier, by alternating descent (classifier) and
                 ascent on a Fantope relaxation (projection), rounded to its top-k eigenvectors
INLP and RLACE return `LeaceEraser`s (L = U, R = U^T, mu = 0): they apply through interp.Project and fold like it.

`heldout_probe` fits a fresh logistic probe on one part of the data and scores it on another, with a Wilson
interval; "at chance" means the interval meets the range a predictor that ignores x can score (from the rarest
to the commonest class rate of the scored data); `evaluate` splits the data three ways (eraser fit / probe fit /
probe score), never scoring on data an eraser or a probe was fitted on, and warns when a probe is below chance
beyond its interval.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .leace import LeaceEraser


def _onehot(z: torch.Tensor) -> torch.Tensor:
    z = torch.as_tensor(z).long()
    return F.one_hot(z, int(z.max()) + 1).double()


@dataclass(frozen=True)
class OracleLeace:
    """x -> x - S_xz S_zz^+ (z - mu_z): the least-squares erasure when z is known for every row."""

    coef: torch.Tensor   # [d, k]
    mu_z: torch.Tensor   # [k]

    @classmethod
    def fit(cls, x: torch.Tensor, z: torch.Tensor) -> OracleLeace:
        x, Z = x.double(), _onehot(z)
        xc, zc = x - x.mean(0), Z - Z.mean(0)
        # zc has rank k-1 (its rows sum to 0): cut the null direction at a relative floor above rounding noise
        return cls((xc.T @ zc) @ torch.linalg.pinv(zc.T @ zc, rtol=1e-8, hermitian=True), Z.mean(0))

    def __call__(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        Z = F.one_hot(torch.as_tensor(z).long(), self.mu_z.shape[0]).double()
        return (x.double() - (Z - self.mu_z) @ self.coef.T).to(x.dtype)


def _sqrtm(S: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    ev, V = torch.linalg.eigh(S)
    ev = ev.clamp_min(1e-12)
    return (V * (ev ** (-0.5 if inverse else 0.5))) @ V.T


@dataclass(frozen=True)
class QuadraticLeace:
    """Per-class affine maps A_k (x - mu_k) + mu that give every class the same mean mu and covariance S."""

    A: torch.Tensor      # [k, d, d]
    mu_k: torch.Tensor   # [k, d]
    mu: torch.Tensor     # [d]

    @classmethod
    def fit(cls, x: torch.Tensor, z: torch.Tensor, ridge: float = 1e-6) -> QuadraticLeace:
        x, z = x.double(), torch.as_tensor(z).long()
        k, d = int(z.max()) + 1, x.shape[1]
        pri = torch.stack([(z == c).double().mean() for c in range(k)])
        mus = torch.stack([x[z == c].mean(0) for c in range(k)])
        eye = torch.eye(d, dtype=x.dtype)
        covs = [torch.cov(x[z == c].T).reshape(d, d) + ridge * eye for c in range(k)]
        target = sum(p * S for p, S in zip(pri, covs))
        maps = []
        for S in covs:
            r, ri = _sqrtm(S), _sqrtm(S, inverse=True)
            maps.append(ri @ _sqrtm(r @ target @ r) @ ri)
        return cls(torch.stack(maps), mus, pri @ mus)

    def __call__(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        xd, z = x.double(), torch.as_tensor(z).long()
        out = torch.empty_like(xd)
        for c in range(self.A.shape[0]):
            m = z == c
            out[m] = (xd[m] - self.mu_k[c]) @ self.A[c].T + self.mu
        return out.to(x.dtype)


def _fit_logistic(x: torch.Tensor, y: torch.Tensor, l2: float = 1e-4, steps: int = 200) -> nn.Linear:
    """Multinomial logistic regression by L-BFGS on the given (already standardised) features."""
    k = int(y.max()) + 1
    lin = nn.Linear(x.shape[1], k).double()
    nn.init.zeros_(lin.weight), nn.init.zeros_(lin.bias)
    opt = torch.optim.LBFGS(lin.parameters(), lr=1, max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(lin(x), y) + l2 * lin.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return lin


def _projection_eraser(U: torch.Tensor) -> LeaceEraser:
    """x -> x - (x U) U^T for orthonormal columns U [d, r]."""
    return LeaceEraser(U, U.T.contiguous(), torch.zeros(U.shape[0], dtype=U.dtype))


def inlp(x: torch.Tensor, z: torch.Tensor, n_iter: int = 10, l2: float = 1e-4) -> LeaceEraser:
    """INLP: n_iter rounds of fitting a linear classifier and projecting its weight rows out."""
    x, y = x.double(), torch.as_tensor(z).long()
    x = x - x.mean(0)
    d = x.shape[1]
    U = torch.zeros(d, 0, dtype=x.dtype)
    for _ in range(n_iter):
        xp = x - (x @ U) @ U.T
        w = _fit_logistic(xp, y, l2).weight.detach()
        w = w - (w @ U) @ U.T                       # keep the new directions orthogonal to the removed ones
        q, r = torch.linalg.qr(w.T)
        keep = r.diagonal().abs() > 1e-8 * max(float(r.abs().max()), 1e-30)
        if not bool(keep.any()):
            break
        U = torch.cat([U, q[:, keep]], 1)
        U, _ = torch.linalg.qr(U)
    return _projection_eraser(U)


def _fantope(P: torch.Tensor, k: int) -> torch.Tensor:
    """Euclidean projection of a symmetric matrix onto {0 <= P <= I, tr P = k} (bisection on the eigenvalue shift)."""
    ev, V = torch.linalg.eigh((P + P.T) / 2)
    lo, hi = float(ev.min()) - 1.0, float(ev.max())
    for _ in range(60):
        g = (lo + hi) / 2
        if float((ev - g).clamp(0, 1).sum()) > k:
            lo = g
        else:
            hi = g
    return (V * (ev - hi).clamp(0, 1)) @ V.T


def rlace(x: torch.Tensor, z: torch.Tensor, rank: int = 1, steps: int = 300, lr_p: float = 0.5,
          lr_clf: float = 5e-2, seed: int = 0, clf_steps: int = 5) -> LeaceEraser:
    """RLACE: max over rank-k projections P of min over linear classifiers of the loss on x (I - P).
    Each round: clf_steps Adam steps of the classifier, one plain gradient-ascent step on P (SGD: Adam's
    per-entry normalisation stalls the rotation of a near-hard projection), then the Fantope projection."""
    g = torch.Generator().manual_seed(seed)
    x, y = x.double(), torch.as_tensor(z).long()
    x = x - x.mean(0)
    d, k = x.shape[1], int(y.max()) + 1
    P = _fantope(torch.randn(d, d, generator=g, dtype=x.dtype) * 1e-2, rank).requires_grad_(True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        clf = nn.Linear(d, k).double()
    opt_c = torch.optim.Adam(clf.parameters(), lr=lr_clf)
    opt_p = torch.optim.SGD([P], lr=lr_p)
    eye = torch.eye(d, dtype=x.dtype)
    for _ in range(steps):
        xp = (x @ (eye - P)).detach()
        for _ in range(clf_steps):
            opt_c.zero_grad()
            F.cross_entropy(clf(xp), y).backward()
            opt_c.step()
        loss = F.cross_entropy(clf(x @ (eye - P)), y)
        opt_p.zero_grad()
        (-loss).backward(inputs=[P])
        opt_p.step()
        with torch.no_grad():
            P.copy_(_fantope(P, rank))
    ev, V = torch.linalg.eigh(P.detach())
    return _projection_eraser(V[:, -rank:].contiguous())


def wilson(correct: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion."""
    if n == 0:
        return 0.0, 1.0
    p = correct / n
    den = 1 + z * z / n
    mid = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return mid - half, mid + half


def heldout_probe(x_fit: torch.Tensor, z_fit: torch.Tensor, x_test: torch.Tensor, z_test: torch.Tensor,
                  quadratic: bool = False, l2: float = 1e-4) -> dict:
    """A fresh logistic probe fitted on (x_fit, z_fit), scored on (x_test, z_test): accuracy, interval, chance."""
    def feats(a):
        a = a.double()
        return torch.cat([a, a * a], 1) if quadratic else a
    a, b = feats(x_fit), feats(x_test)
    mu, sd = a.mean(0), a.std(0).clamp_min(1e-8)
    y, yt = torch.as_tensor(z_fit).long(), torch.as_tensor(z_test).long()
    lin = _fit_logistic((a - mu) / sd, y, l2)
    with torch.no_grad():
        correct = int((lin((b - mu) / sd).argmax(-1) == yt).sum())
    n = len(yt)
    # a predictor that ignores x scores sum_c q_c p_c: anywhere between the rarest and the commonest class rate
    rates = torch.bincount(yt, minlength=int(y.max()) + 1).double() / n
    chance, chance_low = float(rates.max()), float(rates[rates > 0].min())
    lo, hi = wilson(correct, n)
    out = {"accuracy": correct / n, "ci95": [lo, hi], "chance": chance, "chance_range": [chance_low, chance],
           "n_test": n, "chance_in_ci": lo <= chance and hi >= chance_low, "quadratic": quadratic}
    if hi < chance_low:
        warnings.warn(
            f"held-out probe accuracy {correct / n:.3f} (95% CI {lo:.3f}-{hi:.3f}) is below chance "
            f"({chance_low:.3f}-{chance:.3f}): the probe learned an anti-correlated rule, so the eraser's "
            "statistics and the "
            "scored data are not independent (fit and score on disjoint splits drawn the same way)",
            stacklevel=2,
        )
    return out


def splits(n: int, seed: int = 0, parts=(0.4, 0.3, 0.3), groups: Sequence | None = None) -> list[torch.Tensor]:
    """Disjoint random index sets: eraser fit / probe fit / probe score. With `groups` (one id per row) whole
    groups go to one split (e.g. every sentence about one name), so no split sees another's groups."""
    if groups is None:
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        cuts = [0, *[round(sum(parts[:i + 1]) * n) for i in range(len(parts))]]
        return [perm[cuts[i]:cuts[i + 1]] for i in range(len(parts))]
    ids = sorted(set(groups), key=str)
    order = [ids[i] for i in torch.randperm(len(ids), generator=torch.Generator().manual_seed(seed)).tolist()]
    cuts = [0, *[round(sum(parts[:i + 1]) * len(order)) for i in range(len(parts))]]
    where = {g: i for i in range(len(parts)) for g in order[cuts[i]:cuts[i + 1]]}
    return [torch.tensor([r for r, g in enumerate(groups) if where[g] == i], dtype=torch.long)
            for i in range(len(parts))]


ERASERS: dict[str, Callable] = {
    "leace": lambda x, z, **kw: LeaceEraser.fit(x.double(), torch.as_tensor(z).long()),
    "oracle_leace": lambda x, z, **kw: OracleLeace.fit(x, z),
    "quadratic_leace": lambda x, z, **kw: QuadraticLeace.fit(x, z),
    "inlp": lambda x, z, **kw: inlp(x, z, kw.get("inlp_iter", 10)),
    "rlace": lambda x, z, **kw: rlace(x, z, kw.get("rlace_rank", 1), kw.get("rlace_steps", 300)),
}
NEEDS_LABELS = ("oracle_leace", "quadratic_leace")


def evaluate(x: torch.Tensor, z: torch.Tensor, methods=("none", *ERASERS), seed: int = 0, quadratic: bool = False,
             groups: Sequence | None = None, **kw) -> dict:
    """Fit each eraser on split A, erase B and C, fit a fresh probe on B and score it on C."""
    A, B, C = splits(len(x), seed, groups=groups)
    z = torch.as_tensor(z).long()
    out = {}
    for m in methods:
        if m == "none":
            xb, xc, rank = x[B], x[C], 0
        else:
            er = ERASERS[m](x[A], z[A], **kw)
            xb, xc = (er(x[B], z[B]), er(x[C], z[C])) if m in NEEDS_LABELS else (er(x[B]), er(x[C]))
            rank = getattr(er, "rank", None)
        out[m] = {**heldout_probe(xb, z[B], xc, z[C], quadratic=quadratic), "eraser_rank": rank,
                  "n_fit_eraser": len(A), "n_fit_probe": len(B)}
    return out


__all__ = ["OracleLeace", "QuadraticLeace", "inlp", "rlace", "heldout_probe", "wilson", "splits", "evaluate",
           "ERASERS", "NEEDS_LABELS"]
