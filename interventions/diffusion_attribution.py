"""Attribution over the denoising trajectory of a flow-matching MMDiT (SD3-style; e.g. the zoo's shapes-flow).

    from interventions.diffusion_attribution import FlowRun, colour_metric, attribute, when_curve
    clean = FlowRun(pipe, "a small red circle on the left, solid", seed=0, steps=12)
    corrupt = clean.with_prompt("a small blue circle on the left, solid")
    res = attribute(clean, corrupt, colour_metric("red"), windows=4)
    res["exact"], res["attribution"], res["ig"], res["correlation"]      # Results [cell, window]

The stock pipeline samples under ``torch.no_grad``, so gradients over the trajectory need a sampling loop of our
own: ``FlowRun`` runs the scheduler's Euler steps (the same timesteps and sigmas, the same classifier-free
guidance, the pipeline's seeded initial noise) and calls the denoiser through interp's engine once per step, with
the ops of that step; its images equal the pipeline's (tested).

A *cell* is a denoiser site (e.g. ``transformer.blocks.2.attn.img``) or a text token (``transformer.context_embed``
at one position) restricted to a step window. For each cell:

- exact: the corrupted run with the clean run's activations written back in the cell (both CFG rows), the metric
  normalised so that the corrupted run is 0 and the clean run is 1;
- attribution patching: sum over the window's steps of (a_clean - a_corrupted) . dm/da, the gradient taken once in
  the corrupted run (one backward pass through the whole trajectory for every cell at once);
- IG: the same product with the gradient averaged over ``ig_steps`` runs whose text conditioning is interpolated
  from the corrupted to the clean prompt (the token states and the pooled embedding, ``Patch(..., alpha)`` at
  every step).

``when_curve`` is the "when does it matter" curve of a concept: the metric when the clean conditioning is restored
(in the corrupted run) or the corrupted one written in (ablating the clean run) from step s to the end.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import torch

import interp
from interp import Patch, Replace, Result, at
from interp.errors import InterpError

__all__ = ["FlowRun", "colour_metric", "attribute", "when_curve", "correlation", "AttributionError"]


# the denoiser's text conditioning: the token states (encoder_hidden_states) and the time embedding, which is the
# timestep embedding (shared by clean and corrupted runs at a step) plus the pooled text embedding, so writing
# it restores (or, blended, interpolates) exactly the pooled text part
CONDITIONING = ("transformer.context", "transformer.time_embed")


class AttributionError(InterpError, ValueError):
    """A trajectory-attribution request that cannot be served."""


@dataclass
class FlowRun:
    """One text-to-image sampling run of an SD3-style flow pipeline, replayable step by step with ops."""

    pipe: object
    prompt: str
    seed: int = 0
    steps: int = 12
    guidance: float = 7.0
    _cache: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        tr = getattr(self.pipe, "transformer", None)
        if type(tr).__name__ != "SD3Transformer2DModel" or \
                type(self.pipe.scheduler).__name__ != "FlowMatchEulerDiscreteScheduler":
            raise AttributionError("FlowRun replays SD3-style flow pipelines (SD3Transformer2DModel with a "
                                   f"FlowMatchEulerDiscreteScheduler), not {type(self.pipe).__name__}")

    def with_prompt(self, prompt: str) -> FlowRun:
        return replace(self, prompt=prompt, _cache={})

    @property
    def lm(self) -> interp.Instrumented:
        return interp.attach(self.pipe.transformer)

    def conditioning(self) -> dict:
        """[uncond; cond] prompt embeddings and pooled embeddings, the initial noise, timesteps and sigmas."""
        if not self._cache:
            p = self.pipe
            with torch.no_grad():
                emb, neg, pooled, neg_pooled = p.encode_prompt(self.prompt, self.prompt, self.prompt, device="cpu",
                                                               do_classifier_free_guidance=True, negative_prompt="")
            cfg = p.transformer.config
            size = p.default_sample_size  # the pipeline's default height // vae_scale_factor
            x = torch.randn((1, cfg.in_channels, size, size), generator=torch.Generator("cpu").manual_seed(self.seed))
            sched = type(p.scheduler).from_config(p.scheduler.config)
            sched.set_timesteps(self.steps)
            self._cache.update(emb=torch.cat([neg, emb]), pooled=torch.cat([neg_pooled, pooled]), x=x,
                               timesteps=sched.timesteps.clone(), sigmas=sched.sigmas.clone())
        return self._cache

    def run(self, ops_at: Callable[[int], Sequence] | None = None, capture: Sequence[str] = (), grad: bool = False):
        """Sample with ``ops_at(step)`` applied at each step; returns (final latents [1, C, H, W] in [-1, 1],
        {site: [steps, 2, ...]} captured activations)."""
        c = self.conditioning()
        x, lm, caps = c["x"], self.lm, {s: [] for s in capture}
        for k, t in enumerate(c["timesteps"]):
            inputs = {"hidden_states": torch.cat([x, x]), "timestep": t.expand(2), "encoder_hidden_states": c["emb"],
                      "pooled_projections": c["pooled"]}
            out = lm.run(inputs, ops=list(ops_at(k)) if ops_at else [], capture=list(capture), grad=grad)
            v_u, v_c = out.output.chunk(2)
            v = v_u + self.guidance * (v_c - v_u)
            x = x + (c["sigmas"][k + 1] - c["sigmas"][k]) * v.float()
            for s in capture:
                caps[s].append(out.cache[s])
        return x, {s: torch.stack(v) for s, v in caps.items()}


def colour_metric(colour: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """Differentiable colour score of latents in [-1, 1]: the mean over pixels of the image's projection on the
    colour's direction away from grey (red: R - (G + B) / 2)."""
    from interp.zoo import shapes as S

    if colour not in S.COLOURS:
        raise AttributionError(f"unknown colour {colour!r}; choose one of {list(S.COLOURS)}")
    rgb = torch.tensor(S.COLOURS[colour])
    w = rgb - rgb.mean()

    def metric(x: torch.Tensor) -> torch.Tensor:
        img = ((x + 1) / 2).clamp(0, 1)
        return (img * w.view(1, 3, 1, 1)).sum(1).mean((-1, -2)).squeeze(0)

    metric.__name__ = f"colour_score[{colour}]"
    return metric


