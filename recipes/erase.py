"""`interp erase`: erase a concept from a text-to-image pipeline and write the edited checkpoint.

    interp erase shapes-diffusion --concept red --method uce --out erased/uce
    interp erase shapes-diffusion --concept red --method all --report interp-out/erase-red   # every method, report only
    interp erase ./my-sd-folder --concept "van gogh" --guide "a painter" --prompts prompts.txt \\
        --method quickfix --out out/

Methods: uce, time, locoedit (window chosen by an edit sweep unless --layers), quickfix (Diff-QuickFix), leace,
hirm (UNet pipelines); context (SD3 / Flux). On the shapes zoo models the prompts are every caption and the
guides the concept's siblings (the other colours); elsewhere pass --prompts (one per line) and --guide.
The checkpoint is written in the diffusers save_pretrained layout with interp_edit.json; the source is
never written to unless --in-place (a backup is kept). --report measures efficacy and specificity with the
zoo's scorers (shapes models) and writes erasure_report.json + erasure_grid.png.
"""
from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch

UNET_METHODS = ("uce", "time", "locoedit", "quickfix", "leace", "hirm")
TRANSFORMER_METHODS = ("context",)


def _load(spec: str):
    """(pipeline, source folder) for a zoo name or a folder; a folder is checked before it is loaded
    (complete safetensors files, its manifest's hashes if interp wrote it, finite parameters)."""
    from interp.zoo.catalog import ENTRIES, weights_path
    from interventions.checkpoint import NotACheckpointError, check_finite, verify_folder

    if spec in ENTRIES:
        from interp import zoo

        return zoo.load(spec), weights_path(spec)
    path = Path(spec).expanduser()
    if not path.exists() and (spec.startswith(("/", "./", "../", "~")) or spec in (".", "..")):
        raise NotACheckpointError(f"no model folder at {path}: check the path "
                                  f"(zoo names: {list(ENTRIES)})")
    if path.exists():
        verify_folder(path)
    from recipes.models import load

    pipe = load(str(path) if path.exists() else spec)
    if path.exists():
        check_finite(pipe, path)
    return pipe, (path if path.exists() else None)


def _source_path(spec: str) -> Path | None:
    """The folder a model spec names (a zoo model's weights folder), or None (a hub name)."""
    from interp.zoo.catalog import ENTRIES, weights_path

    if spec in ENTRIES:
        return weights_path(spec)
    path = Path(spec).expanduser()
    return path if path.exists() else None


def _check_methods(args, methods, source) -> None:
    unknown = [m for m in methods if m not in UNET_METHODS + TRANSFORMER_METHODS]
    if unknown:
        raise SystemExit(f"interp erase: unknown method(s) {unknown}; choose from "
                         f"{list(UNET_METHODS + TRANSFORMER_METHODS)} or all")
    if args.in_place and len(methods) != 1:
        raise SystemExit("interp erase: --in-place writes one checkpoint: pass exactly one --method")
    if args.in_place and source is None:
        raise SystemExit("interp erase: --in-place needs a model loaded from a folder")


def _check_settings(args) -> None:
    """One-line errors for settings that could only give NaN results or lose data (exit code 2)."""
    from interventions.erasure import ErasureInputError

    if args.lam is not None and not (math.isfinite(args.lam) and args.lam >= 0):
        raise ErasureInputError(f"--lam must be a finite number >= 0, got {args.lam}")
    for name in ("hirm_steps", "window", "n_per_prompt", "eval_prompts", "threads"):
        value = getattr(args, name)
        if value < (0 if name == "eval_prompts" else 1):
            raise ErasureInputError(f"--{name.replace('_', '-')} must be "
                                    f"{'>= 0' if name == 'eval_prompts' else '>= 1'}, got {value}")
    if args.steps is not None and args.steps < 1:
        raise ErasureInputError(f"--steps must be >= 1, got {args.steps}")
    if args.in_place and args.out:
        raise ErasureInputError("--in-place replaces the source itself; do not also pass --out")


def _destinations(args, methods, source) -> dict:
    """method -> checked destination folder (before any fitting, so a refused --out costs nothing)."""
    from interventions.checkpoint import CheckpointWriteError, check_destination

    if args.in_place:
        from interp.zoo.catalog import WEIGHTS_DIR

        if WEIGHTS_DIR.resolve() in Path(source).resolve().parents:
            raise CheckpointWriteError(f"--in-place would replace the shipped zoo weights {source}: "
                                       "copy the folder and erase the copy in place, or write to --out")
        return {methods[0]: check_destination(source, source, in_place=True)}
    if not args.out:
        return {}
    dests = {m: Path(args.out) if len(methods) == 1 else Path(args.out) / m for m in methods}
    return {m: check_destination(d, source, overwrite=args.overwrite) for m, d in dests.items()}


