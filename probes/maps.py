"""Localisation maps: held-out probe accuracy at every (site, position) or (block, step) of a dataset.

`probe_map(ds, "country")` -> Result with axes (measure, layer|site, pos|step). Measures:
accuracy (stratified k-fold), control and selectivity (Hewitt & Liang, when control types are
given), group_accuracy (whole groups held out, when groups are given). `lm_probe_maps` collects
the activations of a model and of a randomly initialised copy and stacks both maps on a `model`
axis; `plot_maps` draws every (model, measure) panel into one PNG.
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

import interp
from interp import Result

from .baseline import random_copy
from .datasets import ActivationDataset, collect
from .linear import encode_labels, evaluate

_BLOCK = re.compile(r"^(?P<prefix>.*?)blocks\.(?P<i>\d+)\.(?P<kind>.+)$")


def row_axis(sites: Sequence[str]) -> tuple[str, list]:
    """('layer', [i...]) when the sites are one kind at several blocks, else ('site', names)."""
    ms = [_BLOCK.match(s) for s in sites]
    if all(ms) and len({(m["prefix"], m["kind"]) for m in ms}) == 1 and len({m["i"] for m in ms}) == len(ms):
        return "layer", [int(m["i"]) for m in ms]
    return "site", list(sites)


def _column(ds: ActivationDataset, spec, what: str) -> list | None:
    if spec is None:
        return None
    if isinstance(spec, str):
        if spec not in ds.labels:
            raise KeyError(f"{what} {spec!r} is not a label of this dataset; it has {list(ds.labels)}")
        return ds.labels[spec]
    if len(spec) != len(ds):
        raise ValueError(f"{what} has {len(spec)} entries for {len(ds)} examples")
    return list(spec)


def probe_map(ds: ActivationDataset, label: str | Sequence[Any], *, sites: Sequence[str] | None = None,
              kind: str = "ridge", lam=None, types: str | Sequence[Any] | None = None,
              groups: str | Sequence[Any] | None = None, k: int = 4, seed: int = 0, progress: bool = True) -> Result:
    """Probe `label` at every site x position (or step) of `ds`; see the module docstring for measures.

    types: control-task types (a label name or one value per example), e.g. the entity of each prompt.
    groups: hold out whole groups (label name or values), e.g. the landmark, so the probe must generalise.
    """
    values = _column(ds, label, "label")
    y, classes = encode_labels(values)
    if len(classes) < 2:
        raise ValueError(f"label {label!r} has a single class {classes}: a probe needs at least two")
    types, groups = _column(ds, types, "types"), _column(ds, groups, "groups")
    sites = list(sites or ds.sites)
    measures = ["accuracy"] + (["control", "selectivity"] if types is not None else []) + \
        (["group_accuracy"] if groups is not None else [])
    out = torch.zeros(len(measures), len(sites), len(ds.coords))
    chance = None
    bar = tqdm(total=len(sites) * len(ds.coords), desc=f"probe {label if isinstance(label, str) else ''}",
               disable=not progress, leave=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # many small solves: threads only add contention (20x slower on a busy machine)
    try:
        for i, site in enumerate(sites):
            for j, pos in enumerate(ds.coords):
                r = evaluate(ds.X(site, pos), y, kind=kind, lam=lam, types=types, groups=groups, k=k, seed=seed)
                chance = r["chance"]
                for m, name in enumerate(measures):
                    out[m, i, j] = r[name]
                bar.update(1)
    finally:
        torch.set_num_threads(threads)
        bar.close()
    ax, rows = row_axis(sites)
    return Result(out, ("measure", ax, ds.axis), {"measure": measures, ax: rows, ds.axis: [str(c) for c in ds.coords]},
                  {"label": label if isinstance(label, str) else "label", "classes": [str(c) for c in classes],
                   "chance": chance, "probe": kind,
                   "lam": lam if lam is not None else ("auto" if kind == "ridge" else 1e-3),
                   "folds": k, "n": len(ds), "metric": "held-out accuracy", "sites": sites})


def stack_models(maps: dict[str, Result]) -> Result:
    """Stack maps of the same layout on a leading `model` axis (e.g. trained vs random-init)."""
    names = list(maps)
    first = maps[names[0]]
    for n in names[1:]:
        if maps[n].axes != first.axes or maps[n].shape != first.shape:
            raise ValueError(
                f"map {n!r} has axes {maps[n].axes} {maps[n].shape}, {names[0]!r} has {first.axes} {first.shape}"
            )
    return Result(torch.stack([maps[n].values for n in names]), ("model", *first.axes),
                  {"model": names, **first.coords}, {**first.attrs, "models": names})


def lm_probe_maps(lm: interp.Instrumented, inputs: Sequence[Any], labels: dict[str, Sequence[Any]], label: str, *,
                  sites: str | Sequence[str] = "blocks.*.resid_post", positions=None, subjects=None,
                  types: str | None = None, groups: str | None = None, kind: str = "ridge", lam=None,
                  random_baseline: bool = True, seed: int = 0, batch_size: int = 16, path: str | None = None,
                  k: int = 4, progress: bool = True) -> tuple[Result, dict[str, ActivationDataset]]:
    """Collect activations of the model (and of a random-init copy) and probe `label` everywhere.

    Returns (Result with axes (model, measure, layer, pos), {model name: dataset}).
    """
    models = {"trained": lm}
    if random_baseline:
        models["random-init"] = interp.attach(random_copy(lm.model, seed), tokenizer=lm.tokenizer)
    maps, data = {}, {}
    for name, m in models.items():
        ds = collect(m, inputs, sites, labels=labels, positions=positions, subjects=subjects, batch_size=batch_size,
                     path=None if path is None else str(Path(path) / name), progress=progress,
                     meta={"model": name})
        data[name] = ds
        maps[name] = probe_map(ds, label, kind=kind, lam=lam, types=types, groups=groups, k=k, seed=seed,
                               progress=progress)
    return stack_models(maps), data


def _unet_blocks(pipe: interp.Instrumented) -> list[str]:
    names = pipe.site_names()
    blocks = [n for n in names if re.fullmatch(r"(unet\.(down|up)\.\d+|unet\.mid|transformer\.blocks\.\d+(\.img)?"
                                                r"|transformer\.single\.\d+)", n)]
    if not blocks:
        raise ValueError("no denoiser blocks found by default; pass denoiser_sites=[...] (see `interp sites`)")
    return blocks


def diffusion_probe_maps(pipe: interp.Instrumented, prompts: Sequence[str], labels: dict[str, Sequence[Any]],
                         label: str, *, subjects: Sequence[str] | None = None,
                         text_sites: str = "text_encoder.blocks.*.resid_post",
                         text_positions: dict | None = None, denoiser_sites: Sequence[str] | None = None,
                         steps: int = 10, guidance: float | None = None, seed: int = 0, types: str | None = None,
                         groups: str | None = None, kind: str = "ridge", random_baseline: bool = True,
                         batch_size: int = 16, path: str | None = None, k: int = 4,
                         progress: bool = True) -> tuple[Result, Result]:
    """Probe `label` in a diffusers pipeline, beside a random-init copy of its text encoder and denoiser.

    Returns (text map with axes (model, measure, layer, pos) over text-encoder layers x token
    positions -- by default the subject word and the end-of-text token --, denoiser map with axes
    (model, measure, site, step) over denoiser blocks x sampling steps, features averaged over space).
    """
    from .baseline import random_pipeline
    from .datasets import SubjectOf, denoiser_runner, text_encoder_runner

    pipe = interp.attach(pipe)
    text_positions = text_positions or ({"subject": SubjectOf("last"), "eos": "eos"} if subjects else {"eos": "eos"})
    tsites = [s.name for s in pipe.sites(text_sites)]
    dsites = list(denoiser_sites or _unet_blocks(pipe))
    models = {"trained": pipe}
    if random_baseline:
        models["random-init"] = interp.attach(random_pipeline(pipe.adapter.pipe, seed))
    tmaps, dmaps = {}, {}
    for name, m in models.items():
        sub = None if path is None else Path(path) / name
        tds = collect(None, prompts, tsites, labels=labels, batch_size=batch_size, coords=list(text_positions),
                      runner=text_encoder_runner(m, tsites, text_positions, subjects), progress=progress,
                      path=None if sub is None else sub / "text", meta={"model": name, "runner": "text"})
        dds = collect(None, prompts, dsites, labels=labels, batch_size=batch_size, coords=list(range(steps)),
                      axis="step", runner=denoiser_runner(m, dsites, steps, guidance=guidance, seed=seed),
                      progress=progress, path=None if sub is None else sub / "denoiser",
                      meta={"model": name, "runner": f"denoiser steps={steps} guidance={guidance} seed={seed}"})
        kw = dict(kind=kind, types=types, groups=groups, k=k, seed=seed, progress=progress)
        tmaps[name] = probe_map(tds, label, **kw)
        dmaps[name] = probe_map(dds, label, **kw)
    return stack_models(tmaps), stack_models(dmaps)


def plot_maps(res: Result, path: str | Path, title: str | None = None, measures: Sequence[str] | None = None) -> Path:
    """One PNG with a heatmap per (model, measure); accuracies share the 0..1 scale, chance marked in the title.
    Drawn on a Figure object (no pyplot: a notebook's backend is left alone), constrained layout, nothing clipped."""
    from matplotlib.figure import Figure

    if "model" not in res.axes:
        res = Result(res.values[None], ("model", *res.axes), {"model": ["model"], **res.coords}, res.attrs)
    models = res.coord("model")
    measures = list(measures or res.coord("measure"))
    row_ax, col_ax = res.axes[2], res.axes[3]
    rows, cols = res.coord(row_ax), res.coord(col_ax)
    fig = Figure(figsize=(1.2 + (0.45 * len(cols) + 1.6) * len(measures), 1.1 + (0.16 * len(rows) + 0.9) * len(models)),
                 layout="constrained")
    axes = fig.subplots(len(models), len(measures), squeeze=False)
    for a, model in enumerate(models):
        for b, meas in enumerate(measures):
            ax = axes[a][b]
            v = res.values[a, res.coord("measure").index(meas)].float().numpy()
            sel = meas == "selectivity"
            im = ax.imshow(v, aspect="auto", cmap="RdBu_r" if sel else "viridis",
                           vmin=-1 if sel else 0, vmax=1, interpolation="nearest")
            ax.set_xticks(range(len(cols)), [str(c) for c in cols], rotation=45, ha="right", fontsize=7)
            step = max(1, len(rows) // 15)
            ax.set_yticks(range(0, len(rows), step), [str(r) for r in rows[::step]], fontsize=7)
            ax.set_title(f"{model}: {meas}", fontsize=8)
            if b == 0:
                ax.set_ylabel(row_ax)
            fig.colorbar(im, ax=ax, fraction=0.046)
    chance = res.attrs.get("chance")
    fig.suptitle((title or f"probe map: {res.attrs.get('label', '')}") +
                 (f" (chance {chance:.2f})" if isinstance(chance, float) else ""), fontsize=9)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return path


def peak(res: Result, measure: str = "accuracy", model: str | None = None) -> tuple[dict, float]:
    """The (row, column) cell with the highest value of `measure` (for one model when stacked)."""
    r = res
    if "model" in r.axes:
        r = r.sel(model=model or r.coord("model")[0])
    return r.sel(measure=measure).top(1)[0]


__all__ = ["probe_map", "lm_probe_maps", "diffusion_probe_maps", "stack_models", "plot_maps", "peak", "row_axis"]
