"""Concept directions in one form for probes, steering and erasure.

A `Direction` (interp.direction, shared with steering vectors) is a frozen value: the vector (in the
site's raw feature space), the site, how it was made, provenance and free metadata.
`direction.add(alpha)` is the steering op (interp.Add),
`direction.project()` the rank-1 erasure op (interp.Project, the same L, R, mu form LEACE uses);
`save` / `load` write one safetensors file with the metadata in its header.

Makers: `mean_difference` (optionally per-example z-normalised, docs/METHODS.md "Steering"),
`lda` (shrinkage Fisher discriminant) and `probe_direction` (a fitted probe's weights).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from interp import io as _io
from interp.direction import Direction, znormalize

from .linear import Probe, encode_labels


def _groups(
    X: torch.Tensor, labels: Sequence[Any] | torch.Tensor, positive, negative
) -> tuple[torch.Tensor, torch.Tensor]:
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
    return _io.fingerprint(torch.as_tensor(X).float(), length=16)


def mean_difference(X: torch.Tensor, labels, positive, negative=None, *, site: str = "", zscore: bool = False,
                    meta: dict | None = None) -> Direction:
    """mean(X | positive) - mean(X | negative or every other label); zscore normalises each example first."""
    X = torch.as_tensor(X).float()
    Xz = znormalize(X).float() if zscore else X
    P, N = _groups(Xz, labels, positive, negative)
    return Direction(P.mean(0) - N.mean(0), site, "mean_difference" + ("_zscore" if zscore else ""),
                     {"positive": str(positive), "negative": str(negative if negative is not None else "rest"),
                      "n_positive": len(P), "n_negative": len(N), "data_hash": _data_hash(X), **(meta or {})},
                     mu=X.mean(0), data_hash=_data_hash(X))


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
    return Direction(w, site, "lda", {"positive": str(positive),
                                      "negative": str(negative if negative is not None else "rest"),
                                      "shrinkage": shrinkage, "n_positive": len(P), "n_negative": len(N),
                                      "data_hash": _data_hash(X), **(meta or {})}, mu=X.mean(0),
                     data_hash=_data_hash(X))


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
