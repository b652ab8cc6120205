"""Trajectory attribution report on shapes-flow: exact vs attribution patching vs IG, and when-it-matters curves.

    python -m recipes.attribution_diffusion --out interp-out/attribution-flow --steps 12

Writes, per concept pair (colour red -> blue, shape circle -> square, position left -> right): the exact / AtP /
IG Results over (component or token) x step window (colour pair only: its metric is differentiable), heatmaps,
the when-does-it-matter curve (restore / ablate the text conditioning from step s on) and summary.json.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

CLEAN = "a small red circle on the left, solid"
PAIRS = {"colour": "a small blue circle on the left, solid", "shape": "a small red square on the left, solid",
         "position": "a small red circle on the right, solid"}


def scorer_metric(kind: str):
    """Continuous scorer readings of latents in [-1, 1] (no gradients; for exact curves only)."""
    from interp.zoo import scorers as SC

    def metric(x: torch.Tensor) -> torch.Tensor:
        img = ((x.detach() + 1) / 2).clamp(0, 1)
        if kind == "position":  # centroid x, left is larger: 32 - cx
            return torch.tensor(32.0 - float(np.nan_to_num(SC.centroid(img)[0, 0], nan=16.0)))
        sc = SC.shape_scores(img)[0]
        return torch.tensor(sc["circle"] - sc["square"])

    metric.__name__ = {"position": "32 - mask centroid x", "shape": "IoU(circle) - IoU(square)"}[kind]
    return metric


def plot_curves(curves: dict, path: Path, steps: int) -> None:
    from interp.results import figure, save_figure

    fig = figure(8, 3.2)
    axes = fig.subplots(1, 2)
    for name, c in curves.items():
        titles = ("restore clean text from step s on", "ablate (corrupt) from step s on")
        for ax, r, what in zip(axes, range(2), titles):
            ax.plot(c.coords["start"], c.values[r].numpy(), marker="o", ms=3, label=name)
            ax.set_title(what, fontsize=8)
            ax.set_xlabel("start step s")
    axes[0].set_ylabel("normalised metric (0 corrupted, 1 clean)")
    axes[1].legend(fontsize=7)
    fig.suptitle(f"shapes-flow, clean {CLEAN!r}, {steps} Euler steps, guidance 7, seed 0", fontsize=8)
    save_figure(fig, path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m recipes.attribution_diffusion")
    p.add_argument("--out", default="interp-out/attribution-flow")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--windows", type=int, default=4)
    p.add_argument("--ig-steps", type=int, default=4)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    import interp
    from interventions import diffusion_attribution as DA

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pipe = interp.zoo.load("shapes-flow")
    clean = DA.FlowRun(pipe, CLEAN, seed=0, steps=args.steps)
    t0, summary, curves = time.time(), {}, {}
    tokens = list(range(1, 10))  # a small red circle on the left , solid
    res = DA.attribute(clean, clean.with_prompt(PAIRS["colour"]), DA.colour_metric("red"), tokens=tokens,
                       windows=args.windows, ig_steps=args.ig_steps)
    for k in ("exact", "attribution", "ig"):
        res[k].save(out / f"colour-{k}")
        res[k].plot(out / f"colour-{k}.png", title=f"{k}: {CLEAN!r} vs {PAIRS['colour']!r}, colour_score[red], "
                    f"{args.steps} steps", center=True)
    summary["colour"] = {"correlation": res["correlation"], "clean_metric": res["exact"].attrs["clean_metric"],
                         "corrupted_metric": res["exact"].attrs["corrupted_metric"],
                         "top_exact": res["exact"].top(5), "top_attribution": res["attribution"].top(5)}
    print(json.dumps(summary["colour"], indent=1, default=str), flush=True)
    for kind, corrupted in PAIRS.items():
        metric = DA.colour_metric("red") if kind == "colour" else scorer_metric(kind)
        curves[kind] = DA.when_curve(clean, clean.with_prompt(corrupted), metric)
        curves[kind].save(out / f"when-{kind}")
        summary[f"when_{kind}"] = {"corrupted": corrupted,
                                   "restore": [round(float(v), 3) for v in curves[kind].values[0]],
                                   "ablate": [round(float(v), 3) for v in curves[kind].values[1]]}
        print(kind, summary[f"when_{kind}"], flush=True)
    plot_curves(curves, out / "when.png", args.steps)
    summary["seconds"] = round(time.time() - t0, 1)
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


def plot_attribution(folder: Path, path: Path) -> Path:
    """exact | attribution patching | IG heatmaps of the colour pair side by side (saved Results in `folder`)."""
    from interp import Result
    from interp.results import figure, save_figure

    res = {k: Result.load(folder / f"colour-{k}") for k in ("exact", "attribution", "ig")}
    words = ["<bos>", "a", "small", "red", "circle", "on", "the", "left", ",", "solid"]
    cells = [c if not c.startswith("token ") else f"token {c[6:]} ({words[int(c[6:])]})"
             for c in res["exact"].coords["cell"]]
    lim = max(float(r.values.abs().max()) for r in res.values())
    fig = figure(10, 5.2)
    axes = fig.subplots(1, 3, sharey=True)
    r_ = json.loads((folder / "summary.json").read_text())["colour"]["correlation"]
    for ax, (k, r) in zip(axes, res.items()):
        im = ax.imshow(r.values.numpy(), cmap="RdBu_r", vmin=-lim, vmax=lim, aspect="auto")
        ax.set_xticks(range(len(r.coords["window"])), r.coords["window"], fontsize=7)
        ax.set_xlabel("step window")
        ax.set_title(k if k == "exact" else f"{k} (r = {r_[k]:.2f} with exact)", fontsize=8)
    axes[0].set_yticks(range(len(cells)), cells, fontsize=7)
    fig.colorbar(im, ax=list(axes), label="normalised effect (0 corrupted, 1 clean)")
    a = res["exact"].attrs
    fig.suptitle(f"shapes-flow: restore clean {a['clean']!r} into {a['corrupted']!r}; metric {a['metric']}; "
                 f"{a['steps']} steps, guidance {a['guidance']}, seed {a['seed']}, IG {a['ig_steps']} points",
                 fontsize=8)
    return save_figure(fig, path)
