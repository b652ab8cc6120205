"""Step-aware runs on diffusers pipelines.

    import interp
    from interp.diffusion import Sampling, record, restore, sample_grid, pred_distance

    pipe_lm = interp.attach(pipe)                                  # any diffusers text-to-image pipeline
    spec = Sampling("a red circle", seed=0, steps=10, guidance=4.0)
    clean = record(pipe_lm, spec, ["unet.mid", "text_encoder.blocks.0.attn.out"])
    ops = restore("unet.mid", clean, steps=(0, 3))                 # clean mid block, steps 0-2, both CFG rows
    out = pipe_lm.run(spec, ops=[interp.Add("unet.mid", v, where=interp.at(steps=(3, 6), branch="cond"))])

A pipeline run calls the pipeline once, unchanged; the adapter (interp.adapters.pipeline) tells the
hooks the denoising step and the classifier-free-guidance rows of every call. `where=at(steps=...)`
restricts an op to steps (a (start, stop) window or a list), `branch="cond"|"uncond"|"both"` to CFG
rows, `stream="img"|"txt"` to one stream of a joint-attention block. Each image has its own seeded
generator, so clean, corrupted and restored runs and all rows of a grid share their noise.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .adapters.pipeline import PipelineAdapter, PipelinePrepared, SampleOutput, Sampling
from .adapters.unet import BATCHED
from .attach import Instrumented, attach
from .engine import GridOutput, RunOutput
from .errors import InterpError, PositionError
from .ops import Ablate, Op, Patch, Steps, at
from .results import Result

__all__ = ["Sampling", "SampleOutput", "Recording", "sample", "record", "restore", "sample_grid", "item_bytes",
           "pred_distance", "latent_distance", "image_metric", "clip_score", "token_influence", "prompt_positions"]


def _pipeline(model) -> tuple[Instrumented, PipelineAdapter]:
    lm = attach(model)
    if not isinstance(lm.adapter, PipelineAdapter):
        raise InterpError(f"interp.diffusion works on diffusers pipelines; {lm.adapter.describe()} is not one "
                          "(attach the pipeline, not one of its components)")
    return lm, lm.adapter


def sample(model, spec: Sampling | str, ops: Sequence[Op] = (), capture: Sequence[str] | str = (), **kw) -> RunOutput:
    """One sampling run with `ops` applied; `out.output` is a SampleOutput (images, latents, predictions)."""
    return _pipeline(model)[0].run(spec, ops, capture, **kw)


# ---------------------------------------------------------------------------------------------
# recording a run per step and branch
# ---------------------------------------------------------------------------------------------

@dataclass
class Recording:
    """Activations of one run, addressable by site, step and CFG branch."""

    run: RunOutput
    sites: dict  # name -> Site

    @property
    def output(self) -> SampleOutput:
        return self.run.output

    def calls(self, site: str) -> list[tuple[dict, torch.Tensor]]:
        """(call record, tensor of that call) for every call of the site's component."""
        s = self.sites[site]
        comp = s.meta.get("component", "")
        log = self.output.calls.get(comp, [])
        t = self.run.cache[site]
        if self.run.cache.axes.get(site, ())[:1] != ("call",):
            t = t[None]
        if t.shape[0] != len(log):
            raise InterpError(f"{site!r} fired {t.shape[0]} times but {comp!r} was called {len(log)} times; "
                              "a module called several times per step cannot be recorded per step")
        return list(zip(log, t))

    def steps(self, site: str) -> list[int]:
        return sorted({c["step"] for c, _ in self.calls(site) if c["step"] is not None})

    def get(self, site: str, step: int | None = None, branch: str = "cond") -> torch.Tensor:
        """The site's tensor at `step` (None for text encoders) for the rows of `branch` ([n_images, ...])."""
        for c, t in self.calls(site):
            if c["step"] == step and branch in c["branches"]:
                rows = c["branches"][branch]
                return t[rows[0]:rows[-1] + 1]
        have = sorted({(c["step"], b) for c, _ in self.calls(site) for b in c["branches"]}, key=str)
        raise PositionError(f"{site!r} has no record at step={step!r}, branch={branch!r}; recorded (step, branch) "
                            f"pairs: {have}")


def record(model, spec: Sampling | str, sites: Sequence[str] | str, ops: Sequence[Op] = (), **kw) -> Recording:
    """Run once and keep `sites` (names or wildcards) per step and branch."""
    lm, ad = _pipeline(model)
    out = lm.run(spec, ops, sites, **kw)
    table = ad.site_table()
    names = [sites] if isinstance(sites, str) else list(sites)
    found = {s.name: s for p in names for s in table.resolve(p)}
    return Recording(out, found)