def _concept(args, pipe):
    from interventions.erasure import Concept
    from interventions.erasure.report import shapes_concept

    if args.prompts:
        prompts = [l.strip() for l in Path(args.prompts).read_text().splitlines() if l.strip()]
        if not args.guide:
            raise SystemExit("interp erase: --guide is required with --prompts (what the concept should become)")
        preserve = ([l.strip() for l in Path(args.preserve).read_text().splitlines() if l.strip()]
                    if args.preserve else ())
        return Concept.from_prompts(args.concept, prompts, args.guide, preserve), False
    try:
        return shapes_concept(args.concept, args.guide), True
    except ValueError as e:
        raise SystemExit(f"interp erase: {e}. For a model other than the shapes zoo models "
                         "pass --prompts and --guide.") from None


def _method_kwargs(method: str, args) -> dict:
    kw = {}
    if args.lam is not None and method in ("uce", "time", "locoedit", "quickfix", "context"):
        kw["lam"] = args.lam
    if method == "hirm":
        kw.update(steps=args.hirm_steps, progress=not args.quiet and args.progress)
    if method == "leace" and args.leace_site:
        kw["site"] = args.leace_site
    if method == "leace":
        kw["contrast"] = args.leace_contrast
    if method == "time" and args.preserve_time:
        kw["preserve"] = True
    return kw


