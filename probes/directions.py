"""Concept directions in one form for probes, steering and erasure.

A `Direction` is a frozen value: the vector (in the site's raw feature space), the site, how it
was made and free metadata. `direction.add(alpha)` is the steering op (interp.Add),
`direction.project()` the rank-1 erasure op (interp.Project, the same L, R, mu form LEACE uses);
`save` / `load` write one safetensors file with the metadata in its header.

Makers: `mean_difference` (optionally per-example z-normalised, as in METHODS.md steering),
`lda` (shrinkage Fisher discriminant) and `probe_direction` (a fitted probe's weights).
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from interp import Add, Project, Where

from .linear import Probe, encode_labels

FORMAT = "interp.direction/1"


@dataclass(frozen=True, eq=False)
class Direction:
    """vector [D] at `site`; `mu` is the mean activation of the data it came from (for erasure), if known."""

    vector: torch.Tensor
    site: str
    method: str
    meta: dict = field(default_factory=dict)
    mu: torch.Tensor | None = None

    def __post_init__(self):
        v = torch.as_tensor(self.vector).detach().float().cpu()
        if v.dim() != 1 or v.numel() == 0:
            raise ValueError(f"a direction is one vector [d]; got shape {tuple(v.shape)}")
        if not torch.isfinite(v).all() or float(v.norm()) == 0:
            raise ValueError(f"direction for {self.site!r} ({self.method}) is zero or not finite: the two groups "
                             "may be identical, or a class is missing from the data")
        object.__setattr__(self, "vector", v)
        if self.mu is not None:
            object.__setattr__(self, "mu", torch.as_tensor(self.mu).detach().float().cpu().reshape(-1))
        object.__setattr__(self, "meta", dict(self.meta))

    @property
    def dim(self) -> int:
        return self.vector.numel()

    @property
    def unit(self) -> torch.Tensor:
        return self.vector / self.vector.norm()

    def scores(self, X: torch.Tensor) -> torch.Tensor:
        """Projection of activations [..., D] onto the unit direction."""
        return torch.as_tensor(X).float() @ self.unit

    def cosine(self, other: "Direction") -> float:
        return float(self.unit @ other.unit)

    # -- as ops ---------------------------------------------------------------------------------
    def add(self, alpha: float = 1.0, where: Where | Any = None, norm: str | None = None, unit: bool = False) -> Add:
        """Steering op h <- h + alpha * v (alpha * v * ||h|| / ||v|| with norm="relative"; unit=True uses v/||v||)."""
        return Add(self.site, self.unit if unit else self.vector, alpha=alpha, norm=norm, where=where)

    def eraser(self, center: bool = True) -> dict[str, torch.Tensor]:
        """Rank-1 orthogonal eraser in the Project form x - ((x - mu) @ R.T) @ L.T, with L = u, R = u^T."""
        u = self.unit[:, None]
        mu = self.mu if (center and self.mu is not None) else None
        return {"L": u, "R": u.T.contiguous(), **({"mu": mu} if mu is not None else {})}

    def project(self, where: Where | Any = None, center: bool = True) -> Project:
        """Erasure op removing this direction at its site."""
        return Project(self.site, self.eraser(center), where=where)

    # -- disk -----------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        from safetensors.torch import save_file

        path = Path(path)
        path = path if path.suffix == ".safetensors" else path.with_suffix(".safetensors")
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {"vector": self.vector.contiguous()}
        if self.mu is not None:
            tensors["mu"] = self.mu.contiguous()
        header = {"format": FORMAT, "site": self.site, "method": self.method, "meta": json.dumps(self.meta, default=str)}
        save_file(tensors, str(path), metadata=header)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Direction":
        from safetensors import safe_open

        path = Path(path)
        path = path if path.suffix == ".safetensors" or path.exists() else path.with_suffix(".safetensors")
        with safe_open(str(path), "pt") as f:
            header = f.metadata() or {}
            if header.get("format") != FORMAT:
                raise ValueError(f"{path} is not an interp direction (format {header.get('format')!r}); "
                                 "directions are written by Direction.save")
            vec = f.get_tensor("vector")
            mu = f.get_tensor("mu") if "mu" in f.keys() else None
        return cls(vec, header["site"], header["method"], json.loads(header.get("meta", "{}")), mu)


def _groups(X: torch.Tensor, labels: Sequence[Any] | torch.Tensor, positive, negative) -> tuple[torch.Tensor, torch.Tensor]:
    X = torch.as_tensor(X).double()
    if X.dim() != 2:
        raise ValueError(f"activations must be [n_examples, d]; got {tuple(X.shape)}")
    vals = labels.tolist() if isinstance(labels, torch.Tensor) else list(labels)
    if len(vals) != X.shape[0]:
        raise ValueError(f"{len(vals)} labels for {X.shape[0]} activation rows")
    pos = torch.tensor([v == positive for v in vals])
    neg = torch.tensor([v == negative for v in vals]) if negative is not None else ~pos
    for ok, what in ((pos, f"the positive class {positive!r}"), (neg, f"the negative class {negative!r}")):
        if not ok.any():
            raise ValueError(f"no examples of {what} among the labels {sorted({str(v) for v in vals})}")
    return X[pos], X[neg]


def _data_hash(X: torch.Tensor) -> str:
    return hashlib.sha256(torch.as_tensor(X).float().contiguous().numpy().tobytes()).hexdigest()[:16]


def mean_difference(X: torch.Tensor, labels, positive, negative=None, *, site: str = "", zscore: bool = False,
                    meta: dict | None = None) -> Direction:
    """mean(X | positive) - mean(X | negative or every other label); zscore normalises each example first."""
    X = torch.as_tensor(X).float()
    Xz = (X - X.mean(1, keepdim=True)) / X.std(1, keepdim=True).clamp_min(1e-8) if zscore else X
    P, N = _groups(Xz, labels, positive, negative)
    return Direction(P.mean(0) - N.mean(0), site, "mean_difference" + ("_zscore" if zscore else ""),
                     {"positive": str(positive), "negative": str(negative if negative is not None else "rest"),
                      "n_positive": len(P), "n_negative": len(N), "data_hash": _data_hash(X), **(meta or {})},
                     mu=X.mean(0))


def lda(X: torch.Tensor, labels, positive, negative=None, *, site: str = "", shrinkage: float = 0.1,
        meta: dict | None = None) -> Direction:
    """Fisher discriminant w = S^-1 (mu_pos - mu_neg), S the pooled within-class covariance shrunk towards
    (tr S / d) I by `shrinkage` in [0, 1]; scaled to the mean difference's length along itself."""
    if not 0 <= shrinkage <= 1:
        raise ValueError(f"shrinkage must lie in [0, 1], got {shrinkage}")
    X = torch.as_tensor(X).float()
    P, N = _groups(X, labels, positive, negative)
    diff = P.mean(0) - N.mean(0)
    Xc = torch.cat([P - P.mean(0), N - N.mean(0)])
    S = Xc.T @ Xc / max(1, len(Xc) - 2)
    d = S.shape[0]
    S = (1 - shrinkage) * S + shrinkage * (torch.trace(S) / d).clamp_min(1e-12) * torch.eye(d, dtype=S.dtype)
    w = torch.linalg.solve(S + 1e-10 * torch.eye(d, dtype=S.dtype), diff)
    w = w * (diff @ diff) / (w @ diff)  # same projection of the class difference as the mean difference
    return Direction(w, site, "lda", {"positive": str(positive), "negative": str(negative if negative is not None else "rest"),
                                      "shrinkage": shrinkage, "n_positive": len(P), "n_negative": len(N),
                                      "data_hash": _data_hash(X), **(meta or {})}, mu=X.mean(0))


