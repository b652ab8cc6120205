"""`interp saliency`: where a concept sits in the image (ConceptAttention, raw cross-attention).

    interp saliency --model shapes-flow --prompt "a small red circle on the left, striped" --concepts red,circle
    interp saliency --model shapes-flow --evaluate --out interp-out/saliency-flow

The first form samples the prompt, computes the maps and writes an overlay PNG plus the maps as an interp Result.
`--evaluate` scores every method against the true shape masks of the zoo's held-out captions (renders with the
renderer's masks, and sampled images with their own masks): mIoU, foreground IoU and pointing accuracy, with the
method settings chosen on training captions first; it writes summary.json and an overlay figure.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

METRICS = ("miou", "iou", "pointing")
SIGMAS = (0.2, 0.4, 0.6, 0.8)  # noise levels of the rendered images (fraction of the trajectory left)


def register(sub) -> None:
    p = sub.add_parser("saliency", help="concept saliency maps in the image (ConceptAttention / cross-attention)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="shapes-flow", help="zoo pipeline name (default: %(default)s)")
    p.add_argument("--prompt", default="a small red circle on the left, striped")
    p.add_argument("--concepts", default="red,circle", help="comma-separated concept words")
    p.add_argument("--method", choices=("concept", "cross"), default=None,
                   help="concept (MMDiT only) or cross (default: concept on MMDiT, cross on a UNet)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default: the pipeline's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--evaluate", action="store_true", help="score the methods on held-out captions")
    p.add_argument("--samples", type=int, default=2, help="--evaluate: sampled images per held-out caption")
    p.add_argument("--out", default="interp-out/saliency", help="output folder (default: %(default)s)")
    p.set_defaults(func=run)


def run(args) -> int:
    torch.set_num_threads(1)
    from interp import zoo

    pipe = zoo.load(args.model)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.evaluate:
        summary = evaluate(pipe, args.model, out, samples=args.samples, steps=args.steps)
        print(json.dumps(summary["test"], indent=1))
        return 0
    from interp.diffusion import Sampling
    from interventions import diffusion_saliency as DS

    words = [w.strip() for w in args.concepts.split(",") if w.strip()]
    method = args.method or ("cross" if type(getattr(pipe, "unet", None)).__name__ == "UNet2DConditionModel"
                             else "concept")
    spec = Sampling(args.prompt, seed=args.seed, steps=args.steps)
    res = (DS.concept_attention if method == "concept" else DS.cross_attention)(pipe, spec, words)
    res.save(out / "maps")
    overlay(res.images, [res.values[0, j] for j in range(len(words))], None, out / "overlay.png",
            ["sample", *[f"{method}: {w}" for w in words]], f"{args.model} | {args.prompt!r} | seed {args.seed}")
    print(f"wrote {out / 'overlay.png'} and {out / 'maps.json'}")
    return 0


# --------------------------------------------------------------------------------------------- evaluation
def _groups(attrs, images) -> dict:
    """Indices of the images per caption."""
    groups: dict = {}
    for i, a in enumerate(attrs):
        groups.setdefault(a, []).append(i)
    return groups


def _selection_calls(pipe, kind: str, attrs, images, n_layers: int) -> dict:
    """Denoiser calls (every needed site of every block) per caption group, computed once for all settings."""
    from interventions import diffusion_saliency as DS

    _, den = DS._denoiser(pipe)
    sites = DS._sites(den, kind, "", list(range(n_layers)),
                      ("q", "tk") if kind == "unet" else ("q", "k", "v", "tk", "out", "z"))
    return {a: (idx, DS._noised_calls(pipe, images[idx], [a.caption()] * len(idx), sites, SIGMAS, 0))
            for a, idx in _groups(attrs, images).items()}


def _target_maps(pipe, kind: str, cfg: dict, attrs, images, calls: dict | None = None) -> dict[str, torch.Tensor]:
    """Per target ("colour", "shape"): maps [N, h, w] of `cfg` on rendered images (grouped by caption)."""
    from interp.zoo import shapes as S
    from interventions import diffusion_saliency as DS

    _, den = DS._denoiser(pipe)
    n_layers = DS._n_layers(den, kind)
    calls = calls if calls is not None else _selection_calls(pipe, kind, attrs, images, n_layers)
    out = {"colour": [None] * len(attrs), "shape": [None] * len(attrs)}
    aspect = images.shape[-2] / images.shape[-1]
    for a, (idx, group) in calls.items():
        words, targets = _words(cfg, a, S)
        prompts = [a.caption()] * len(idx)
        layers = DS._layers(n_layers, cfg.get("layers"))
        ci = pos = None
        if cfg["method"] == "concept":
            ci = DS.concept_embeddings(pipe, words) if cfg["source"] == "isolated" else \
                DS.prompt_concepts(pipe, prompts, words)
        else:
            pos = DS._check_words(pipe, kind, prompts, words)
        m = DS._maps_of_calls(pipe, group, cfg["method"], words, layers, aspect, cfg.get("space", "output"),
                              cfg.get("softmax", True), ci, pos)
        for t, j in targets.items():
            for n, i in enumerate(idx):
                out[t][i] = m[n, j]
    return {t: torch.stack(v) for t, v in out.items()}


def _words(cfg: dict, a, S) -> tuple[list[str], dict[str, int]]:
    """Concept words of one caption for `cfg` and the index of each target among them."""
    if cfg["method"] == "cross":
        return [a.colour, a.shape], {"colour": 0, "shape": 1}
    if cfg.get("source") == "prompt":
        return [a.size, a.colour, a.shape, a.position, a.texture], {"colour": 1, "shape": 2}
    words = list(S.COLOURS) + list(S.SHAPES)
    return words, {"colour": words.index(a.colour), "shape": words.index(a.shape)}


def _score(maps: dict, masks: torch.Tensor) -> dict:
    from interventions.diffusion_saliency import segmentation_scores

    res = {}
    for t, m in maps.items():
        s = segmentation_scores(m, masks)
        res[t] = {k: round(float(s[k].mean()), 3) for k in METRICS}
    res["mean_miou"] = round((res["colour"]["miou"] + res["shape"]["miou"]) / 2, 3)
    return res


def candidates(kind: str, n_layers: int) -> list[dict]:
    """The settings compared on the selection set (documented in docs/DIFFUSION.md)."""
    layer_sets = [None] + [[i] for i in range(n_layers)] + [[i, i + 1] for i in range(n_layers - 1)]
    cross = [{"method": "cross", "layers": L} for L in layer_sets]
    if kind == "unet":
        return cross
    concept = [{"method": "concept", "layers": L, "space": sp, "softmax": sm, "source": src}
               for src in ("isolated", "prompt") for sp in ("output", "value") for sm in (True, False)
               for L in layer_sets]
    return concept + cross


def _sampled_maps(pipe, cfg: dict, attrs, samples: int, steps) -> tuple[dict, torch.Tensor]:
    """Maps of `cfg` on sampled images of the held-out captions (`samples` seeds each) and the images."""
    from interp.diffusion import Sampling
    from interp.zoo import shapes as S
    from interventions import diffusion_saliency as DS

    maps, images = {"colour": [], "shape": []}, []
    for k, a in enumerate(attrs):
        words, targets = _words(cfg, a, S)
        spec = Sampling([a.caption()] * samples, seed=1000 + samples * k, steps=steps)
        kw = {k2: cfg[k2] for k2 in ("layers", "space", "softmax", "source") if k2 in cfg}
        fn = DS.concept_attention if cfg["method"] == "concept" else DS.cross_attention
        res = fn(pipe, spec, words, **kw)
        for t, j in targets.items():
            maps[t].append(res.values[:, j])
        images.append(res.images)
    return {t: torch.cat(v) for t, v in maps.items()}, torch.cat(images)


def evaluate(pipe, model: str, out: Path, samples: int = 2, steps=None) -> dict:
    """Select each method's settings on training renders, then score on held-out renders and samples."""
    from interp.zoo import scorers as SC
    from interp.zoo import shapes as S
    from interventions import diffusion_saliency as DS

    t0 = time.time()
    den_name, den = DS._denoiser(pipe)
    kind = DS._kind(den)
    sel_imgs, _, sel_attrs = S.sample(3, 24)  # training captions
    test_imgs, _, test_attrs = S.sample(7, 32, S.held_out_attributes())
    sel_x, test_x = S.to_tensor(sel_imgs), S.to_tensor(test_imgs)
    sel_m, test_m = torch.from_numpy(SC.masks(sel_imgs)), torch.from_numpy(SC.masks(test_imgs))
    table = []
    n_layers = DS._n_layers(den, kind)
    sel_calls = _selection_calls(pipe, kind, sel_attrs, sel_x, n_layers)
    test_calls = _selection_calls(pipe, kind, test_attrs, test_x, n_layers)
    for cfg in candidates(kind, n_layers):
        table.append({**cfg, **_score(_target_maps(pipe, kind, cfg, sel_attrs, sel_x, sel_calls), sel_m)})
        print(f"[select] {cfg} -> {table[-1]['mean_miou']}", flush=True)
    chosen = {}
    for method in ("concept", "cross"):
        rows = [r for r in table if r["method"] == method]
        if rows:
            best = max(rows, key=lambda r: r["mean_miou"])
            chosen[f"{method} (selected)"] = {k: best[k] for k in ("method", "layers", "space", "softmax", "source")
                                              if k in best}
    if kind != "unet":
        chosen["concept (published defaults)"] = {"method": "concept", "layers": None, "space": "output",
                                                  "softmax": True, "source": "isolated"}
    chosen["cross (all layers)"] = {"method": "cross", "layers": None}
    test, figs = {}, {}
    held = S.held_out_attributes()
    for name, cfg in chosen.items():
        rendered = _score(_target_maps(pipe, kind, cfg, test_attrs, test_x, test_calls), test_m)
        smaps, simgs = _sampled_maps(pipe, cfg, held, samples, steps)
        smask = torch.from_numpy(SC.masks(simgs))
        test[name] = {"settings": cfg, "rendered": rendered, "sampled": _score(smaps, smask)}
        figs[name] = (smaps["colour"], simgs, smask)
        print(f"[test] {name}: {test[name]}", flush=True)
    _figure(figs, held, samples, out / f"overlay-{model}.png", model)
    summary = {"model": model, "selection": table, "test": test, "seconds": round(time.time() - t0, 1),
               "selection_set": "24 renders of training captions (shapes.sample(3, 24))",
               "rendered_test": "32 renders of the 8 held-out captions (shapes.sample(7, 32, held_out)), "
                                "noised to 0.2/0.4/0.6/0.8, renderer masks",
               "sampled_test": f"8 held-out captions x {samples} seeds, pipeline default steps/guidance, "
                               "masks of the sampled images (scorers.masks)"}
    (out / f"summary-{model}.json").write_text(json.dumps(summary, indent=1))
    return summary