def _windows(n: int, windows) -> list[tuple[int, int]]:
    if isinstance(windows, int):
        edges = [round(i * n / windows) for i in range(windows + 1)]
        return [(a, b) for a, b in zip(edges, edges[1:]) if b > a]
    out = [tuple(w) for w in windows]
    if not out or any(not 0 <= a < b <= n for a, b in out):
        raise AttributionError(f"step windows {windows!r} must be (start, stop) pairs within 0..{n}")
    return out


def _cells(clean: FlowRun, sites: Sequence[str] | None, tokens: Sequence[int] | None) -> list[tuple[str, int | None]]:
    if sites is None:
        n = len(clean.pipe.transformer.transformer_blocks)
        sites = [f"transformer.blocks.{i}.{k}.img" for i in range(n) for k in ("attn", "ff")]
    table = clean.lm.adapter.site_table()
    for s in sites:
        table.get(s)  # raises UnknownSiteError with suggestions
    toks = list(tokens) if tokens is not None else []
    return [(s, None) for s in sites] + [("transformer.context_embed", p) for p in toks]


def _patch_ops(cells, clean_acts: dict, step: int, alpha: float = 1.0) -> list:
    ops = []
    for site, pos in cells:
        src = clean_acts[site][step]
        ops.append(Patch(site, src, alpha=alpha, where=at(pos=[pos]) if pos is not None else at()))
    return ops


def _as_source(t: torch.Tensor) -> torch.Tensor:
    """A captured [batch, d] vector site as a [batch, 1, d] patch source (the engine's one-position view)."""
    return t[:, None] if t.dim() == 2 else t


def _cell_label(cell) -> str:
    site, pos = cell
    return site.replace("transformer.", "") if pos is None else f"token {pos}"


def attribute(clean: FlowRun, corrupted: FlowRun, metric: Callable[[torch.Tensor], torch.Tensor], *,
              sites: Sequence[str] | None = None, tokens: Sequence[int] | None = None, windows=4,
              ig_steps: int = 4) -> dict:
    """Exact patching, attribution patching and IG over (cell x step window); see the module docstring."""
    if (clean.seed, clean.steps, clean.guidance) != (corrupted.seed, corrupted.steps, corrupted.guidance):
        raise AttributionError("clean and corrupted runs must share seed, steps and guidance (only the prompt differs)")
    cells = _cells(clean, sites, tokens)
    names = sorted({s for s, _ in cells})
    wins = _windows(clean.steps, windows)
    with torch.no_grad():
        x_clean, a_clean = clean.run(capture=[*names, *CONDITIONING])
        x_corr, a_corr = corrupted.run(capture=names)
    m_clean, m_corr = float(metric(x_clean)), float(metric(x_corr))
    if abs(m_clean - m_corr) < 1e-9:
        raise AttributionError("the metric is the same on the clean and corrupted runs; the effect is undefined")
    scale = m_clean - m_corr
    exact = torch.zeros(len(cells), len(wins))
    with torch.no_grad():
        for i, cell in enumerate(cells):
            for j, (a, b) in enumerate(wins):
                x, _ = corrupted.run(lambda k, c=cell, a=a, b=b: _patch_ops([c], a_clean, k) if a <= k < b else [])
                exact[i, j] = (float(metric(x)) - m_corr) / scale
    grads = _trajectory_grads(corrupted, names, metric, a_clean, None)
    ig = [_trajectory_grads(corrupted, names, metric, a_clean, (q + 0.5) / ig_steps) for q in range(ig_steps)]
    ig_grads = {s: torch.stack([g[s] for g in ig]).mean(0) for s in names}
    est = {"attribution": _estimate(cells, wins, a_clean, a_corr, grads) / scale,
           "ig": _estimate(cells, wins, a_clean, a_corr, ig_grads) / scale}
    coords = {"cell": [_cell_label(c) for c in cells], "window": [f"{a}-{b - 1}" for a, b in wins]}
    attrs = {"clean": clean.prompt, "corrupted": corrupted.prompt, "metric": getattr(metric, "__name__", "metric"),
             "clean_metric": m_clean, "corrupted_metric": m_corr, "steps": clean.steps, "guidance": clean.guidance,
             "seed": clean.seed, "ig_steps": ig_steps}
    out = {"exact": Result(exact, ("cell", "window"), coords, {**attrs, "method": "exact patching"})}
    for k, v in est.items():
        out[k] = Result(v, ("cell", "window"), coords, {**attrs, "method": k})
    out["correlation"] = {k: correlation(out["exact"], out[k]) for k in est}
    return out