def probe_direction(probe: Probe, cls: int = -1, *, site: str = "", meta: dict | None = None) -> Direction:
    """The weight direction of class `cls` of a fitted probe, in raw feature space (for binary: the positive class)."""
    return Direction(probe.weight(cls), site, f"probe_{probe.kind}",
                     {"class": int(cls) % len(probe.classes), "lam": probe.lam, **(meta or {})}, mu=probe.mean)


def from_dataset(ds, site: str, pos, label: str, positive, negative=None, method: str = "mean_difference",
                 **kw) -> Direction:
    """A direction from an ActivationDataset cell: method "mean_difference" | "lda" | "probe"."""
    X = ds.X(site, pos)
    values = ds.labels[label]
    meta = {"label": label, "pos": str(pos), **ds.meta}
    meta.pop("fingerprint", None)
    if method == "mean_difference":
        return mean_difference(X, values, positive, negative, site=site, meta=meta, **kw)
    if method == "lda":
        return lda(X, values, positive, negative, site=site, meta=meta, **kw)
    if method == "probe":
        from .linear import fit

        keep = [i for i, v in enumerate(values) if negative is None or v in (positive, negative)]
        binary = [int(values[i] == positive) for i in keep]
        y, _ = encode_labels(binary)
        return probe_direction(fit(X[keep], y, **kw), 1, site=site, meta=meta)
    raise ValueError(f"unknown direction method {method!r}: choose 'mean_difference', 'lda' or 'probe'")


__all__ = ["Direction", "mean_difference", "lda", "probe_direction", "from_dataset"]