def _figure(figs: dict, held, samples: int, path: Path, model: str) -> None:
    """One row per held-out caption (first seed): sample, its mask, then each method's colour-word map."""
    names = list(figs)
    first = next(iter(figs.values()))
    rows = [k * samples for k in range(len(held))]
    images = first[1][rows]
    maps = [[figs[n][0][r] for n in names] for r in rows]
    overlay(images, None, first[2][rows], path, ["sample", "mask", *names],
            f"{model}: map of the colour word, held-out captions (seed 1000+), mean over steps", grid=maps,
            row_labels=[a.caption() for a in held])


def overlay(images, maps, masks, path: Path, labels, title: str, grid=None, row_labels=None) -> Path:
    """PNG: per row an image, optionally its mask, then saliency maps drawn over the image."""
    import torch.nn.functional as F

    from interp.results import figure, save_figure

    grid = grid if grid is not None else [maps]
    n_rows, n_maps = len(grid), len(grid[0])
    n_cols = 1 + (masks is not None) + n_maps
    fig = figure(1.9 * n_cols, 1.6 * n_rows + 0.6)
    axes = fig.subplots(n_rows, n_cols, squeeze=False)
    for r in range(n_rows):
        img = images[r].permute(1, 2, 0).clamp(0, 1).numpy()
        cells = [("img", img)] + ([("mask", masks[r].float().numpy())] if masks is not None else [])
        cells += [("map", grid[r][j]) for j in range(n_maps)]
        for c, (what, v) in enumerate(cells):
            ax = axes[r][c]
            ax.axis("off")
            if what == "map":
                up = F.interpolate(v[None, None].float(), size=img.shape[:2], mode="bilinear")[0, 0]
                ax.imshow(img * 0.5, interpolation="nearest")
                ax.imshow(up.numpy(), cmap="inferno", alpha=0.6, interpolation="nearest")
            else:
                ax.imshow(v, cmap="gray" if what == "mask" else None, interpolation="nearest")
            label = row_labels[r] if (row_labels and c == 0) else labels[c]
            ax.set_title(label if (r == 0 or (row_labels and c == 0)) else "", fontsize=5 if c == 0 else 6)
    fig.suptitle(title, fontsize=7)
    return save_figure(fig, path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m recipes.saliency")
    sub = parser.add_subparsers(dest="command", required=True)
    register(sub)
    args = parser.parse_args(["saliency", *(argv if argv is not None else __import__("sys").argv[1:])])
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