def _trajectory_grads(run: FlowRun, names: list[str], metric, a_clean: dict, alpha: float | None) -> dict:
    """dm/da at every site and step of `run` (zero-delta probes; with alpha, the context is interpolated to
    the clean run's by that fraction at every step)."""
    n = run.steps
    deltas = {s: [None] * n for s in names}

    def ops_at(k):
        ops = []
        if alpha is not None:
            ops += [Patch(c, _as_source(a_clean[c][k]), alpha=alpha) for c in CONDITIONING]
        for s in names:
            d = torch.zeros_like(a_clean[s][k], requires_grad=True)
            deltas[s][k] = d
            ops.append(Replace(s, fn=lambda sel, d=d: sel + d.to(sel.dtype)))
        return ops

    x, _ = run.run(ops_at, grad=True)
    leaves = [d for s in names for d in deltas[s]]
    g = torch.autograd.grad(metric(x), leaves, allow_unused=True)
    out, it = {}, iter(g)
    for s in names:
        out[s] = torch.stack([(gg if gg is not None else torch.zeros_like(d)) for gg, d in zip(
            [next(it) for _ in range(n)], deltas[s])])
    return out


def _estimate(cells, wins, a_clean: dict, a_corr: dict, grads: dict) -> torch.Tensor:
    est = torch.zeros(len(cells), len(wins))
    for i, (site, pos) in enumerate(cells):
        prod = (a_clean[site].float() - a_corr[site].float()) * grads[site].float()  # [steps, 2, T, F]
        per_step = prod[:, :, pos].sum((1, -1)) if pos is not None else prod.flatten(1).sum(1)
        for j, (a, b) in enumerate(wins):
            est[i, j] = per_step[a:b].sum()
    return est


def correlation(a: Result, b: Result) -> float:
    """Pearson correlation of two results' values."""
    x, y = a.values.float().flatten(), b.values.float().flatten()
    x, y = x - x.mean(), y - y.mean()
    return float((x * y).sum() / (x.norm() * y.norm()).clamp_min(1e-12))


def when_curve(clean: FlowRun, corrupted: FlowRun, metric: Callable[[torch.Tensor], torch.Tensor]) -> Result:
    """Normalised metric [mode, start] when the text conditioning (token states and pooled embedding) is switched
    from step `start` to the end:
    mode "restore" writes the clean conditioning into the corrupted run, "ablate" the corrupted conditioning
    into the clean run (0 = corrupted run's metric, 1 = clean run's)."""
    with torch.no_grad():
        x_clean, a_clean = clean.run(capture=list(CONDITIONING))
        x_corr, a_corr = corrupted.run(capture=list(CONDITIONING))
        m_clean, m_corr = float(metric(x_clean)), float(metric(x_corr))
        if abs(m_clean - m_corr) < 1e-9:
            raise AttributionError("the metric is the same on the clean and corrupted runs; the curve is undefined")
        n = clean.steps
        vals = torch.zeros(2, n + 1)
        for s in range(n + 1):
            for r, (base, src) in enumerate(((corrupted, a_clean), (clean, a_corr))):
                x, _ = base.run(lambda k, s=s, src=src: [Patch(c, _as_source(src[c][k])) for c in CONDITIONING]
                                if k >= s else [])
                vals[r, s] = (float(metric(x)) - m_corr) / (m_clean - m_corr)
    return Result(vals, ("mode", "start"), {"mode": ["restore", "ablate"], "start": list(range(n + 1))},
                  {"clean": clean.prompt, "corrupted": corrupted.prompt, "metric": getattr(metric, "__name__", ""),
                   "steps": n, "guidance": clean.guidance, "seed": clean.seed,
                   "title": f"when does it matter: {clean.prompt!r} vs {corrupted.prompt!r}"})
