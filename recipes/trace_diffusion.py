"""`interp trace` on a diffusers pipeline: Diff-QuickFix-style causal tracing of an attribute.

    interp trace --model shapes-diffusion --prompt "a small red circle on the left, solid" --subject red \\
                 --score colour=red --steps 10 --windows steps --out interp-out/trace-red

Writes heatmaps (text layer x token per text encoder and state kind; denoiser component x step window;
per-token influence D_t over steps), every Result as JSON + safetensors, one CSV with all cells, an image
grid (clean / corrupted / best restored) and summary.json with the peaks. `recipes.trace` hands pipelines
here (`run(args, pipe)`); `python -m recipes.trace_diffusion --model ... --subject ...` works alone too.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

LM_DEFAULT_PROMPT = "The Eiffel Tower is located in the city of"
# a training caption of the zoo models (every attribute named, size word included); the held-out captions
# (interp.zoo.shapes.held_out_attributes) include "a small red circle on the left, solid"
DEFAULT_PROMPT = "a large red circle on the left, solid"
# first-run defaults for pipelines: about a minute on two CPU cores (see the epilog for a full run)
QUICK = {"samples": 2, "steps": 6, "windows": "2"}
FULL_HINT = ("for a finer map ask for more: --steps 50 --windows steps --samples 8 --influence "
             "(takes far longer; each option multiplies the work)")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options for pipelines (added to `interp trace`)."""
    g = p.add_argument_group("diffusion pipelines")
    g.add_argument("--steps", type=int, default=None, help=f"denoising steps (default: {QUICK['steps']})")
    g.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the pipeline's)")
    g.add_argument("--windows", default=None, help="step windows for denoiser restoration: 'steps' (each step), "
                   f"an int k (k windows) or '0-2,3-5' (default: {QUICK['windows']}); all steps are always included")
    g.add_argument("--components", default=None, help="denoiser sites or wildcards, comma separated "
                   "(default: ResNets, self- and cross-attention; DiT attention / MLP per stream)")
    g.add_argument("--text-kinds", default="resid_post", help="text-encoder states restored per layer x token, "
                   "comma list of resid_post, attn.out, mlp.out (default: %(default)s)")
    g.add_argument("--score", default=None, help="zoo scorer metric ATTRIBUTE=VALUE, e.g. colour=red (1 if the "
                   "scorer reads VALUE), or hue=red (cos of the hue difference, continuous) "
                   "(default: the denoiser-output distance to the clean run)")
    g.add_argument("--clip", default=None, help="folder of a transformers CLIPModel + CLIPProcessor: CLIP score "
                   "of the images against --subject as the metric")
    g.add_argument("--budget-mb", type=int, default=1024, help="memory budget of one batched sampling loop "
                   "(default: %(default)s)")
    g.add_argument("--influence", action="store_true", help="also compute the per-token influence D_t map "
                   "(one extra sampling loop per prompt token)")
    g.add_argument("--no-influence", action="store_true", help=argparse.SUPPRESS)  # the old default; now implied


def _windows(spec: str):
    if spec == "steps":
        return "steps"
    if spec.isdigit():
        return int(spec)
    out = []
    try:
        for part in spec.split(","):
            a, _, b = part.partition("-")
            out.append((int(a), int(b or a) + 1))
    except ValueError:
        raise ValueError(f"--windows {spec!r}: write 'steps', a number of windows (e.g. 3) or step ranges "
                         "such as '0-2,3-5'") from None
    return out


def quick_defaults(args) -> list[str]:
    """Fill the pipeline defaults (QUICK) into options left unset; returns the names filled in."""
    filled = []
    for name, value in QUICK.items():
        if getattr(args, name, None) is None:
            setattr(args, name, value)
            filled.append(name)
    return filled


def _metric(args, lm):
    from interventions.diffusion_tracing import attribute_metric, clip_score, hue_metric

    if args.score and args.clip:
        raise ValueError("choose one metric: --score or --clip")
    if args.score:
        attr, _, value = args.score.partition("=")
        if not value:
            raise ValueError(f"--score {args.score!r}: write ATTRIBUTE=VALUE, e.g. colour=red")
        if attr == "hue":
            return hue_metric(value), f"cos(hue - hue({value}))"
        return attribute_metric(attr, value), f"{attr}=={value}"
    if args.clip:
        from transformers import CLIPModel, CLIPProcessor

        model = CLIPModel.from_pretrained(args.clip).eval()
        return clip_score(model, CLIPProcessor.from_pretrained(args.clip), args.subject), "CLIP score"
    return "pred", "denoiser-output distance"


