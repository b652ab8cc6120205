"""Causal mediation analysis (Vig et al. 2020) through interp's run_grid.

For a clean input x_c, a corrupted (intervened) input x_k, a metric m and mediators z:

    total effect       TE      = m(x_k) - m(x_c)
    natural indirect   NIE(z)  = m(x_c, z <- z(x_k)) - m(x_c)
    natural direct     NDE(z)  = m(x_k, z <- z(x_c)) - m(x_c)

A mediator is a site name ("blocks.3.mlp.out"), optionally with positions and heads
(`Mediator("blocks.3.attn.z", pos=-1, heads=[0, 2])`). All NIE rows run as one grid on x_c, all NDE
rows as one grid on x_k.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

import interp
from interp import Patch, Result, at

EFFECTS = ("TE", "NIE", "NDE")


@dataclass(frozen=True)
class Mediator:
    """A site and the part of it that mediates (positions / heads; None = all)."""

    site: str
    pos: Any = None
    heads: Any = None

    @property
    def label(self) -> str:
        extra = "".join(f" {k}={v}" for k, v in (("pos", self.pos), ("heads", self.heads)) if v is not None)
        return self.site + extra


def _mediator(m) -> Mediator:
    if isinstance(m, Mediator):
        return m
    if isinstance(m, str):
        return Mediator(m)
    if isinstance(m, (tuple, list)) and m and isinstance(m[0], str):
        return Mediator(*m)
    raise TypeError(f"a mediator is a site name, a (site, pos[, heads]) tuple or a Mediator, not {m!r}")


def _wide(t: torch.Tensor) -> torch.Tensor:
    """A metric's values in at least float32 (float64 stays float64: no precision is dropped)."""
    t = torch.as_tensor(t)
    return t if t.is_floating_point() and t.dtype.itemsize >= 4 else t.float()


def mediation(lm: interp.Instrumented, clean, corrupted, mediators: Sequence[Any],
              metric: Callable[[torch.Tensor], torch.Tensor], *, progress: bool = True, **grid_kw) -> Result:
    """TE, NIE and NDE per mediator: Result with axes (mediator, effect); values are means over
    the batch. attrs hold m(x_c) and m(x_k)."""
    meds = [_mediator(m) for m in mediators]
    if not meds:
        raise ValueError("mediation() needs at least one mediator site, e.g. ['blocks.3.mlp.out']")
    sites = sorted({m.site for m in meds})
    for s in sites:
        lm.site(s)  # unknown names fail here with the nearest matches
    with torch.no_grad():
        c = lm.run(clean, capture=sites, last_only=True)
        k = lm.run(corrupted, capture=sites, last_only=True)
    m_c = _wide(metric(c.logits))
    m_k = _wide(metric(k.logits))

    def rows(source):
        return [[Patch(m.site, source.cache[m.site], where=at(pos=m.pos, heads=m.heads))] for m in meds]
    nie = lm.run_grid(clean, rows(k), metric, progress=progress, desc="mediation NIE", **grid_kw)
    nde = lm.run_grid(corrupted, rows(c), metric, progress=progress, desc="mediation NDE", **grid_kw)
    base = m_c.mean()
    te = (m_k.mean() - base).expand(len(meds))
    nie_v, nde_v = (_wide(g.values).to(base.dtype).reshape(len(meds), -1).mean(1) for g in (nie, nde))
    vals = torch.stack([te, nie_v - base, nde_v - base], 1)
    return Result(vals, ("mediator", "effect"), {"mediator": [m.label for m in meds], "effect": list(EFFECTS)},
                  {"metric_clean": float(base), "metric_corrupted": float(m_k.mean()),
                   "metric": "effect on the metric", "method": "mediation (Vig et al. 2020)"})
