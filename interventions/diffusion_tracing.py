"""Causal tracing in text-to-image pipelines, after Diff-QuickFix (Basu et al., ICLR 2024).

Three kinds of run share their latent noise (one seeded generator per image):
  clean      the caption as written;
  corrupted  Gaussian noise (std = noise x the std of each text encoder's token-embedding matrix) on
             the word embeddings of the attribute's tokens (e.g. "red"), prompt rows only, one noise
             draw per image;
  restored   corrupted, with one state copied back from the clean run:
             (a) a text-encoder state (layer x token, kinds resid_post / attn.out / mlp.out), or
             (b) a denoiser component (ResNet, self-attn, cross-attn; DiT attention / MLP per stream) at
                 every denoising step or inside a step window, both CFG branches.
All restored variants run as rows of one batched sampling loop per chunk (interp.diffusion.sample_grid).
Effect of a restoration = (m_restored - m_corrupted) / (m_clean - m_corrupted): 1 = the clean behaviour
is back, 0 = no better than corrupted. Metrics: the denoiser-output distance to the clean run
("pred", cheap, needs no scorer), an attribute scorer on the images (the zoo's scorers), or CLIP score
with a user-supplied CLIP model.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

import interp
from interp import Noise, Patch, Result, Subject, at, image_grid
from interp.diffusion import (
    Recording,
    SampleOutput,
    Sampling,
    clip_score,
    image_metric,
    pred_distance,
    prompt_positions,
    record,
    restore,
    sample_grid,
)

UNET_KINDS = ("resnet", "self.out", "cross.out")
DIT_KINDS = ("attn.img", "attn.txt", "ff.img", "ff.txt", "single.img")
TEXT_KINDS = ("resid_post",)


def embedding_stds(lm: interp.Instrumented) -> dict[str, float]:
    """Per text encoder: std of its token-embedding matrix (sigma of the 3-sigma corruption)."""
    out = {}
    for c in lm.adapter.text_components:
        emb = lm.adapter.root.get_submodule(lm.site(f"{c}.embed").module)
        out[c] = float(emb.weight.detach().float().std())
    return out


def corruption(lm: interp.Instrumented, attribute: str, noise: float = 3.0, seed: int = 0) -> list[Noise]:
    """Noise ops on every text encoder's word embeddings of `attribute` (prompt rows only)."""
    return [
        Noise(f"{c}.embed", std=noise * s, seed=seed + 101 * k, where=at(pos=Subject(attribute, "all"), branch="cond"))
        for k, (c, s) in enumerate(embedding_stds(lm).items())
    ]


def attribute_metric(attribute: str, value: str) -> Callable[[SampleOutput], torch.Tensor]:
    """1 where the zoo scorer reads `value` for `attribute` (colour, shape, position, size, texture), else 0."""
    from interp.zoo import scorers

    if attribute not in scorers.SCORERS:
        raise ValueError(f"unknown attribute {attribute!r}; the zoo scores {sorted(scorers.SCORERS)}")
    fn = scorers.SCORERS[attribute]
    return image_metric(lambda imgs: [float(v == value) for v in fn(imgs)])


def hue_metric(colour: str) -> Callable[[SampleOutput], torch.Tensor]:
    """cos(mean hue inside the shape - the hue of `colour`) per image (zoo scorer `hue`): 1 = exactly that
    hue, -1 = the opposite hue, 0 where no coloured shape is found. Continuous, unlike a label match."""
    import math

    from interp.zoo import scorers, shapes

    if colour not in shapes.HUES:
        raise ValueError(f"unknown colour {colour!r}; the zoo's colours are {sorted(shapes.HUES)}")
    target = math.radians(shapes.HUES[colour])

    def score(imgs):
        h = torch.as_tensor(scorers.hue(imgs), dtype=torch.float32)
        c = torch.cos(torch.deg2rad(h) - target)
        return torch.nan_to_num(c, nan=0.0)
    return image_metric(score)


def denoiser_components(lm: interp.Instrumented, kinds: Sequence[str] | None = None) -> list[str]:
    den = lm.adapter.denoiser
    kinds = tuple(kinds) if kinds is not None else (UNET_KINDS if den == "unet" else DIT_KINDS)
    return [s.name for s in lm.sites(f"{den}.*") if s.kind in kinds]