def run(args) -> dict:
    from interventions.checkpoint import write_checkpoint
    from interventions.erasure import choose_window, erase
    from interventions.erasure import report as R

    _check_settings(args)
    torch.set_num_threads(args.threads)
    early = _source_path(args.model)
    if args.method != ["all"]:  # refuse a bad destination before loading or fitting anything
        _check_methods(args, args.method, early)
        _destinations(args, args.method, early)
    pipe, source = _load(args.model)
    concept, is_shapes = _concept(args, pipe)
    has_transformer = hasattr(pipe, "transformer") and getattr(pipe, "transformer", None) is not None
    kind = TRANSFORMER_METHODS if has_transformer else UNET_METHODS
    methods = list(kind) if args.method == ["all"] else args.method
    _check_methods(args, methods, source)
    dests = _destinations(args, methods, source)
    report: dict = {"model": args.model, "concept": concept.describe(), "methods": {}, "settings": vars(args).copy()}
    report["settings"].pop("func", None)
    evaluate = args.report is not None and is_shapes and args.eval_prompts > 0
    probe = R.ValueProbe(pipe, args.concept, args.seed) if args.report is not None and is_shapes and \
        hasattr(pipe, "unet") and not args.no_probe else None
    if probe is not None:
        about = (R.ValueProbe.__doc__ or "").split(chr(10))[0] + " ..."
        report["value_probe"] = {"about": about, "held_out_accuracy_original": probe.held_out_accuracy,
                                 "original": probe.original}
    if args.report is not None and not is_shapes:
        print("interp erase: --report needs a shapes zoo model (the scorers know its attributes); skipping the report")
    if evaluate:
        attrs = R.eval_attributes(args.eval_prompts, seed=args.seed)
        prompts = [a.caption() for a in attrs]
        t0 = time.time()
        imgs0 = R.generate(pipe, prompts, args.n_per_prompt, args.seed, args.steps)
        before = R.summarize(R.score_images(imgs0, attrs, args.n_per_prompt), args.concept)
        report["original"] = {**before, "generate_s": round(time.time() - t0, 1)}
        print(f"original: {args.concept} rate {before['concept_rate']:.3f}, accuracy {before['accuracy_all']}")
        cols = list(range(0, len(prompts) * args.n_per_prompt, args.eval_prompts * args.n_per_prompt // 2 * 1))
        rows = {"original": imgs0[cols]}
    for method in methods:
        t0 = time.time()
        kw = _method_kwargs(method, args)
        if method == "locoedit":
            if args.layers:
                kw["layers"] = args.layers
            elif is_shapes:
                src = list(concept.sources[::max(1, len(concept.sources) // 8)])[:8]

                def score(p, src=src):
                    from interp.zoo import scorers

                    imgs = R.generate(p, src, 2, args.seed + 7, args.steps)
                    if R.shapes_attribute(args.concept) == "colour":
                        return scorers.colour_rate(imgs, args.concept)
                    return float(sum(s == args.concept for s in scorers.shape(imgs)) / (2 * len(src)))

                kw["layers"], trace = choose_window(pipe, concept, args.window, score, lam=kw.pop("lam", 0.5))
                report.setdefault("locoedit_trace", trace)
            else:
                raise SystemExit("interp erase: locoedit needs --layers on models without scorers")
        try:
            edit = erase(pipe, concept, method, **kw)
        except (ValueError, KeyError, IndexError) as e:
            raise SystemExit(f"interp erase: {method}: {e}") from e
        edited = edit.applied(pipe)
        entry = {"edit": edit.manifest(), "fit_s": round(time.time() - t0, 2)}
        if method in dests:
            written = write_checkpoint(edited, dests[method], edit, source=source, in_place=args.in_place,
                                       overwrite=args.overwrite)
            entry["checkpoint"] = str(written)
            print(f"{method}: wrote {written}")
            if args.check_plain:
                from interventions.checkpoint import plain_diffusers_check

                chk = plain_diffusers_check(edited, written, list(concept.sources[:4]), args.seed, args.steps or 10)
                entry["plain_diffusers_check"] = chk
                print(f"{method}: plain diffusers load: {chk}")
        if probe is not None:
            entry["value_probe"] = vp = probe.score(edited)
            po = probe.original
            print(f"{method}: value probe {args.concept} rate {po['concept_rate']:.3f} -> {vp['concept_rate']:.3f}, "
                  f"other values' accuracy {po['other_values_accuracy']:.3f} -> {vp['other_values_accuracy']:.3f}")
        if evaluate:
            t1 = time.time()
            imgs = R.generate(edited, prompts, args.n_per_prompt, args.seed, args.steps)
            after = R.summarize(R.score_images(imgs, attrs, args.n_per_prompt), args.concept)
            cmp = R.compare(before, after, args.concept)
            entry.update(after=after, comparison=cmp, generate_s=round(time.time() - t1, 1))
            rows[method] = imgs[cols]
            print(f"{method}: {args.concept} rate {cmp['concept_rate_before']:.3f} -> {cmp['concept_rate_after']:.3f} "
                  f"(drop {cmp['relative_drop']:.0%}), "
                  f"other values' accuracy {cmp['other_values_accuracy_change']:+.3f}, "
                  f"other attributes {({k: round(v, 3) for k, v in cmp['other_attribute_accuracy_change'].items()})} "
                  f"-> efficacy {'ok' if cmp['efficacy_ok'] else 'NOT met'}, "
                  f"specificity {'ok' if cmp['specificity_ok'] else 'NOT met'}")
        del edited
        report["methods"][method] = entry
    if args.report is not None:
        out = Path(args.report)
        path = R.write_report(report, out)
        res = R.to_result(report)
        res.save(out / "erasure_result")
        res.plot(out / "erasure_table.png", title=f"erasing {args.concept!r}", cmap="viridis", center=False)
        print(f"report: {path} (+ erasure_result.json/.safetensors, erasure_table.png)")
        if evaluate:
            labels = [prompts[c // args.n_per_prompt].replace(", ", "\n") for c in cols]
            png = R.grid(rows, out / "erasure_grid.png", labels,
                         f"erasing {args.concept!r}: original and each method (same seeds)")
            print(f"grid: {png}")
    return report


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="zoo name (shapes-diffusion, shapes-flow) or a diffusers folder")
    p.add_argument("--concept", required=True, help="the word to erase, as written in the prompts (e.g. red)")
    p.add_argument("--method", nargs="+", default=["uce"],
                   help=f"one or more of {UNET_METHODS + TRANSFORMER_METHODS}, or all")
    p.add_argument("--guide", nargs="+", default=None,
                   help="what the concept becomes (default on shapes: its siblings)")
    p.add_argument("--prompts", default=None,
                   help="text file, one prompt per line (those naming the concept are edited)")
    p.add_argument("--preserve", default=None,
                   help="text file of prompts to preserve (default: the prompts without the concept)")
    p.add_argument("--lam", type=float, default=None,
                   help="ridge lambda (default per method: uce 0.5, time 0.1, quickfix 0.01)")
    p.add_argument("--layers", type=int, nargs="+", default=None,
                   help="locoedit: cross-attention layer indices (forward order)")
    p.add_argument("--window", type=int, default=2, help="locoedit: window size for the edit sweep")
    p.add_argument("--leace-site", choices=("cross_attention", "text_encoder"), default=None)
    p.add_argument("--leace-contrast", choices=("all", "aligned", "offsets"), default="offsets",
                   help="leace: the concept's tokens against the other prompts' tokens at each position "
                        "from the concept word on, positions' own means taken out (offsets, default); "
                        "against all other tokens (all); "
                        "against the other prompts' tokens at the same positions, pooled (aligned)")
    p.add_argument("--preserve-time", action="store_true", help="time: also use the preservation list")
    p.add_argument("--hirm-steps", type=int, default=200)
    p.add_argument("--out", default=None, help="checkpoint folder (a sub-folder per method when several)")
    p.add_argument("--check-plain", action="store_true",
                   help="after writing, load each checkpoint with plain diffusers in a fresh process "
                        "and compare images")
    p.add_argument("--in-place", action="store_true", help="replace the source checkpoint (a backup is kept)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder (never the source)")
    p.add_argument("--report", default=None, help="folder for erasure_report.json and erasure_grid.png")
    p.add_argument("--eval-prompts", type=int, default=8,
                   help="report: captions per colour (0: no images, fit and write only)")
    p.add_argument("--n-per-prompt", type=int, default=2, help="report: images per caption")
    p.add_argument("--steps", type=int, default=None, help="report: denoising steps (default: the pipeline's)")
    p.add_argument("--no-probe", action="store_true", help="report: skip the cross-attention value probe")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--progress", action="store_true", help="progress bar for the HiRM fine-tune")


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("erase", help="erase a concept from a text-to-image model and write the checkpoint",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.set_defaults(func=cli)
    return p


def cli(args) -> int:
    run(args)
    return 0


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m recipes.erase", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    main()
