"""`interp trace`: ROME-style causal tracing (or activation patching) of a language model.

    interp trace --model smollm2 --prompt "The Eiffel Tower is located in the city of" \\
                 --subject "Eiffel Tower" --target " Paris"

writes one heatmap PNG per kind (single hidden states, MLP windows, attention windows), each
Result as JSON + safetensors, all numbers in one CSV and a summary JSON with the peaks. With
`--corrupted PROMPT` it runs activation-patching sweeps (clean -> corrupted) instead of noise.

`--model` takes a zoo name, a local Hugging Face folder or a hub name (needs the network). A
diffusers pipeline is handed to `recipes.trace_diffusion.run(args, pipe)`.
"""
from __future__ import annotations

import importlib
import json
import time
from pathlib import Path

PATCH_KINDS = ("resid_pre", "attn.out", "mlp.out", "attn.z")


def register(sub) -> None:
    p = sub.add_parser("trace", help="causal tracing / activation patching of a model, as heatmaps + JSON + CSV")
    p.add_argument("--model", default="smollm2", help="zoo name, local folder or hub name (default: %(default)s)")
    p.add_argument("--prompt", default="The Eiffel Tower is located in the city of", help="clean prompt")
    p.add_argument("--subject", default=None, help="subject text inside the prompt, corrupted with noise "
                   "(default: %(default)s; required unless --corrupted is given)")
    p.add_argument("--target", default=None, help="answer token, e.g. ' Paris' (default: the clean run's top token)")
    p.add_argument("--out", default="interp-out/trace", help="output folder (default: %(default)s)")
    p.add_argument("--samples", type=int, default=None, help="noise samples, held in one batch (default: 10 for a "
                   "language model, 2 for a pipeline)")
    p.add_argument(
        "--noise", type=float, default=3.0, help="noise std as a multiple of the embedding std (default: %(default)s)"
    )
    p.add_argument("--seed", type=int, default=0, help="first noise seed (default: %(default)s)")
    p.add_argument("--seeds", type=int, default=3, help="language models: noise seeds seed..seed+N-1; maps are the "
                   "mean over seeds with a 95%% t interval (default: %(default)s)")
    p.add_argument("--window", type=int, default=10,
                   help="consecutive MLP / attention layers restored at once (default: %(default)s)")
    p.add_argument("--state", default="resid_post", choices=("resid_post", "resid_pre"),
                   help="hidden state restored (default: %(default)s)")
    p.add_argument("--kinds", default=None, help="comma list; tracing: hidden,mlp,attn; patching: "
                   f"{','.join(PATCH_KINDS)} (default: all)")
    p.add_argument("--layers", default=None, help="layer subset, e.g. '0-9' or '3,5,7' (default: all)")
    p.add_argument(
        "--corrupted", default=None, help="corrupted prompt: run activation patching instead of noise tracing"
    )
    p.add_argument("--foil", default=None, help="with --corrupted: the foil token for a logit-difference metric")
    p.add_argument("--metric", default=None, choices=("logit_diff", "prob", "kl"),
                   help="with --corrupted (default: logit_diff with --foil, else prob)")
    try:  # the diffusion branch adds its own options, if installed
        extra = importlib.import_module("recipes.trace_diffusion")
    except ModuleNotFoundError as e:
        if e.name != "recipes.trace_diffusion":
            raise
        extra = None
    if extra is not None and hasattr(extra, "add_arguments"):
        extra.add_arguments(p)
    p.set_defaults(func=run)


def is_pipeline(obj) -> bool:
    """A diffusers pipeline (stock or a subclass such as the zoo's): the adapter's own test, by class hierarchy."""
    from interp.adapters.pipeline import is_pipeline as _is_pipeline

    return _is_pipeline(obj)