def _step_set(steps, n: int, site: str) -> list[int]:
    """A step spec (None = every step, ints, a (start, stop) window or Steps) -> the run's step indices."""
    got = Steps.of(steps)
    return list(range(n)) if got is None else got.indices(n, site)


def restore(site: str, rec: Recording, steps=None, branch: str = "both", pos=None, alpha: float = 1.0) -> list[Patch]:
    """Ops that write the recorded run's values of `site` back, at every step in `steps` (None: all;
    (start, stop): a window; or a list) and for the CFG rows of `branch`. Text-encoder sites are
    restored once (their prompt call for branch="cond", negative-prompt call for "uncond")."""
    if site not in rec.sites:
        raise InterpError(f"{site!r} was not recorded; record it first (recorded: {sorted(rec.sites)[:8]}...)")
    names = ("uncond", "cond") if branch == "both" else (branch,)
    calls = rec.calls(site)
    ops: list[Patch] = []
    if calls and calls[0][0]["step"] is None:  # text encoder: no steps
        if steps is not None:
            raise PositionError(f"{site!r} runs once, before the denoising loop; steps= applies to denoiser sites")
        for c, t in calls:
            for b in names:
                if b in c["branches"]:
                    ops.append(Patch(site, t, where=at(pos=pos, branch=b), alpha=alpha))
        return ops
    want = set(_step_set(steps, rec.output.n_steps, site))
    for c, t in calls:
        if c["step"] not in want:
            continue
        for b in names:
            if b in c["branches"]:
                rows = c["branches"][b]
                ops.append(Patch(site, t[rows[0]:rows[-1] + 1], where=at(pos=pos, steps=[c["step"]], branch=b),
                                 alpha=alpha))
    if not ops:
        raise PositionError(f"nothing to restore at {site!r} for steps={steps!r}, branch={branch!r}")
    return ops


# ---------------------------------------------------------------------------------------------
# many variants in one sampling loop
# ---------------------------------------------------------------------------------------------

def item_bytes(model, spec: Sampling) -> int:
    """Estimated working memory of one image in one denoiser call (all rows' activations), measured once
    per pipeline from a 1-step run of one image."""
    lm, ad = _pipeline(model)
    key = (spec.height, spec.width, tuple(sorted(spec.options.items())))
    cache = ad.__dict__.setdefault("_item_bytes", {})
    if key not in cache:
        probe = spec.replace(prompt=spec.prompts()[:1], seed=spec.seeds()[:1], steps=1)
        den = f"{ad.denoiser}.*"
        out = lm.run(probe, capture=den)
        rows = out.output.pred.shape[1] * (2 if out.output.pred_uncond is not None else 1)
        cache[key] = int(out.cache.memory_bytes / max(1, rows)) * 2  # x2: temporaries inside attention / convs
    return cache[key]


def first_step(ops: Sequence[Op], n_steps: int) -> int:
    """The first denoising step at which any of `ops` can act: 0 for an op without a step selection (or on a
    component that runs before the loop), n_steps for no ops (the row is the base run)."""
    firsts = [n_steps]
    for op in ops:
        steps = Steps.of(op.where.steps)  # already a Steps (Where normalises it)
        firsts.append(0 if steps is None else steps.first())
    return min(firsts)


