"""The one direction type: a vector at a site plus where it came from (docs/METHODS.md, "Steering" and "Probes").

Probes (`probes.Direction` makers), steering (`interventions.steering.SteeringVector`, a subclass
that knows how to check and inject itself) and rank-1 erasure all use `Direction`. Provenance:
`method`, `model` (a name), `identity` (the model-identity fingerprint of the model it was recorded
on, {} when unknown), `data_hash` (a fingerprint of the data that defined it), `meta` (free).
One file format (safetensors, provenance in the header, written atomically by interp.io) reads
both older formats ("interp.direction/1" and "interp.steering/1").
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from . import io as _io
from .errors import InterpError, SiteShapeError
from .ops import Add, Project, Where

FORMAT = "interp.direction/2"
READS = ("interp.direction/2", "interp.direction/1", "interp.steering/1")
EPS = 1e-12  # the one epsilon: per-example std floor in znormalize, norm floor in rescaling / projections


class DirectionFileError(InterpError, ValueError):
    """A file that is not an interp direction / steering vector."""


def znormalize(acts: torch.Tensor) -> torch.Tensor:
    """Each example to zero mean and unit std over its features (all non-batch axes), in float64."""
    a = acts.double().flatten(1)
    a = (a - a.mean(1, keepdim=True)) / a.std(1, keepdim=True).clamp_min(EPS)
    return a.reshape(acts.shape)


@dataclass(frozen=True, eq=False)
class Direction:
    """vector [d] (float32, CPU) at `site` ([*shape] when spatial="keep"); `mu`: mean activation of its data
    (for erasure), if known."""

    vector: torch.Tensor
    site: str
    method: str = ""
    meta: dict = field(default_factory=dict)
    mu: torch.Tensor | None = None
    model: str = ""
    data_hash: str = ""
    spatial: str | None = None
    identity: dict = field(default_factory=dict)

    _noun = "direction"

    def __post_init__(self):
        if not isinstance(self.vector, torch.Tensor) or self.vector.numel() == 0:
            raise SiteShapeError(f"a {self._noun} needs a non-empty tensor, got {type(self.vector).__name__}")
        if self.spatial not in (None, "average", "keep"):
            raise ValueError(f"spatial must be None, 'average' or 'keep', not {self.spatial!r}")
        v = self.vector.detach().float().cpu()  # stored float32 on the CPU; ops cast to the activations' dtype
        if self.spatial != "keep" and v.dim() != 1:
            raise SiteShapeError(f"a {self._noun} is one vector [d]; got shape {tuple(v.shape)} "
                                 "(full-shape vectors need spatial='keep')")
        if not torch.isfinite(v).all() or float(v.double().norm()) == 0:
            raise SiteShapeError(f"the {self._noun} for {self.site!r} ({self.method}) is zero or not finite "
                                 "(non-finite entries come from NaN activations, zero from identical groups or a "
                                 "missing class): check the activations")
        object.__setattr__(self, "vector", v)
        if self.mu is not None:
            object.__setattr__(self, "mu", torch.as_tensor(self.mu).detach().float().cpu().reshape(-1))
        object.__setattr__(self, "meta", dict(self.meta))
        object.__setattr__(self, "identity", dict(self.identity))

    @property
    def dim(self) -> int:
        return self.vector.numel()

    @property
    def norm(self) -> float:
        return float(self.vector.double().norm())

    @property
    def unit(self) -> torch.Tensor:
        return (self.vector.double() / self.vector.double().norm()).to(self.vector.dtype)

    def scores(self, X: torch.Tensor) -> torch.Tensor:
        """Projection of activations [..., d] onto the unit direction."""
        return torch.as_tensor(X).float() @ self.unit.float().reshape(-1)

    def cosine(self, other: Direction | torch.Tensor) -> float:
        o = other.vector if isinstance(other, Direction) else torch.as_tensor(other)
        return float(torch.nn.functional.cosine_similarity(self.vector.double().reshape(-1),
                                                           o.double().reshape(-1), 0, eps=EPS))

    def rescaled(self, target_norm: float) -> Direction:
        v = self.vector.double()
        return replace(self, vector=(v / v.norm().clamp_min(EPS) * target_norm).to(self.vector.dtype))

    def random_like(self, seed: int = 0) -> Direction:
        """An isotropic random direction with this one's shape and norm (a control)."""
        g = torch.Generator().manual_seed(seed)
        r = torch.randn(self.vector.shape, generator=g, dtype=torch.float64)
        r = (r / r.norm() * self.vector.double().norm()).to(self.vector.dtype)
        return replace(self, vector=r, method="random", meta={**self.meta, "control": "random", "seed": seed})

    # -- as ops ---------------------------------------------------------------------------------
    def add(self, alpha: float = 1.0, where: Where | Any = None, norm: str | None = None, unit: bool = False) -> Add:
        """Steering op h <- h + alpha * v (alpha * v * ||h|| / ||v|| with norm="relative"; unit=True uses v/||v||)."""
        return Add(self.site, self.unit if unit else self.vector, alpha=alpha, norm=norm, spatial=self.spatial,
                   where=where)

    def eraser(self, center: bool = True) -> dict[str, torch.Tensor]:
        """Rank-1 orthogonal eraser in the Project form x - ((x - mu) @ R.T) @ L.T, with L = u, R = u^T."""
        if self.vector.dim() != 1:
            raise SiteShapeError(f"erasing needs a [d] direction; {self.site!r} holds shape {tuple(self.vector.shape)}")
        u = self.unit.float()[:, None]
        mu = self.mu if (center and self.mu is not None) else None
        return {"L": u, "R": u.T.contiguous(), **({"mu": mu} if mu is not None else {})}

    def project(self, where: Where | Any = None, center: bool = True) -> Project:
        """Erasure op removing this direction at its site."""
        return Project(self.site, self.eraser(center), where=where)

    # -- disk -----------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        """One .safetensors file, written atomically; provenance in its header (strings only)."""
        path = _suffixed(Path(path))
        tensors = {"vector": self.vector.contiguous(), **({"mu": self.mu.contiguous()} if self.mu is not None else {})}
        header = {"format": FORMAT, "kind": type(self).__name__, "site": self.site, "method": self.method,
                  "model": self.model, "data_hash": self.data_hash, "spatial": self.spatial or "",
                  "meta": json.dumps(_io.jsonable(self.meta)), "identity": json.dumps(_io.jsonable(self.identity)),
                  "width": str(self.vector.shape[-1])}
        return _io.atomic_write_safetensors(path, tensors, header)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Direction:
        """Read a file written by `save` (or by the older Direction / SteeringVector formats) as `cls`."""
        from safetensors import safe_open

        path = Path(path)
        path = path if path.is_file() else _suffixed(path)
        if not path.is_file():
            raise InterpError(f"no {cls._noun} file at {path}")
        _io.check_safetensors(path)
        with safe_open(str(path), framework="pt") as f:
            h = f.metadata() or {}
            if h.get("format") not in READS:
                raise DirectionFileError(f"{path} is not an interp {cls._noun} (format {h.get('format')!r}); "
                                         f"write one with {cls.__name__}.save")
            vec = f.get_tensor("vector")
            mu = f.get_tensor("mu") if "mu" in f.keys() else None
        if "width" in h and int(h["width"]) != vec.shape[-1]:
            raise _io.CorruptFileError(f"{path}: the vector has width {vec.shape[-1]}, its header says {h['width']}")
        return cls(vec, h["site"], h.get("method", ""), json.loads(h.get("meta", "{}")), mu, h.get("model", ""),
                   h.get("data_hash", ""), h.get("spatial") or None, json.loads(h.get("identity", "{}")))


def _suffixed(path: Path) -> Path:
    return path if path.suffix == ".safetensors" else path.with_suffix(".safetensors")


__all__ = ["Direction", "DirectionFileError", "znormalize", "EPS", "FORMAT"]
