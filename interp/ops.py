"""Intervention values: frozen, inspectable descriptions of an edit at one site.

An op never touches a model; the engine resolves its site and `where`, then applies it
through the fused kernels in interp.kernels.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

PosSpec = Any  # None | int | Sequence[int] | slice | Tokens | Subject


@dataclass(frozen=True)
class Tokens:
    """Positions whose token string matches `text` (stripped, case-sensitive); `occurrence` picks one."""

    text: str
    occurrence: int | None = None  # None: every match; 0: first; -1: last


@dataclass(frozen=True)
class Subject:
    """Positions of the tokens that spell `text` inside the prompt; `which` is "last", "first" or "all"."""

    text: str
    which: str = "last"


@dataclass(frozen=True)
class Where:
    """What part of a site's tensor an op touches.

    pos: positions (None = all); heads: head indices on per-head sites (None = all);
    items: batch items of the base input (None = all); steps: denoising step indices or a
    (start, stop) window (None = every call); branch: "cond" | "uncond" | "both" for
    classifier-free guidance; stream: "img" | "txt" for joint-attention blocks.
    """

    pos: PosSpec = None
    heads: Sequence[int] | int | None = None
    items: Sequence[int] | int | None = None
    steps: Sequence[int] | tuple[int, int] | range | None = None
    branch: str = "both"
    stream: str | None = None

    def __post_init__(self):
        if self.branch not in ("cond", "uncond", "both"):
            raise ValueError(f"branch must be 'cond', 'uncond' or 'both', not {self.branch!r}")


ALL = Where()


def at(pos: PosSpec = None, heads=None, items=None, steps=None, branch: str = "both", stream=None) -> Where:
    """Shorthand for Where(...)."""
    return Where(pos=pos, heads=heads, items=items, steps=steps, branch=branch, stream=stream)


def _where(w) -> Where:
    if w is None:
        return ALL
    if isinstance(w, Where):
        return w
    if isinstance(w, dict):
        return Where(**w)
    return Where(pos=w)  # a bare position spec


@dataclass(frozen=True)
class Op:
    site: str
    where: Where = field(default=ALL, kw_only=True)

    def __post_init__(self):
        object.__setattr__(self, "where", _where(self.where))

    def describe(self) -> str:
        return f"{type(self).__name__}({self.site!r})"


@dataclass(frozen=True, eq=False)
class Patch(Op):
    """Write `source` (an activation of this site from another run) at the selected places.

    source: [T, *F] or [B_src, T, *F] (B_src = 1 or the base batch size). alpha blends:
    (1 - alpha) * current + alpha * source; alpha = 1 is a plain overwrite.
    """

    source: torch.Tensor = None
    alpha: float = 1.0


@dataclass(frozen=True, eq=False)
class Add(Op):
    """h <- h + alpha * vector, or alpha * vector * ||h|| / ||vector|| with norm="relative".

    spatial (grid activations, e.g. UNet [N, C, H, W] or token grids [N, T, F]): None adds a
    feature vector at the selected positions; "average" adds a channel vector at every spatial
    location (channel axis 1 for 4-D and larger tensors, the last axis for [N, T, F]), norms per
    location; "keep" adds a vector of the item's full shape, norms per item. Spatial adds ignore pos.
    """

    vector: torch.Tensor = None
    alpha: float = 1.0
    norm: str | None = None
    renorm: bool = False
    spatial: str | None = None

    def __post_init__(self):
        super().__post_init__()
        if self.norm not in (None, "relative"):
            raise ValueError(f"Add.norm must be None or 'relative', not {self.norm!r}")
        if self.spatial not in (None, "average", "keep"):
            raise ValueError(f"Add.spatial must be None, 'average' or 'keep', not {self.spatial!r}")


@dataclass(frozen=True, eq=False)
class Ablate(Op):
    """Zero, mean or resample ablation. `values` holds the mean ([*F] or [T, *F]) or the resample pool ([B, T, *F])."""

    mode: str = "zero"
    values: torch.Tensor | None = None
    seed: int = 0

    def __post_init__(self):
        super().__post_init__()
        if self.mode not in ("zero", "mean", "resample"):
            raise ValueError(f"Ablate.mode must be 'zero', 'mean' or 'resample', not {self.mode!r}")


@dataclass(frozen=True, eq=False)
class Noise(Op):
    """Add seeded Gaussian noise N(0, std^2) at the selected places (reproducible from seed)."""

    std: float = 1.0
    seed: int = 0


@dataclass(frozen=True, eq=False)
class Project(Op):
    """x <- x - ((x - mu) @ R.T) @ L.T: a low-rank eraser (LEACE). `eraser` has L, R and mu (or pass them)."""

    eraser: Any = None

    def factors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        e = self.eraser
        if isinstance(e, dict):
            return e["L"], e["R"], e.get("mu")
        if isinstance(e, (tuple, list)):
            return (*e, None)[:3] if len(e) == 2 else tuple(e)
        return e.L, e.R, getattr(e, "mu", None)


@dataclass(frozen=True, eq=False)
class Replace(Op):
    """x_sel <- fn(x_sel) for the selected slice (shape [n_items, n_pos, *F])."""

    fn: Callable[[torch.Tensor], torch.Tensor] = None


__all__ = ["Op", "Patch", "Add", "Ablate", "Noise", "Project", "Replace", "Where", "Tokens", "Subject", "at", "ALL"]