def sample_grid(model, spec: Sampling | str, rows: Sequence[Sequence[Op]],
                metric: Callable[[SampleOutput], torch.Tensor], *, shared: Sequence[Op] = (),
                memory_budget: int = 1 << 30, chunk_rows: int | None = None,
                progress: bool = True, desc: str = "interp diffusion grid", reuse_steps: bool = True) -> GridOutput:
    """Many variants of one sampling request in one sampling loop per chunk: row r's ops edit only its
    own images; `shared` ops apply to every row and to the base run. Chunks fit `memory_budget`.
    metric(SampleOutput) -> one value per image. Returns values [n_rows, n_images, ...] and the base.

    Step-prefix reuse (reuse_steps=True): a row whose ops act only from step s on follows the base run
    exactly before s, so chunks hold rows of one first step, and in a chunk starting at s the denoiser
    calls of steps < s return the base run's predictions instead of being computed (the diffusion
    analogue of the engine's layer-prefix reuse). The values equal a run without it up to float rounding
    (the base predictions come from a batch of one row, the computed ones from a chunk of rows). Off
    when a shared op selects steps (it would not fire in the replayed steps)."""
    lm, ad = _pipeline(model)
    spec = spec if isinstance(spec, Sampling) else Sampling(spec)
    if chunk_rows is None:
        b = len(spec.prompts())
        cfg = 2
        chunk_rows = max(1, int(memory_budget // max(1, item_bytes(lm, spec) * cfg * b)))
    kw: dict[str, Any] = dict(shared=shared, chunk_rows=chunk_rows, reuse_prefix=False)
    n_steps = ad.n_steps(spec)
    # at most the last step is replayed away: a chunk computes at least one step, where shared ops fire
    firsts = [min(first_step(list(r), n_steps), n_steps - 1) for r in rows]
    # a shared op limited to some steps would not fire in a group whose replayed steps hold them
    if not reuse_steps or not any(firsts) or any(op.where.steps is not None for op in shared):
        grid = lm.run_grid(spec, rows, metric, progress=progress, desc=desc, **kw)
        grid.stats["denoiser_steps_run"] = 1.0
        return grid
    state: dict = {}

    def before_chunk(chunk: list[int]) -> None:  # a chunk holds rows of one first step (row_groups)
        s = firsts[chunk[0]]
        ad.replay = (s, state["base"]) if s > 0 else None

    try:
        grid = lm.run_grid(spec, rows, metric, progress=progress, desc=desc, row_groups=firsts,
                           on_base=lambda out: state.setdefault("base", out), before_chunk=before_chunk, **kw)
    finally:
        ad.replay = None
    grid.stats.update(step_prefix_reuse=True, rows_by_first_step={s: firsts.count(s) for s in sorted(set(firsts))},
                      denoiser_steps_run=sum(n_steps - s for s in firsts) / max(1, len(rows) * n_steps))
    return grid


# ---------------------------------------------------------------------------------------------
# metrics over SampleOutput
# ---------------------------------------------------------------------------------------------

def _tile(ref: torch.Tensor, n: int, axis: int) -> torch.Tensor:
    b = ref.shape[axis]
    idx = torch.arange(n) % b
    return ref.index_select(axis, idx.to(ref.device))


def pred_distance(reference: SampleOutput, branch: str = "cond", steps=None) -> Callable[[SampleOutput], torch.Tensor]:
    """Mean over steps of ||pred - pred_ref|| / ||pred_ref|| per image: the cheap denoiser-output distance
    (0 = the reference run's predictions). The reference's images repeat across grid rows."""
    def get(o: SampleOutput):
        p = o.pred if branch == "cond" else o.pred_uncond
        if p is None:
            raise InterpError(f"the run has no {branch!r} predictions (no classifier-free guidance?)")
        return p if steps is None else p[list(range(*steps)) if isinstance(steps, tuple) else list(steps)]

    ref = get(reference)

    def f(out: SampleOutput) -> torch.Tensor:
        p = get(out)
        r = _tile(ref.to(p.device), p.shape[1], 1)
        d = (p - r).flatten(2).norm(dim=2) / r.flatten(2).norm(dim=2).clamp_min(1e-12)
        return d.mean(0)
    return f


def latent_distance(reference: SampleOutput) -> Callable[[SampleOutput], torch.Tensor]:
    """||latents - latents_ref|| / ||latents_ref|| per image (final latents)."""
    ref = reference.latents
    if ref is None:
        raise InterpError("the reference run has no final latents (the pipeline's step callback never ran)")

    def f(out: SampleOutput) -> torch.Tensor:
        if out.latents is None:
            raise InterpError("the run has no final latents (the pipeline's step callback never ran)")
        r = _tile(ref.to(out.latents.device), out.latents.shape[0], 0)
        return (out.latents - r).flatten(1).norm(dim=1) / r.flatten(1).norm(dim=1).clamp_min(1e-12)
    return f


def image_metric(fn: Callable) -> Callable[[SampleOutput], torch.Tensor]:
    """Wrap an image scorer (images [N, 3, H, W] in [0, 1] -> N numbers, e.g. a zoo scorer) as a metric."""
    def f(out: SampleOutput) -> torch.Tensor:
        return torch.as_tensor(fn(out.images), dtype=torch.float32).reshape(out.images.shape[0])
    return f


def clip_score(clip_model, processor, text: str | Sequence[str]) -> Callable[[SampleOutput], torch.Tensor]:
    """CLIPScore 100 * max(cos(image, text), 0) with a user-supplied transformers CLIPModel + CLIPProcessor."""
    texts = [text] if isinstance(text, str) else list(text)

    def f(out: SampleOutput) -> torch.Tensor:
        imgs = [im.permute(1, 2, 0).clamp(0, 1).mul(255).round().to(torch.uint8).cpu().numpy() for im in out.images]
        with torch.no_grad():
            ti = processor(text=texts, return_tensors="pt", padding=True)
            ii = processor(images=imgs, return_tensors="pt")
            dev = next(clip_model.parameters()).device
            te = clip_model.get_text_features(**{k: v.to(dev) for k, v in ti.items()})
            ie = clip_model.get_image_features(pixel_values=ii["pixel_values"].to(dev))
        te = getattr(te, "pooler_output", te)
        ie = getattr(ie, "pooler_output", ie)
        te = te / te.norm(dim=-1, keepdim=True)
        ie = ie / ie.norm(dim=-1, keepdim=True)
        te = _tile(te, ie.shape[0], 0)
        return (100 * (ie * te).sum(-1)).clamp_min(0).float().cpu()
    return f


# ---------------------------------------------------------------------------------------------
# per-token influence along the clean trajectory
# ---------------------------------------------------------------------------------------------

def prompt_positions(tokens: Sequence[str]) -> list[int]:
    """Positions of the prompt's tokens up to and including the end-of-text token (padding excluded)."""
    out = []
    for i, t in enumerate(tokens):
        out.append(i)
        if "endoftext" in t or t.strip() == "</s>":
            break
    return out


def token_influence(model, spec: Sampling | str, positions: Sequence[int] | None = None, *, steps=None,
                    progress: bool = False) -> Result:
    """Per-token influence on the denoiser output along the clean trajectory (docs/METHODS.md, "Steering", D_t):

        D_t(token) = ||f(x_t, t, c) - f(x_t, t, c without token)|| / ||f(x_t, t, c)||

    with f the velocity (flow models) or noise prediction (UNets) of the conditional rows, x_t from the
    clean run, and "without token" = that token's conditioning vector zeroed (the denoiser's
    `context` site). Averaged over the request's images (seeds). Result axes (step, token)."""
    lm, ad = _pipeline(model)
    spec = spec if isinstance(spec, Sampling) else Sampling(spec)
    ad.record_inputs = True
    try:
        clean = lm.run(spec)
    finally:
        ad.record_inputs = False
    prepared = ad.prepare(spec)  # a Sampling always prepares to a PipelinePrepared
    views = prepared.views if isinstance(prepared, PipelinePrepared) else {}
    tokens = views.get("__context__", [[]])[0]
    positions = list(positions) if positions is not None else prompt_positions(tokens)
    n_steps = clean.output.n_steps
    want = _step_set(steps, n_steps, f"{ad.denoiser}.context")
    den = attach(getattr(ad.pipe, ad.denoiser))
    site = f"{ad.denoiser}.context"
    rows = [[Ablate(site, "zero", where=at(pos=p))] for p in positions]
    vals = torch.zeros(len(want), len(positions))
    for kw, branches, step in clean.output.inputs:
        if "cond" not in branches or step not in want:
            continue
        r = branches["cond"]
        n_all = next(v for v in (kw.get("sample"), kw.get("hidden_states")) if v is not None).shape[0]
        cond = {k: (_rows(v, r, n_all) if k in BATCHED else v) for k, v in kw.items()}
        g = den.run_grid(cond, rows, metric=lambda o: o.flatten(1).float(), progress=progress,
                         desc=f"token influence step {step}", reuse_prefix=False)
        base = g.base.flatten(1)
        d = (g.values.flatten(2) - base[None]).norm(dim=-1) / base.norm(dim=-1).clamp_min(1e-12)[None]
        vals[want.index(step)] = d.mean(1)
    labels = [f"{p}:{tokens[p].strip() if p < len(tokens) else p}" for p in positions]
    return Result(vals, ("step", "token"), {"step": want, "token": labels},
                  {"metric": "D_t", "prediction": "velocity" if ad.denoiser == "transformer" else "noise",
                   "prompt": spec.prompts()[0], "images": len(spec.prompts())})


def _rows(v, rows: list[int], n: int):
    if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == n:
        return v[rows[0]:rows[-1] + 1]
    if isinstance(v, dict):
        return {k: _rows(x, rows, n) for k, x in v.items()}
    return v