def parse_layers(spec: str | None, n_layers: int) -> list[int] | None:
    """'0-9', '3,5,7' or '0-3,10' -> layer list (checked against n_layers)."""
    if not spec:
        return None
    out = []
    for part in spec.split(","):
        part = part.strip()
        try:
            if "-" in part:
                a, b = part.split("-")
                out += list(range(int(a), int(b) + 1))
            else:
                out.append(int(part))
        except ValueError:
            raise ValueError(f"--layers {spec!r}: write layers as '0-9' or '3,5,7'") from None
    bad = [l for l in out if not 0 <= l < n_layers]
    if bad:
        raise ValueError(f"--layers {spec!r}: layers {bad} do not exist; the model has layers 0..{n_layers - 1}")
    return out


def run(args) -> int:
    from recipes.models import load

    obj = load(args.model)
    if is_pipeline(obj):
        try:
            mod = importlib.import_module("recipes.trace_diffusion")
        except ModuleNotFoundError as e:
            if e.name != "recipes.trace_diffusion":
                raise
            print(f"interp trace: {args.model!r} is a diffusers pipeline, and diffusion tracing "
                  "(recipes/trace_diffusion.py) is not installed in this checkout")
            return 2
        return mod.run(args, obj)
    if args.samples is None:
        args.samples = 10
    return run_lm(args, obj)


def check_word(tokenizer, word: str | None, option: str) -> None:
    """Warn (stderr) when `word` has no leading space although ' word' is a single token too: in the middle of a
    sentence the model predicts ' Paris', not 'Paris', and they are different tokens."""
    import sys

    if word is None or tokenizer is None or word.startswith(" ") or not word.strip():
        return
    ids = tokenizer(" " + word, add_special_tokens=False)["input_ids"]
    if len(ids) == 1 and len(tokenizer(word, add_special_tokens=False)["input_ids"]) == 1:
        print(f"interp trace: warning: {option} {word!r} has no leading space; {' ' + word!r} is a different "
              f"single token (the usual one after a word). Pass {option} {' ' + word!r} if that is what you mean.",
              file=sys.stderr)


def _kinds(spec, allowed, default):
    if spec is None:
        return list(default)
    kinds = [k.strip() for k in spec.split(",") if k.strip()]
    bad = [k for k in kinds if k not in allowed]
    if bad:
        raise ValueError(f"--kinds: unknown {bad}; choose from {list(allowed)}")
    return kinds


def run_lm(args, model) -> int:
    import torch

    import interp

    torch.set_grad_enabled(False)
    t0 = time.perf_counter()
    lm = interp.attach(model)
    layers = parse_layers(args.layers, lm.n_layers)
    check_word(lm.tokenizer, args.target, "--target")
    check_word(lm.tokenizer, args.foil, "--foil")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.corrupted is None:
        results, summary = _trace(lm, args, layers)
    else:
        results, summary = _patch(lm, args, layers)
    frames = []
    for kind, res in results.items():
        stem = kind.replace(".", "_")
        res.save(out / stem)
        res.plot(out / f"{stem}.png", title=res.attrs.get("title"), center=args.corrupted is not None,
                 cmap="RdBu_r" if args.corrupted is not None else
                 {"hidden": "Purples", "mlp": "Greens", "attn": "Reds"}.get(kind, "viridis"))
        df = res.to_dataframe()
        df.insert(0, "kind", kind)
        frames.append(df)
    import pandas as pd

    pd.concat(frames).to_csv(out / "effects.csv", index=False)
    summary["seconds"] = round(time.perf_counter() - t0, 2)
    summary["command"] = getattr(args, "command_line", None)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    for line in summary["lines"]:
        print(line)
    print(f"heatmaps, JSON and CSV in {out}/ ({summary['seconds']:.1f} s)")
    return 0


