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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(8, 3.2))
    for name, c in curves.items():
        for ax, r, what in zip(axes, range(2), ("restore clean text from step s on", "ablate (corrupt) from step s on")):
            ax.plot(c.coords["start"], c.values[r].numpy(), marker="o", ms=3, label=name)
            ax.set_title(what, fontsize=8)
            ax.set_xlabel("start step s")
    axes[0].set_ylabel("normalised metric (0 corrupted, 1 clean)")
    axes[1].legend(fontsize=7)
    fig.suptitle(f"shapes-flow, clean {CLEAN!r}, {steps} Euler steps, guidance 7, seed 0", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


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
        summary[f"when_{kind}"] = {"corrupted": corrupted, "restore": [round(float(v), 3) for v in curves[kind].values[0]],
                                   "ablate": [round(float(v), 3) for v in curves[kind].values[1]]}
        print(kind, summary[f"when_{kind}"], flush=True)
    plot_curves(curves, out / "when.png", args.steps)
    summary["seconds"] = round(time.time() - t0, 1)
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
