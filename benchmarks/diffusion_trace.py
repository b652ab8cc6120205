"""Diffusion causal tracing: interp's batched grid vs a per-cell diffusers loop (goal: >= 5x).

The same tracing job both ways, on the same tiny pipeline and the same seeds:
  - corrupt the attribute's word embeddings (the same corrupted embeddings on both sides),
  - restore every cell: text-encoder layer x token hidden states and denoiser components x step windows
    (all steps + each single step, both CFG branches),
  - metric: the denoiser-output distance to the clean run (mean over steps of ||eps - eps_clean|| / ||eps_clean||).
interp: `record` the clean run, then one `sample_grid` (all rows in one sampling loop per chunk; rows grouped
by their first edited step, the steps before it replayed from the base run: step-prefix reuse).
Per-cell: the plain pipeline called once per cell with bare torch hooks that patch the module outputs
(a step counter from `callback_on_step_end`), which is what one writes by hand (or what nnsight's
DiffusionModel does: one traced pipeline call per intervention). The two sides' values must agree.
Runs alternate interp / per-cell; medians of --repeats, in process CPU time (one thread, so it is the
work done; wall-clock on a shared machine mostly measures the other jobs) and in wall-clock time.

    .venv/bin/python benchmarks/diffusion_trace.py --repeats 3
    .venv/bin/python benchmarks/diffusion_trace.py --size shapes --repeats 3   # shapes-diffusion-sized UNet
    .venv/bin/python benchmarks/diffusion_trace.py --no-step-reuse ...         # interp without step-prefix reuse
    .venv/bin/python benchmarks/diffusion_trace.py --size shapes --profile     # where interp's time goes
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "interp"))

PROMPT = "a small red circle on the left, solid"


def build(size: str):
    if size == "tiny":
        from test_diffusion_helpers import tiny_sd

        return tiny_sd()
    from interp.zoo.architectures import build_diffusion_pipeline  # shapes-diffusion's architecture, random weights

    pipe = build_diffusion_pipeline(seed=0)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def interp_trace(pipe, spec, comps, windows, text_sites, tokens, reuse_steps=True):
    import interp
    from interp import Patch, at
    from interp.diffusion import pred_distance, record, restore, sample_grid
    from interventions.diffusion_tracing import corruption

    lm = interp.attach(pipe)
    rec = record(lm, spec, [*text_sites, *comps])
    rows = [[Patch(s, rec.get(s, None, "cond"), where=at(pos=t, branch="cond"))] for s in text_sites for t in tokens]
    rows += [restore(c, rec, steps=w) for c in comps for w in windows]
    metric = pred_distance(rec.output)
    g = sample_grid(lm, spec, rows, metric, shared=corruption(lm, "red"), progress=False, reuse_steps=reuse_steps)
    return g.values.mean(1), rec


class PerCell:
    """The hand-written reference: bare torch hooks, one pipeline call per cell."""

    def __init__(self, pipe, spec, corrupted_embed):
        self.pipe, self.spec, self.corrupted = pipe, spec, corrupted_embed
        self.step = 0

    def _call(self, hooks):
        preds, handles = [], []
        self.step, te_calls = 0, [0]

        def cb(p, i, t, kw):
            self.step = i + 1
            return {}

        def te_count(m, a, k):
            te_calls[0] += 1

        def corrupt(m, a, out):  # prompt call only (the first text-encoder call of the run)
            return self.corrupted.clone() if te_calls[0] == 1 and self.corrupted is not None else None

        unet, te = self.pipe.unet, self.pipe.text_encoder
        handles.append(te.register_forward_pre_hook(te_count, with_kwargs=True))
        handles.append(te.get_submodule(_embed_path(te)).register_forward_hook(corrupt))
        handles.append(
            unet.register_forward_hook(lambda m, a, o: preds.append(o[0] if isinstance(o, tuple) else o.sample))
        )
        for path, fn in hooks:
            handles.append(_module(self.pipe, path).register_forward_hook(lambda m, a, o, fn=fn: fn(o, te_calls[0])))
        try:
            s = self.spec
            gens = [torch.Generator().manual_seed(x) for x in s.seeds()]
            with torch.no_grad():
                self.pipe(s.prompts(), num_inference_steps=s.steps, guidance_scale=s.guidance, generator=gens,
                          output_type="pt", callback_on_step_end=cb)
        finally:
            for h in handles:
                h.remove()
        n = len(s.prompts())
        return torch.stack([p[n:] for p in preds])  # cond rows per step

    def text_cell(self, layer_path, clean, pos):
        def fn(o, calls):
            if calls != 1:
                return None
            o = (o[0] if isinstance(o, tuple) else o).clone()
            o[:, pos] = clean[:, pos]
            return o
        return self._call([(layer_path, fn)])

    def denoiser_cell(self, path, clean_by_step, steps):
        def fn(o, calls):
            if self.step not in steps:
                return None
            return (
                clean_by_step[self.step].clone()
                if not isinstance(o, tuple)
                else (clean_by_step[self.step].clone(), *o[1:])
            )

        return self._call([(path, fn)])


def _embed_path(te):
    return "text_model.embeddings.token_embedding" if hasattr(te, "text_model") else "embeddings.token_embedding"


def _module(pipe, path):
    comp, rest = path.split(".", 1)
    return getattr(pipe, comp).get_submodule(rest)


def per_cell_trace(pipe, spec, comps, windows, text_sites, tokens, lm_sites, corrupted):
    """Clean run with bare hooks, then one call per cell."""
    ref = PerCell(pipe, spec, corrupted)
    # clean states by bare hooks
    states = {}
    handles = []
    for name in [*text_sites, *comps]:
        site = lm_sites[name]
        def rec(m, a, o, name=name):
            states.setdefault(name, []).append((o[0] if isinstance(o, tuple) else o).detach().clone())
        handles.append(_module(pipe, site.module).register_forward_hook(rec))
    ref.corrupted_saved, ref.corrupted = ref.corrupted, None
    try:
        clean_pred = ref._call([])
    finally:
        for h in handles:
            h.remove()
    ref.corrupted = ref.corrupted_saved
    n = len(spec.prompts())
    dist = lambda p: ((p - clean_pred).flatten(2).norm(dim=2) / clean_pred.flatten(2).norm(dim=2)).mean(0)  # noqa
    vals = []
    for s in text_sites:
        for t in tokens:
            vals.append(dist(ref.text_cell(lm_sites[s].module, states[s][0][:n], t)))
    for c in comps:
        for w in windows:
            vals.append(dist(ref.denoiser_cell(lm_sites[c].module, states[c], set(range(*w)))))
    return torch.stack(vals).mean(1)


AREAS = (  # (label, substring of the code path or function), first match wins; self time is attributed
    ("torch conv / linear / attention kernels", ("conv2d", "linear", "scaled_dot_product", "baddbmm", "bmm",
                                                 "group_norm", "layer_norm", "silu", "gelu", "interpolate")),
    ("interp engine + hooks (ops, capture, bookkeeping)", ("/interp/",)),
    ("diffusers Python (blocks, attention processors, pipeline, scheduler)", ("/diffusers/",)),
    ("transformers (CLIP text encoder)", ("/transformers/",)),
    ("torch.nn Module call machinery", ("torch/nn/modules/module.py",)),
)


def profile(fn) -> None:
    """Run fn under cProfile; print self time by area and the top functions."""
    import cProfile
    import pstats

    prof = cProfile.Profile(time.process_time)  # CPU time: wall time on a shared machine measures other jobs
    t = time.process_time()
    prof.enable()
    fn()
    prof.disable()
    total = time.process_time() - t
    stats = pstats.Stats(prof)
    by_area: dict[str, float] = {}
    for (path, _, name), (_, _, tt, _, _) in stats.stats.items():
        key = f"{path}:{name}"
        area = next((lab for lab, subs in AREAS if any(s in key for s in subs)), "other (torch tensor ops, Python)")
        by_area[area] = by_area.get(area, 0.0) + tt
    print(f"interp run: {total:.2f} s CPU (profiled; cProfile adds overhead to Python-heavy areas)")
    for area, tt in sorted(by_area.items(), key=lambda kv: -kv[1]):
        print(f"  {tt:7.2f} s  {100 * tt / max(sum(by_area.values()), 1e-9):5.1f} %  {area}")
    stats.sort_stats("tottime").print_stats(25)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", choices=("tiny", "shapes"), default="tiny")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--samples", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-step-reuse", action="store_true",
                    help="interp without step-prefix reuse (every row computes every step)")
    ap.add_argument("--profile", action="store_true", help="profile one interp run (cProfile), print where the "
                    "time goes by area, and exit")
    args = ap.parse_args()
    torch.set_num_threads(1)

    import interp
    from interp.diffusion import Sampling, prompt_positions
    from interventions.diffusion_tracing import corruption, denoiser_components, step_windows

    pipe = build(args.size)
    lm = interp.attach(pipe)
    spec = Sampling([PROMPT] * args.samples, seed=0, steps=args.steps, guidance=3.0)
    comps = denoiser_components(lm)
    windows = step_windows(args.steps, "steps")
    text_sites = [s.name for s in lm.sites("text_encoder.blocks.*.resid_post")]
    tokens = prompt_positions(lm.adapter.prepare(spec).views["text_encoder"][0])
    corrupted = lm.run(spec, ops=corruption(lm, "red"), capture="text_encoder.embed").cache["text_encoder.embed"]
    corrupted = corrupted[0] if corrupted.dim() == 4 else corrupted  # first (prompt) call
    sites = {s.name: s for s in lm.sites()}
    n_cells = len(text_sites) * len(tokens) + len(comps) * len(windows)
    print(
        f"{args.size} SD pipeline: {n_cells} cells ({len(text_sites)} text layers x {len(tokens)} tokens + "
        f"{len(comps)} UNet components x {len(windows)} step windows), {args.samples} images, {args.steps} steps, CFG"
    )
    if args.profile:
        interp_trace(pipe, spec, comps, windows, text_sites, tokens)  # warm-up
        profile(lambda: interp_trace(pipe, spec, comps, windows, text_sites, tokens,
                                     reuse_steps=not args.no_step_reuse))
        return
    t_interp, t_cell, w_interp, w_cell = [], [], [], []
    for r in range(args.repeats):
        t, w = time.process_time(), time.perf_counter()
        a, _ = interp_trace(pipe, spec, comps, windows, text_sites, tokens, reuse_steps=not args.no_step_reuse)
        t_interp.append(time.process_time() - t)
        w_interp.append(time.perf_counter() - w)
        t, w = time.process_time(), time.perf_counter()
        b = per_cell_trace(pipe, spec, comps, windows, text_sites, tokens, sites, corrupted)
        t_cell.append(time.process_time() - t)
        w_cell.append(time.perf_counter() - w)
        err = float((a - b).abs().max())
        print(f"  repeat {r}: CPU interp {t_interp[-1]:.2f} s, per-cell {t_cell[-1]:.2f} s (wall {w_interp[-1]:.1f} / "
              f"{w_cell[-1]:.1f} s), max |difference| {err:.2e}")
        assert err < 1e-4 * max(1.0, float(b.abs().max())), "interp and the per-cell loop disagree"
    mi, mc = statistics.median(t_interp), statistics.median(t_cell)
    wi, wc = statistics.median(w_interp), statistics.median(w_cell)
    print(f"median CPU time: interp {mi:.2f} s, per-cell loop {mc:.2f} s, speed-up {mc / mi:.1f}x "
          f"({n_cells / mi:.1f} vs {n_cells / mc:.1f} cells per CPU second); wall: {wi:.1f} vs {wc:.1f} s "
          f"({wc / wi:.1f}x)")


if __name__ == "__main__":
    main()