def _trace(lm, args, layers):
    from interventions.tracing import trace

    if not args.subject:
        raise ValueError("interp trace needs --subject (the text whose token embeddings are corrupted), "
                         "or --corrupted PROMPT for activation patching")
    kinds = _kinds(args.kinds, ("hidden", "mlp", "attn"), ("hidden", "mlp", "attn"))
    t0 = time.perf_counter()
    if args.seeds < 1:
        raise ValueError(f"--seeds {args.seeds}: give at least 1 noise seed")
    tr = trace(lm, args.prompt, args.subject, args.target, kinds=kinds, state=args.state, window=args.window,
               samples=args.samples, noise=args.noise, seed=args.seed, seeds=args.seeds, layers=layers)
    seconds = time.perf_counter() - t0
    lines = [f"prompt {args.prompt!r}, subject {args.subject!r}, target {tr.target!r}: "
             f"p_clean {tr.p_clean:.4f}, p_corrupted {tr.p_corrupted:.4f} ({args.samples} noise samples x "
             f"{args.seeds} seeds)",
             f"traced {tr.stats['rows']} restorations x {args.samples} samples in {seconds:.1f} s "
             f"({tr.stats['forward_equivalents']:.0f} forward equivalents of the {args.samples}-prompt batch)"]
    peaks = {}
    for kind in kinds:
        layer, tok, v = tr.peak(kind)
        res = tr.results[kind]
        li, pi = res.coord("layer").index(layer), res.coord("pos").index(tok)
        lo, hi = float(res.attrs["ci_low"][li, pi]), float(res.attrs["ci_high"][li, pi])
        peaks[kind] = {"layer": layer, "token": tok, "indirect_effect": v, "ci95": [lo, hi],
                       "per_seed_peak": res.attrs["per_seed_peak"]}
        lines.append(f"largest {kind:6s} restoration effect {v:+.4f} (95% CI {lo:+.4f}..{hi:+.4f} over "
                     f"{args.seeds} seeds) at layer {layer}, token {tok!r}")
    summary = {"mode": "causal tracing", "model": args.model, "prompt": args.prompt, "subject": args.subject,
               "target": tr.target, "p_clean": tr.p_clean, "p_corrupted": tr.p_corrupted, "samples": args.samples,
               "noise": args.noise, "seed": args.seed, "seeds": args.seeds, "window": args.window, "peaks": peaks,
               "grid": tr.stats,
               "trace_seconds": round(seconds, 2), "torch_threads": __import__("torch").get_num_threads(),
               "lines": lines}
    return tr.results, summary


def _patch(lm, args, layers):
    from interventions.patching import head_sweep, make_metric, patch_sweep

    kinds = _kinds(args.kinds, PATCH_KINDS, PATCH_KINDS)
    name = args.metric or ("logit_diff" if args.foil else "prob")
    target = args.target
    if target is None and name != "kl":
        top = int(lm.run(args.prompt, last_only=True).logits[0, -1].argmax())
        target = top
    metric = make_metric(name, lm, args.prompt, target, args.foil)
    results, lines, peaks = {}, [], {}
    for kind in kinds:
        if kind == "attn.z":
            res = head_sweep(lm, args.prompt, args.corrupted, metric, layers=layers)
        else:
            res = patch_sweep(lm, args.prompt, args.corrupted, kind, metric, layers=layers)
        what = {"logit_diff": f"logit diff {target!r} - {args.foil!r}", "prob": f"p({target!r})",
                "kl": "KL to the clean next-token distribution"}[name]
        res.attrs["title"] = (f"patch {kind}, clean {args.prompt!r} -> corrupted {args.corrupted!r}: "
                              f"normalised {what} (1 = clean, 0 = corrupted)")
        results[kind] = res
        where, v = res.top(1)[0]
        peaks[kind] = {**where, "normalised_effect": v}
        lines.append(f"largest {kind:9s} patching effect {v:+.3f} at {where}")
    summary = {"mode": "activation patching", "model": args.model, "clean": args.prompt,
               "corrupted": args.corrupted, "metric": name, "peaks": peaks, "lines": lines}
    return results, summary