def step_windows(n_steps: int, windows) -> list[tuple[int, int]]:
    """'steps' -> each single step; an int k -> k equal windows; or explicit (start, stop) pairs. 'all' first."""
    if windows == "steps":
        ws = [(s, s + 1) for s in range(n_steps)]
    elif isinstance(windows, int):
        edges = [round(i * n_steps / windows) for i in range(windows + 1)]
        ws = [(a, b) for a, b in zip(edges, edges[1:]) if b > a]
    else:
        ws = [tuple(w) for w in windows]
    return [(0, n_steps)] + [w for w in ws if w != (0, n_steps)]


def _label(w: tuple[int, int], n: int) -> str:
    return "all" if w == (0, n) else (str(w[0]) if w[1] == w[0] + 1 else f"{w[0]}-{w[1] - 1}")


@dataclass
class DiffusionTrace:
    """Normalised restoration effects: `text[f"{component}.{kind}"]` (layer x token) and `denoiser`
    (component x step window); images of the clean, corrupted and best restored runs."""

    text: dict[str, Result]
    denoiser: Result | None
    clean_metric: float
    corrupted_metric: float
    images: dict[str, torch.Tensor] = field(default_factory=dict)
    stats: dict = field(default_factory=dict)

    def top(self, k: int = 5) -> list[tuple[str, dict, float]]:
        """The k largest effects over all maps: (map name, cell, effect)."""
        cells = [(name, w, v) for name, r in {**self.text, "denoiser": self.denoiser}.items() if r is not None
                 for w, v in r.top(k)]
        return sorted(cells, key=lambda c: -c[2])[:k]

    def save(self, folder: str | Path, prefix: str = "trace") -> dict[str, Path]:
        """Results as JSON + safetensors, heatmaps and the image grid as PNG; returns the paths."""
        folder = Path(folder)
        out = {}
        for name, r in {**{f"text.{k}": v for k, v in self.text.items()}, "denoiser": self.denoiser}.items():
            if r is None:
                continue
            stem = f"{prefix}_{name}".replace(".", "_")
            out[name] = r.save(folder / stem)
            out[f"{name}.png"] = r.plot(folder / f"{stem}.png", title=r.attrs.get("title"))
        if self.images:
            imgs = torch.cat(list(self.images.values()))
            labels = [k for k, v in self.images.items() for _ in range(v.shape[0])]
            out["images.png"] = image_grid(imgs, folder / f"{prefix}_images.png", labels=labels,
                                           ncol=max(v.shape[0] for v in self.images.values()))
        return out


def _text_rows(lm, rec: Recording, kinds, layers, tokens) -> tuple[list, list]:
    rows, cells = [], []
    for c in lm.adapter.text_components:
        n_layers = len([s for s in lm.sites(f"{c}.blocks.*.resid_post")])
        for kind in kinds:
            for layer in (range(n_layers) if layers is None else layers):
                site = f"{c}.blocks.{layer}.{kind}"
                src = rec.get(site, None, "cond")
                for t in tokens[c]:
                    rows.append([Patch(site, src, where=at(pos=t, branch="cond"))])
                    cells.append((f"{c}.{kind}", layer, t))
    return rows, cells