def run(args, pipe) -> int:
    import interp
    from interp.diffusion import Sampling, token_influence
    from interventions.diffusion_tracing import trace_diffusion

    prompt = DEFAULT_PROMPT if args.prompt in (None, LM_DEFAULT_PROMPT) else args.prompt
    if not args.subject:
        raise ValueError("a pipeline needs --subject: the attribute words to corrupt, e.g. "
                         f"--prompt {DEFAULT_PROMPT!r} --subject red")
    if args.subject not in prompt:
        raise ValueError(f"--subject {args.subject!r} is not in the prompt {prompt!r}")
    quick = quick_defaults(args)
    lm = interp.attach(pipe)
    metric, metric_name = _metric(args, lm)
    comps = None
    if args.components:
        comps = [s.name for pat in args.components.split(",") for s in lm.sites(pat.strip())]
    from recipes.trace import parse_layers

    n_text = len(lm.sites(f"{lm.adapter.text_components[0]}.blocks.*.resid_post")) if lm.adapter.text_components else 0
    layers = parse_layers(args.layers, n_text) if n_text else None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    tr = trace_diffusion(pipe, prompt, args.subject, samples=args.samples, seed=args.seed, steps=args.steps,
                         guidance=args.guidance, noise=args.noise, metric=metric,
                         text_kinds=tuple(k.strip() for k in args.text_kinds.split(",")), text_layers=layers,
                         components=comps, windows=_windows(args.windows), memory_budget=args.budget_mb << 20)
    paths = {k: str(v) for k, v in tr.save(out).items()}
    influence = None
    if args.influence and not args.no_influence:
        spec = Sampling([prompt] * min(args.samples, 4), seed=args.seed, steps=args.steps, guidance=args.guidance)
        influence = token_influence(pipe, spec)
        paths["influence"] = str(influence.save(out / "trace_influence"))
        paths["influence.png"] = str(influence.plot(out / "trace_influence.png", cmap="viridis", center=False,
                                                    title=f"per-token influence D_t ({influence.attrs['prediction']})"))
    frames = [r.to_dataframe("effect").assign(map=name) for name, r in
              {**{f"text.{k}": v for k, v in tr.text.items()}, "denoiser": tr.denoiser}.items() if r is not None]
    if frames:
        import pandas as pd

        pd.concat(frames, ignore_index=True).to_csv(out / "trace_cells.csv", index=False)
        paths["csv"] = str(out / "trace_cells.csv")
    summary = {"model": getattr(args, "model", None), "prompt": prompt, "subject": args.subject, "metric": metric_name,
               "clean_metric": tr.clean_metric, "corrupted_metric": tr.corrupted_metric, "samples": args.samples,
               "noise": args.noise, "seconds": round(time.time() - t0, 1), "grid": tr.stats,
               "top": [{"map": m, **{k: str(v) for k, v in w.items()}, "effect": e} for m, w, e in tr.top(10)],
               "influence_top": influence.top(5) if influence is not None else None, "files": paths,
               "command": getattr(args, "command_line", None)}
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    print(f"traced {args.subject!r} in {prompt!r}: {tr.stats['cells']} restorations in {summary['seconds']} s "
          f"(metric {metric_name}: clean {tr.clean_metric:.3f}, corrupted {tr.corrupted_metric:.3f})")
    for m, w, e in tr.top(5):
        print(f"  {e:+.3f}  {m}  {w}")
    print(f"wrote {out}/ (summary.json, heatmaps, trace_images.png)")
    if quick:
        print(f"quick defaults ({', '.join(f'--{k} {QUICK[k]}' for k in quick)}); {FULL_HINT}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m recipes.trace_diffusion", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="zoo name (shapes-diffusion, shapes-flow) or a diffusers folder")
    p.add_argument("--prompt", default=DEFAULT_PROMPT)
    p.add_argument("--subject", required=True, help="attribute words to corrupt, e.g. red")
    p.add_argument("--out", default="interp-out/trace-diffusion")
    p.add_argument("--samples", type=int, default=None)
    p.add_argument("--noise", type=float, default=3.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--layers", default=None)
    p.add_argument("--weights", default=None, help="with a zoo name: load these weights instead of the shipped ones "
                   "(e.g. a training run's folder)")
    add_arguments(p)
    args = p.parse_args(argv)
    if args.weights:
        from interp.zoo.catalog import load_trained

        return run(args, load_trained(args.model, path=args.weights))
    from recipes.models import load

    return run(args, load(args.model))


if __name__ == "__main__":
    raise SystemExit(main())
