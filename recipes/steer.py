"""`interp steer`: extract a steering vector, inject it over an alpha sweep, write PNG + JSON.

Presets (each a contrast, a site and a measured dose-response, beside a random direction and a
norm-matched control):
  sentiment        SmolLM2: positive - negative sentences; p(positive words) after neutral prompts
  physics-kappa    physics surrogate: high - low kappa regimes; kappa fitted from a steered rollout
  shapes-red-blue  shapes-diffusion: red - blue captions at the UNet mid-block; hue and shape accuracy
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
    "physics-kappa": Preset("physics", "physics", "module:blocks.1", "caa", "mean",
                            [-0.3, -0.2, -0.1, 0.0, 0.1, 0.2, 0.3],
                            {"high": 0.008, "low": 0.001, "kappa": 0.003, "rollout_steps": 25, "n": 64}),
    "shapes-red-blue": Preset("diffusion", "shapes-diffusion", "module:mid_block", "caa", "mean",
                              [-1.0, -0.5, 0.0, 0.5, 1.0, 1.5],
                              {"positive": "red", "negative": "blue", "base": "magenta", "n_steps": 20,
                               "guidance": 4.0, "seeds": 2}),
}


def register(sub) -> None:
    p = sub.add_parser("steer", help="extract a steering vector, sweep alpha, report the dose-response (PNG + JSON)",
                       description=__doc__, formatter_class=__import__("argparse").RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="sentiment", choices=sorted(PRESETS))
    p.add_argument("--model", help="zoo name or folder (default: the preset's)")
    p.add_argument("--site", help="site to extract and steer at (default: the preset's)")
    p.add_argument("--method", choices=("mean_diff", "caa", "pca"))
    p.add_argument("--reduce", choices=("last", "mean", "keep"), help="positions / spatial axes: last, mean or keep")
    p.add_argument("--znorm", action="store_true", help="z-normalise each example before the difference")
    p.add_argument("--alphas", help="comma-separated alphas (norm-relative), e.g. -0.2,0,0.2")
    p.add_argument("--steps", help="step window START,STOP for diffusion / rollout injection")
    p.add_argument("--positive", help="LM: text file, one positive prompt per line")
    p.add_argument("--negative", help="LM: text file, one negative prompt per line")
    p.add_argument("--eval", help="LM: text file of prompts whose next-token probabilities are measured")
    p.add_argument("--targets", help="LM: comma-separated target words (single tokens, with leading spaces)")
    p.add_argument("--seed", type=int, default=0, help="seed of the controls and samples")
    p.add_argument("--out", default="interp-out/steer", help="output folder (default: %(default)s)")
    p.set_defaults(func=run)


def _lines(path: str | None, default: list[str]) -> list[str]:
    if not path:
        return default
    lines = [l.rstrip("\n") for l in Path(path).read_text().splitlines() if l.strip()]
    if not lines:
        raise ValueError(f"{path} holds no prompts (one per line)")
    return lines


def config(args) -> Preset:
    pr = PRESETS[args.preset]
    cfg = Preset(pr.kind, args.model or pr.model, args.site or pr.site, args.method or pr.method,
                 args.reduce or pr.reduce, [float(a) for a in args.alphas.split(",")] if args.alphas else list(pr.alphas),
                 dict(pr.extra))
    cfg.extra.update(znorm=bool(args.znorm), seed=args.seed,
                     window=tuple(int(s) for s in args.steps.split(",")) if args.steps else None)
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
    png = plot_dose_response(res, out / "dose_response.png", title=title, quantity=quantity)
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
    res = S.lm_target_prob(lm, vecs, x["eval"], x["targets"], cfg.alphas)
    rep = _finish(res, vecs, cfg, out, f"{cfg.model} {cfg.site}: p({'|'.join(x['targets'][:3])}{'|...' if len(x['targets']) > 3 else ''}) vs alpha")
    plain = S.generate(lm, x["eval"][0], max_new_tokens=12)
    zero = S.generate(lm, x["eval"][0], sv, 0.0, max_new_tokens=12)
    rep["alpha0_bitwise_identical"] = bool(torch.equal(plain["ids"], zero["ids"]) and torch.equal(plain["scores"], zero["scores"]))
    top = max(cfg.alphas)
    rep["samples"] = {"prompt": x["eval"][0], "unsteered": plain["text"],
                      **{f"{name} alpha={top}": S.generate(lm, x["eval"][0], v, top, max_new_tokens=12)["text"]
                         for name, v in vecs.items()},
                      f"steer alpha={min(cfg.alphas)}": S.generate(lm, x["eval"][0], sv, min(cfg.alphas),
                                                                   max_new_tokens=12)["text"]}
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
    hi, lo = physics_data(x["n"], x["high"], x["low"], x["seed"])
    sv, p, n = S.extract(lm, hi, lo, cfg.site, method=cfg.method, reduce=cfg.reduce, znorm=x["znorm"],
                         model=cfg.model, return_activations=True, batch_size=64)
    vecs = S.controls(sv, p, n, seed=x["seed"])
    u0 = torch.tensor(P.gaussian_blob(0.5, 0.04), dtype=torch.float32)

    T = x["rollout_steps"]

    def fitted(v, a):
        with v.apply(lm, a, steps=x["window"], steps_from=""):  # one model call per rollout step
            traj = model.rollout(u0, T, x["kappa"], 0.0)
        return fit_kappa(traj.numpy(), P.DT)
    res = S.dose_response(vecs, cfg.alphas, fitted, metric="fitted kappa")
    rep = _finish(res, vecs, cfg, out, f"{cfg.model} {cfg.site}: fitted kappa vs alpha (conditioned on {x['kappa']})")
    plain = model.rollout(u0, T, x["kappa"], 0.0)
    with sv.apply(lm, 0.0, steps_from=""):
        zero = model.rollout(u0, T, x["kappa"], 0.0)
    rep["alpha0_bitwise_identical"] = bool(torch.equal(plain, zero))
    rep["reference_fits"] = {f"conditioned kappa={k}": fit_kappa(model.rollout(u0, T, k, 0.0).numpy(), P.DT)
                             for k in (x["low"], x["kappa"], x["high"])}
    rep["verdict"] = _verdict(rep)
    return rep


# ---------------------------------------------------------------------------------------------
def shapes_prompts(colour: str) -> tuple[list[str], list[str]]:
    from interp.zoo import shapes as Sh

    prompts = [Sh.Attributes(colour, s, "center", "large", "solid").caption() for s in Sh.SHAPES]
    return prompts, list(Sh.SHAPES)


def sample(pipe, prompts: list[str], seed: int, n_steps: int, guidance: float):
    import torch

    g = torch.Generator().manual_seed(seed)
    return pipe(prompts, num_inference_steps=n_steps, guidance_scale=guidance, generator=g, output_type="pt").images


def diffusion_activations(den, pipe, site: str, prompts: list[str], x: dict):
    """Mid-block (or any site) activations of the cond branch, averaged over steps and seeds: [n, *F]."""
    import torch

    acts = []
    for s in range(x["seeds"]):
        with den.applied(capture=[site]) as sess:
            sample(pipe, prompts, 1000 + s, x["n_steps"], x["guidance"])
        a = sess.cache[site]  # [calls, 2n, ...] with the uncond half first
        acts.append(a[:, len(prompts):].float().mean(0))
    a = torch.stack(acts).mean(0)
    return a.flatten(2).mean(-1) if a.dim() >= 4 else a


def run_diffusion(pipe, cfg: Preset, out: Path) -> dict:
    import numpy as np
    import torch

    import interp
    from interp.zoo import scorers
    from interventions import steering as S

    x = cfg.extra
    den = interp.attach(getattr(pipe, "unet", None) or pipe.transformer)
    pos_p, _ = shapes_prompts(x["positive"])
    neg_p, _ = shapes_prompts(x["negative"])
    p = diffusion_activations(den, pipe, cfg.site, pos_p, x)
    n = diffusion_activations(den, pipe, cfg.site, neg_p, x)
    spatial = "keep" if cfg.reduce == "keep" else "average"
    sv = S.from_activations(p, n, cfg.site, method=cfg.method, znorm=x["znorm"], spatial=spatial, model=cfg.model,
                            meta={"positive": x["positive"], "negative": x["negative"]}, hash_of=(pos_p, neg_p, x))
    vecs = S.controls(sv, p, n, seed=x["seed"])
    base_p, shapes = shapes_prompts(x["base"])
    ref_hue = 0.0 if x["positive"] == "red" else None
    images: dict[tuple[str, float], torch.Tensor] = {}

    def measure(v, a):
        with v.apply(den, a, steps=x["window"], steps_from=""):  # one denoiser call per step (CFG batched)
            imgs = torch.cat([sample(pipe, base_p, s, x["n_steps"], x["guidance"]) for s in range(x["seeds"])])
        images[(v.method if v is not sv else "steer", a)] = imgs
        h = scorers.hue(imgs)
        # unwrap around the base colour so the red (360) side and the blue (240) side are ordered
        from interp.zoo.shapes import HUES
        centre = HUES[x["base"]]
        hu = (h - centre + 180.0) % 360.0 - 180.0 + centre
        acc = float(np.mean([a_ == b_ for a_, b_ in zip(scorers.shape(imgs), shapes * x["seeds"])]))
        red = scorers.colour_rate(imgs, x["positive"])
        return {"hue": float(np.nanmean(hu)), "shape_accuracy": acc, f"{x['positive']}_rate": red}

    res = S.dose_response(vecs, cfg.alphas, measure, metric="hue", extra=("shape_accuracy", f"{x['positive']}_rate"))
    rep = _finish(res, vecs, cfg, out, f"{cfg.model} {cfg.site}: hue of '{x['base']}' prompts vs alpha", quantity="hue")
    acc = res.sel(vector="steer", quantity="shape_accuracy").values
    a0 = cfg.alphas.index(0.0) if 0.0 in cfg.alphas else 0
    rep["shape_accuracy"] = {"per_alpha": acc.tolist(), "max_drop_points": float(100 * (acc[a0] - acc.min()))}
    rep["colour_rate"] = res.sel(vector="steer", quantity=f"{x['positive']}_rate").values.tolist()
    plain = torch.cat([sample(pipe, base_p, s, x["n_steps"], x["guidance"]) for s in range(x["seeds"])])
    rep["alpha0_bitwise_identical"] = bool(torch.equal(plain, images[("steer", 0.0)])) if 0.0 in cfg.alphas else None
    grid = torch.cat([images[("steer", a)][:len(shapes)] for a in cfg.alphas])
    interp.image_grid(grid, out / "samples.png", labels=[f"a={a:g} {s}" for a in cfg.alphas for s in shapes],
                      ncol=len(shapes), title=f"steer {x['positive']} - {x['negative']} on '{x['base']}' prompts")
    rep["samples"] = str(out / "samples.png")
    rep["verdict"] = _verdict(rep) + f"; shape accuracy drop {rep['shape_accuracy']['max_drop_points']:.1f} points"
    return rep
