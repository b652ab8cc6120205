"""Activation patching sweeps on top of interp's run_grid.

Denoising (default): run the corrupted input and write in the clean activation at one site and
position per row; noising: run the clean input and write in the corrupted activation. The effect
is normalised so that 0 = the base run's metric and 1 = the other run's metric.
"""
from __future__ import annotations

from typing import Callable

import torch

import interp
from interp import Patch, Result, at
from interp.metrics import normalized


def _runs(lm: interp.Instrumented, clean, corrupted, direction: str):
    if direction not in ("denoise", "noise"):
        raise ValueError(f"direction must be 'denoise' or 'noise', not {direction!r}")
    return (clean, corrupted) if direction == "denoise" else (corrupted, clean)


def patch_sweep(lm: interp.Instrumented, clean, corrupted, kind: str = "resid_pre",
                metric: Callable[[torch.Tensor], torch.Tensor] | None = None, *, direction: str = "denoise",
                layers=None, positions=None, normalize: bool = True, progress: bool = True, **grid_kw) -> Result:
    """Patch `blocks.{l}.{kind}` at every (layer, position): Result with axes (layer, pos).

    metric maps logits [batch, pos, vocab] to one value per item; the result holds the mean over
    the base batch of the (normalised) metric after each patch.
    """
    source_input, base_input = _runs(lm, clean, corrupted, direction)
    layers = list(range(lm.n_layers)) if layers is None else list(layers)
    sites = [f"blocks.{l}.{kind}" for l in layers]
    source = lm.run(source_input, capture=sites, last_only=True)
    T = source.cache[sites[0]].shape[1]
    positions = list(range(T)) if positions is None else lm.positions(source_input, positions)
    metric = metric or (lambda logits: logits[:, -1].float().max(-1).values)
    rows = [[Patch(s, source.cache[s], where=at(pos=p))] for s in sites for p in positions]
    grid = lm.run_grid(base_input, rows, metric, progress=progress, desc=f"patch {kind}", **grid_kw)
    source_metric = metric(source.logits).float().mean()
    base_metric = grid.base.float().mean()
    vals = grid.values.float().mean(1).reshape(len(layers), len(positions))
    if normalize:
        vals = normalized(vals, source_metric, base_metric)
    tokens = grid.tokens[0] if grid.tokens else [str(p) for p in range(T)]
    clean_m, corrupt_m = (source_metric, base_metric) if direction == "denoise" else (base_metric, source_metric)
    return Result(vals, ("layer", "pos"), {"layer": layers, "pos": [f"{p}:{tokens[p]}" for p in positions]},
                  {"kind": kind, "direction": direction, "normalized": normalize, "clean_metric": float(clean_m),
                   "corrupted_metric": float(corrupt_m), "metric": "normalised effect" if normalize else "metric",
                   "grid": grid.stats})
