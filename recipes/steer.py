"""`interp steer`: extract a steering vector, inject it over an alpha sweep, write PNG + JSON.

Presets (each a contrast, a site and a measured dose-response, beside a random direction and a
norm-matched control):
  sentiment        SmolLM2: positive - negative sentences; p(positive words) after neutral prompts
  physics-kappa    physics surrogate: high - low kappa regimes; kappa fitted from a steered rollout
  shapes-red-blue  shapes-diffusion: red - blue captions in the UNet's text context; hue and shape accuracy
  shapes-flow-red-blue  the same on shapes-flow (SD3 transformer), at the image tokens of block 1
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

POSITIVE = ["I love this, it is wonderful and makes me happy.", "What a fantastic, delightful day this has been.",
            "The movie was brilliant and I enjoyed every minute.", "She was thrilled with the excellent results.",
            "This is the best meal I have ever had.", "Everything went perfectly and we were overjoyed.",
            "The team did a superb job, I am so proud.", "A beautiful, joyful and uplifting story."]
NEGATIVE = ["I hate this, it is awful and makes me miserable.", "What a terrible, depressing day this has been.",
            "The movie was dreadful and I hated every minute.", "She was furious with the horrible results.",
            "This is the worst meal I have ever had.", "Everything went wrong and we were devastated.",
            "The team did a lousy job, I am so ashamed.", "An ugly, bleak and depressing story."]
EVAL = ["I think this movie is", "The food at the restaurant was", "My day today was", "Honestly, the concert was"]
TARGETS = [" great", " good", " wonderful", " amazing", " excellent"]


@dataclass
class Preset:
    kind: str
    model: str
    site: str
    method: str
    reduce: str
    alphas: list[float]
    extra: dict[str, Any] = field(default_factory=dict)


PRESETS = {
    "sentiment": Preset("lm", "smollm2", "blocks.8.resid_post", "caa", "last",
                        [-0.3, -0.2, -0.1, 0.0, 0.1, 0.2, 0.3]),
    # the kappa signal enters the grid tokens through block 0's attention to the regime token;
    # norm=None: alpha = 1 adds the full mean (high - low) difference of the grid tokens
    "physics-kappa": Preset("physics", "physics", "blocks.0.attn.out", "caa", slice(1, None),
                            [-1.0, -0.5, 0.0, 0.5, 1.0, 1.5],
                            {"high": None, "low": None, "kappa": None, "rollout_steps": 25, "n": 64,
                             "norm": None}),  # kappas: the training grid's extremes and their geometric mean
    # the text conditioning the UNet's cross-attention reads (METHODS: "add in the text embedding");
    # the mid-block (h-space) moved the hue of this model < 15 degrees up to alpha 1.5
    # alpha = 1 turns magenta into red; from 1.5 the hue overshoots to orange/yellow and shapes start to break
    "shapes-red-blue": Preset("diffusion", "shapes-diffusion", "unet.context", "caa", "mean",
                              [-0.5, 0.0, 0.25, 0.5, 0.75, 1.0, 1.25],
                              {"positive": "red", "negative": "blue", "base": "magenta", "n_steps": 10,
                               "guidance": None, "seeds": 1}),  # None: the pipeline's default (1.0, no CFG)
    # the text states the MMDiT reads (as unet.context above); transformer.blocks.1.img moved the hue no
    # more than its controls did and broke the shapes (docs/FINDINGS.md)
    "shapes-flow-red-blue": Preset("diffusion", "shapes-flow", "transformer.context", "caa", "mean",
                                   [-0.5, 0.0, 0.25, 0.5, 0.75, 1.0, 1.25],
                                   {"positive": "red", "negative": "blue", "base": "magenta", "n_steps": 10,
                                    "guidance": 4.0, "seeds": 1}),
}


def register(sub) -> None:
    p = sub.add_parser("steer", help="extract a steering vector, sweep alpha, report the dose-response (PNG + JSON)",
                       description=__doc__, formatter_class=__import__("argparse").RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="sentiment", choices=sorted(PRESETS))
    p.add_argument("--model", help="zoo name or folder (default: the preset's)")
    p.add_argument("--site", help="site to extract and steer at (default: the preset's)")
    p.add_argument("--method", choices=("mean_diff", "caa", "pca"))
    p.add_argument("--reduce", help="positions / spatial axes: last, mean, keep, a position (0) or a slice (1:)")
    p.add_argument("--norm", choices=("relative", "none"), help="norm-relative alpha or an absolute multiple")
    p.add_argument("--znorm", action="store_true", help="z-normalise each example before the difference")
    p.add_argument(
        "--alphas", help="comma-separated alphas, e.g. --alphas=-0.2,0,0.2 (with '=' when the first is negative)"
    )
    p.add_argument("--steps", help="step window START,STOP for diffusion / rollout injection")
    p.add_argument("--positive", help="LM: text file, one positive prompt per line")
    p.add_argument("--negative", help="LM: text file, one negative prompt per line")
    p.add_argument("--eval", help="LM: text file of prompts whose next-token probabilities are measured")
    p.add_argument("--targets", help="LM: comma-separated target words (single tokens, with leading spaces)")
    p.add_argument("--seed", type=int, default=0, help="seed of the controls and samples")
    p.add_argument("--samples", type=int, default=None,
                   help="diffusion: images per caption (seeds) for extraction and for every alpha "
                        "(default: the preset's)")
    p.add_argument("--out", default="interp-out/steer", help="output folder (default: %(default)s)")
    p.set_defaults(func=run)


def _lines(path: str | None, default: list[str]) -> list[str]:
    if not path:
        return default
    lines = [l.rstrip("\n") for l in Path(path).read_text().splitlines() if l.strip()]
    if not lines:
        raise ValueError(f"{path} holds no prompts (one per line)")
    return lines


def parse_reduce(text: str):
    """'last' | 'mean' | 'keep' | '3' (one position) | '1:' / '1:5' (mean over a slice of positions)."""
    if text in ("last", "mean", "keep"):
        return text
    try:
        if ":" in text:
            a, b = text.split(":", 1)
            return slice(int(a) if a else None, int(b) if b else None)
        return int(text)
    except ValueError:
        raise ValueError(f"--reduce {text!r}: use last, mean, keep, a position like 0 or a slice like 1:") from None


def config(args) -> Preset:
    pr = PRESETS[args.preset]
    alphas = [float(a) for a in args.alphas.split(",")] if args.alphas else list(pr.alphas)
    cfg = Preset(pr.kind, args.model or pr.model, args.site or pr.site, args.method or pr.method,
                 parse_reduce(args.reduce) if args.reduce else pr.reduce, alphas, dict(pr.extra))
    if getattr(args, "norm", None):
        cfg.extra["norm"] = None if args.norm == "none" else "relative"
    cfg.extra.update(znorm=bool(args.znorm), seed=args.seed,
                     window=tuple(int(s) for s in args.steps.split(",")) if args.steps else None)
    if getattr(args, "samples", None):
        if cfg.kind != "diffusion":
            raise SystemExit("interp steer: --samples applies to the diffusion presets (images per caption)")
        cfg.extra["seeds"] = args.samples
    if cfg.kind == "lm":
        cfg.extra.update(positive=_lines(args.positive, POSITIVE), negative=_lines(args.negative, NEGATIVE),
                         eval=_lines(args.eval, EVAL),
                         targets=args.targets.split(",") if args.targets else TARGETS)
    return cfg


def run(args) -> int:
    import torch

    from recipes.models import load

    torch.set_grad_enabled(False)
    cfg = config(args)
    t0 = time.perf_counter()
    zoo_name = PRESETS[args.preset].model
    if cfg.kind in ("physics", "diffusion") and Path(cfg.model).is_dir():  # e.g. a fresh training run of a zoo model
        from interp.zoo.catalog import load_trained

        model = load_trained(zoo_name, path=cfg.model)
    else:
        model = load(cfg.model)
    fn = {"lm": run_lm, "physics": run_physics, "diffusion": run_diffusion}[cfg.kind]
    report = fn(model, cfg, Path(args.out))
    report["seconds"] = round(time.perf_counter() - t0, 1)
    path = Path(args.out) / "report.json"
    path.write_text(json.dumps(report, indent=1, default=str))
    mono = report["monotonicity"]
    print(f"{args.preset}: {cfg.site} ({cfg.method}), alphas {cfg.alphas}")
    for name, vals in report["dose_response"].items():
        print(f"  {name:13s} {' '.join(f'{v:.4g}' for v in vals)}   spearman {mono[name]['spearman']:+.2f}"
              f"{'  monotone' if mono[name]['monotone'] else ''}")
    for k in ("alpha0_bitwise_identical", "shape_accuracy", "verdict"):
        if k in report:
            print(f"  {k}: {report[k]}")
    print(f"report: {path}\nplot:   {report['plot']}   ({report['seconds']} s)")
    return 0


def _finish(res, vecs, cfg: Preset, out: Path, title: str, quantity: str | None = None) -> dict:
    from interventions.steering import plot_dose_response

    out.mkdir(parents=True, exist_ok=True)
    vecs["steer"].save(out / "vector.safetensors")
    res.save(out / "dose_response")
    absolute = cfg.extra.get("norm", "relative") is None
    png = plot_dose_response(res, out / "dose_response.png", title=title, quantity=quantity,
                             xlabel="alpha (x the mean difference)" if absolute else "alpha (norm-relative)")
    r = res.sel(quantity=quantity) if quantity else res
    return {"kind": cfg.kind, "model": cfg.model, "site": cfg.site, "method": cfg.method, "reduce": cfg.reduce,
            "alphas": cfg.alphas, "metric": quantity or res.attrs.get("metric"),
            "dose_response": {n: r.values[i].tolist() for i, n in enumerate(r.coord("vector"))},
            "monotonicity": res.attrs["monotonicity"], "vectors": res.attrs["vectors"],
            "vector_file": str(out / "vector.safetensors"), "plot": str(png),
            "extra": {k: v for k, v in cfg.extra.items() if k not in ("positive", "negative")}}


# ---------------------------------------------------------------------------------------------
def run_lm(model, cfg: Preset, out: Path) -> dict:
    import torch

    import interp
    from interventions import steering as S

    lm = interp.attach(model)
    x = cfg.extra
    sv, p, n = S.extract(lm, x["positive"], x["negative"], cfg.site, method=cfg.method, reduce=cfg.reduce,
                         znorm=x["znorm"], model=cfg.model, return_activations=True)
    vecs = S.controls(sv, p, n, seed=x["seed"])
    norm = x.get("norm", "relative")
    res = S.lm_target_prob(lm, vecs, x["eval"], x["targets"], cfg.alphas, norm=norm)
    more = "|..." if len(x["targets"]) > 3 else ""
    rep = _finish(res, vecs, cfg, out, f"{cfg.model} {cfg.site}: p({'|'.join(x['targets'][:3])}{more}) vs alpha")
    plain = S.generate(lm, x["eval"][0], max_new_tokens=12)
    zero = S.generate(lm, x["eval"][0], sv, 0.0, max_new_tokens=12)
    rep["alpha0_bitwise_identical"] = bool(
        torch.equal(plain["ids"], zero["ids"]) and torch.equal(plain["scores"], zero["scores"])
    )
    top = max(cfg.alphas)
    rep["samples"] = {"prompt": x["eval"][0], "unsteered": plain["text"],
                      **{f"{name} alpha={top}": S.generate(lm, x["eval"][0], v, top, max_new_tokens=12,
                                                           norm=norm)["text"]
                         for name, v in vecs.items()},
                      f"steer alpha={min(cfg.alphas)}": S.generate(lm, x["eval"][0], sv, min(cfg.alphas),
                                                                   max_new_tokens=12, norm=norm)["text"]}
    rep["verdict"] = _verdict(rep)
    return rep


def _verdict(rep: dict) -> str:
    m = rep["monotonicity"]
    ok = m["steer"]["monotone"]
    ctl = max(abs(m[c]["change"]) for c in m if c != "steer")
    return (f"steer {'monotone' if ok else 'NOT monotone'} (change {m['steer']['change']:+.4g}); "
            f"largest control change {ctl:.4g}")


# ---------------------------------------------------------------------------------------------
def physics_data(n: int, high: float, low: float, seed: int = 0):
    """Paired inputs: the same random fields and velocities, at a high and a low kappa."""
    import numpy as np
    import torch

    from interp.zoo import physics as P

    rng = np.random.default_rng(seed)
    u = torch.tensor(P.random_initial(rng, n), dtype=torch.float32)
    vel = torch.tensor(np.asarray(P.VELOCITIES)[rng.integers(0, len(P.VELOCITIES), n)], dtype=torch.float32)
    return (u, torch.full((n,), high), vel), (u, torch.full((n,), low), vel)


def run_physics(model, cfg: Preset, out: Path) -> dict:
    import torch

    import interp
    from interp.zoo import physics as P
    from interp.zoo.scorers import fit_kappa
    from interventions import steering as S

    lm = interp.attach(model)
    x = cfg.extra
    x["high"] = x.get("high") or max(P.KAPPAS)
    x["low"] = x.get("low") or min(P.KAPPAS)
    x["kappa"] = x.get("kappa") or float(f"{(x['high'] * x['low']) ** 0.5:.3g}")
    hi, lo = physics_data(x["n"], x["high"], x["low"], x["seed"])
    sv, p, n = S.extract(lm, hi, lo, cfg.site, method=cfg.method, reduce=cfg.reduce, znorm=x["znorm"],
                         model=cfg.model, return_activations=True, batch_size=64)
    vecs = S.controls(sv, p, n, seed=x["seed"])
    u0 = torch.tensor(P.gaussian_blob(0.5, 0.04), dtype=torch.float32)

    T = x["rollout_steps"]

    at_pos = cfg.reduce if isinstance(cfg.reduce, (int, slice)) else None  # injected where it was read

    def fitted(v, a):
        with v.apply(lm, a, norm=x.get("norm", "relative"), pos=at_pos, steps=x["window"], steps_from=""):
            traj = model.rollout(u0, T, x["kappa"], 0.0)
        return fit_kappa(traj.numpy(), P.DT)
    res = S.dose_response(vecs, cfg.alphas, fitted, metric="fitted kappa")
    rep = _finish(res, vecs, cfg, out, f"{cfg.model} {cfg.site}: fitted kappa (conditioned on {x['kappa']})")
    plain = model.rollout(u0, T, x["kappa"], 0.0)
    with sv.apply(lm, 0.0, steps_from=""):
        zero = model.rollout(u0, T, x["kappa"], 0.0)
    rep["alpha0_bitwise_identical"] = bool(torch.equal(plain, zero))
    rep["reference_fits"] = {f"conditioned kappa={k}": fit_kappa(model.rollout(u0, T, k, 0.0).numpy(), P.DT)
                             for k in (x["low"], x["kappa"], x["high"])}
    rep["verdict"] = _verdict(rep)
    return rep


# ---------------------------------------------------------------------------------------------
def shapes_prompts(colour: str, seeds: int) -> tuple[list[str], list[str]]:
    """One caption per shape x position (large, solid) in `colour`, repeated for each seed; and the shapes."""
    from interp.zoo import shapes as Sh

    attrs = [Sh.Attributes(colour, s, p, "large", "solid") for s in Sh.SHAPES for p in Sh.POSITIONS]
    return [a.caption() for a in attrs] * seeds, [a.shape for a in attrs] * seeds


def diffusion_activations(pl, site: str, prompts: list[str], x: dict, seed: int):
    """The site's cond-branch activations averaged over denoising steps, one row per image: [n, *F]
    (interp.diffusion.record: one sampling run, every step and CFG branch addressable)."""
    import torch

    from interp.diffusion import Sampling, record

    spec = Sampling(prompts, seed=seed, steps=x["n_steps"], guidance=x["guidance"], options=dict(x.get("options", {})))
    rec = record(pl, spec, [site])
    return torch.stack([rec.get(site, st, "cond").float() for st in rec.steps(site)]).mean(0)


def run_diffusion(pipe, cfg: Preset, out: Path) -> dict:
    import numpy as np
    import torch

    import interp
    from interp.diffusion import Sampling, sample_grid
    from interp.zoo import scorers
    from interp.zoo.shapes import HUES
    from interventions import steering as S

    x = cfg.extra
    pl = interp.attach(pipe)
    pos_p, _ = shapes_prompts(x["positive"], x["seeds"])
    neg_p, _ = shapes_prompts(x["negative"], x["seeds"])
    p = diffusion_activations(pl, cfg.site, pos_p, x, 1000)  # the same seeds for both: paired examples
    n = diffusion_activations(pl, cfg.site, neg_p, x, 1000)
    spatial = None
    if cfg.reduce == "keep":  # the whole map / token grid, norms per image
        spatial = "keep"
    elif p.dim() >= 4:  # UNet feature maps [n, C, H, W]: a channel vector added at every location
        p, n, spatial = p.flatten(2).mean(-1), n.flatten(2).mean(-1), "average"
    elif p.dim() == 3:  # DiT image tokens [n, T, D]: a token vector added at every token
        p, n = p.mean(1), n.mean(1)
    sv = S.from_activations(p, n, cfg.site, method=cfg.method, znorm=x["znorm"], spatial=spatial, model=cfg.model,
                            meta={"positive": x["positive"], "negative": x["negative"], "steps": x["n_steps"]},
                            hash_of=(pos_p, neg_p, x["n_steps"], x["guidance"]))
    vecs = S.controls(sv, p, n, seed=x["seed"])
    base_p, shapes = shapes_prompts(x["base"], x["seeds"])
    spec = Sampling(base_p, seed=0, steps=x["n_steps"], guidance=x["guidance"], options=dict(x.get("options", {})))
    names = list(vecs)
    rows = [[vecs[k].op(a, norm=x.get("norm", "relative"), steps=x["window"])] for k in names for a in cfg.alphas]
    g = sample_grid(pl, spec, rows, lambda o: o.images, desc="steer diffusion")  # [rows, n, 3, H, W]
    imgs = g.values.reshape(len(names), len(cfg.alphas), *g.values.shape[1:])
    centre = HUES[x["base"]]
    vals = torch.zeros(len(names), len(cfg.alphas), 3, dtype=torch.float64)
    for i in range(len(names)):
        for j in range(len(cfg.alphas)):
            im = imgs[i, j]
            hu = (scorers.hue(im) - centre + 180.0) % 360.0 - 180.0 + centre  # unwrapped around the base hue
            vals[i, j, 0] = float(np.nanmean(hu)) if np.isfinite(hu).any() else float("nan")
            vals[i, j, 1] = float(np.mean([a == b for a, b in zip(scorers.shape(im), shapes)]))
            vals[i, j, 2] = scorers.colour_rate(im, x["positive"])
    q = ["hue", "shape_accuracy", f"{x['positive']}_rate"]
    res = interp.Result(vals, ("vector", "alpha", "quantity"), {"vector": names, "alpha": cfg.alphas, "quantity": q},
                        {"metric": "hue (degrees)", "base_prompt_colour": x["base"]})
    res.attrs["monotonicity"] = {k: S.monotonicity(vals[i, :, 0].tolist(), cfg.alphas) for i, k in enumerate(names)}
    res.attrs["vectors"] = {k: {"site": v.site, "method": v.method, "norm": v.norm, "data_hash": v.data_hash,
                                "cosine_to_steer": v.cosine(sv)} for k, v in vecs.items()}
    rep = _finish(res, vecs, cfg, out, f"{cfg.model} {cfg.site}: hue of '{x['base']}' prompts vs alpha", quantity="hue")
    acc = res.sel(vector="steer", quantity="shape_accuracy").values
    a0 = cfg.alphas.index(0.0) if 0.0 in cfg.alphas else 0
    rep["shape_accuracy"] = {k: res.sel(vector=k, quantity="shape_accuracy").values.tolist() for k in names}
    rep["shape_accuracy"]["steer_max_drop_points"] = float(100 * (acc[a0] - acc.min()))
    rep["colour_rate"] = {k: res.sel(vector=k, quantity=q[2]).values.tolist() for k in names}
    plain = pl.run(spec).output.images
    zero = pl.run(spec, ops=[sv.op(0.0, steps=x["window"])]).output.images
    rep["alpha0_bitwise_identical"] = bool(torch.equal(plain, zero))
    show = [shapes.index(k) for k in dict.fromkeys(shapes)]  # one image per shape
    interp.image_grid(imgs[0][:, show].reshape(-1, *imgs.shape[3:]), out / "samples.png",
                      labels=[f"a={a:g} {shapes[i]}" for a in cfg.alphas for i in show], ncol=len(show),
                      title=f"steer {x['positive']} - {x['negative']} at {cfg.site} on '{x['base']}' prompts")
    rep["samples"] = str(out / "samples.png")
    rep["verdict"] = (
        _verdict(rep) + f"; shape accuracy drop {rep['shape_accuracy']['steer_max_drop_points']:.1f} points"
    )
    return rep