def trace_diffusion(model, prompt: str, attribute: str, *, samples: int = 4, seed: int = 0, steps: int | None = None,
                    guidance: float | None = None, noise: float = 3.0, metric: str | Callable = "pred",
                    text_kinds: Sequence[str] = TEXT_KINDS, text_layers: Sequence[int] | None = None,
                    components: Sequence[str] | None = None, windows="steps", text: bool = True,
                    denoiser: bool = True, options: dict | None = None, memory_budget: int = 1 << 30,
                    keep_images: int = 3, progress: bool = True) -> DiffusionTrace:
    """Diff-QuickFix-style causal tracing of `attribute` (words of `prompt`) in a diffusers pipeline.

    samples: images per run (seeds seed..seed+samples-1, one embedding-noise draw each);
    metric: "pred" (denoiser-output distance to the clean run), a callable SampleOutput -> [N] (higher =
    more like clean; e.g. attribute_metric("colour", "red") or interp.diffusion.clip_score(...)).
    text_kinds: text-encoder states to restore per layer x token (resid_post, attn.out, mlp.out);
    components: denoiser sites (default: ResNets, self- and cross-attention outputs; DiT attention / MLP
    per stream); windows: "steps" (each step), k (k windows) or (start, stop) pairs, plus all steps.
    """
    lm = interp.attach(model)
    spec = Sampling([prompt] * samples, seed=seed, steps=steps, guidance=guidance, options=dict(options or {}))
    n_steps = lm.adapter.n_steps(spec)
    prepared = lm.adapter.prepare(spec)
    comps = list(components) if components is not None else denoiser_components(lm)
    text_sites = [f"{c}.blocks.*.{k}" for c in lm.adapter.text_components for k in text_kinds] if text else []
    rec = record(lm, spec, [*text_sites, *(comps if denoiser else [])])
    clean_out = rec.output
    shared = corruption(lm, attribute, noise, seed)

    if metric == "pred":
        raw = pred_distance(clean_out)
        m = lambda o: -raw(o)  # noqa: E731  (higher = closer to clean)
        name = "-denoiser distance"
    elif callable(metric):
        m, name = metric, getattr(metric, "__name__", "metric")
    else:
        raise ValueError(f"metric must be 'pred' or a callable SampleOutput -> [N], not {metric!r}")

    tokens = {c: prompt_positions(prepared.views[c][0]) for c in lm.adapter.text_components}
    rows, cells = _text_rows(lm, rec, text_kinds, text_layers, tokens) if text else ([], [])
    ws = step_windows(n_steps, windows)
    if denoiser:
        for comp in comps:
            for w in ws:
                rows.append(restore(comp, rec, steps=w))
                cells.append(("denoiser", comp, w))
    clean_m = float(m(clean_out).float().mean())
    corrupted = lm.run(spec, ops=shared).output  # checked before the grid: a corruption without effect stops here
    if abs(clean_m - float(m(corrupted).float().mean())) < 1e-9:
        raise ValueError(f"the corruption did not change the metric (clean = corrupted = {clean_m:.4g} over "
                         f"{samples} images); raise noise= (now {noise}), use more samples or a continuous metric, "
                         "or pick attribute words that the prompt depends on")
    grid = sample_grid(lm, spec, rows, m, shared=shared, memory_budget=memory_budget, progress=progress,
                       desc="diffusion trace")
    corrupt_m = float(grid.base.float().mean())
    denom = clean_m - corrupt_m
    eff = ((grid.values.float().mean(1) - corrupt_m) / denom).reshape(len(rows))
    attrs = {"prompt": prompt, "attribute": attribute, "metric": f"normalised effect ({name})", "noise": noise,
             "samples": samples, "steps": n_steps, "clean_metric": clean_m, "corrupted_metric": corrupt_m}
    text_res: dict[str, Result] = {}
    for key in dict.fromkeys(c[0] for c in cells if c[0] != "denoiser"):
        comp = key.split(".", 1)[0]
        layers = sorted({c[1] for c in cells if c[0] == key})
        toks = tokens[comp]
        v = torch.zeros(len(layers), len(toks))
        for i, c in enumerate(cells):
            if c[0] == key:
                v[layers.index(c[1]), toks.index(c[2])] = eff[i]
        words = prepared.views[comp][0]
        text_res[key] = Result(
            v,
            ("layer", "token"),
            {"layer": layers, "token": [f"{t}:{words[t].strip()}" for t in toks]},
            {**attrs, "title": f"restore {key} (layer x token): {prompt!r}, corrupt {attribute!r}"},
        )
    den_res = None
    if denoiser:
        v = torch.zeros(len(comps), len(ws))
        for i, c in enumerate(cells):
            if c[0] == "denoiser":
                v[comps.index(c[1]), ws.index(c[2])] = eff[i]
        den_res = Result(v, ("component", "steps"), {"component": comps, "steps": [_label(w, n_steps) for w in ws]},
                         {**attrs, "title": f"restore denoiser component x steps: {prompt!r}, corrupt {attribute!r}"})
    trace = DiffusionTrace(text_res, den_res, clean_m, corrupt_m, stats={**grid.stats, "cells": len(rows)})
    if keep_images:
        trace.images["clean"] = clean_out.images[:keep_images]
        trace.images["corrupted"] = corrupted.images[:keep_images]
        best = int(eff.argmax())
        trace.images[f"restored best ({_cell_label(cells[best], n_steps)})"] = \
            lm.run(spec, ops=[*shared, *rows[best]]).output.images[:keep_images]
    return trace


def _cell_label(cell, n_steps: int) -> str:
    if cell[0] == "denoiser":
        return f"{cell[1]} @ {_label(cell[2], n_steps)}"
    return f"{cell[0]} L{cell[1]} t{cell[2]}"


__all__ = ["trace_diffusion", "DiffusionTrace", "corruption", "attribute_metric", "hue_metric", "embedding_stds",
           "denoiser_components", "step_windows", "clip_score"]
