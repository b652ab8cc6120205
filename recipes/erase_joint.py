"""Erasure on shapes-flow's joint attention: efficacy and collateral of each joint method, checkpoints written.

    python -m recipes.erase_joint --concept red --out interp-out/erase-joint --eval-prompts 4 --n-per-prompt 2

For each method of interventions/erasure/joint.py: fit, write the edited pipeline with
interventions.checkpoint.write_checkpoint (temp folder, verified, renamed), reload it, and score images of
`eval-prompts` captions per colour (the scorers of recipes/erase.py: the concept rate on prompts naming it, the
other colours' accuracy and every other attribute's accuracy). Writes report.json.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m recipes.erase_joint")
    ap.add_argument("--concept", default="red")
    ap.add_argument("--methods", nargs="+", default=["context_leace", "joint_kv", "joint"])
    ap.add_argument("--out", default="interp-out/erase-joint")
    ap.add_argument("--eval-prompts", type=int, default=4)
    ap.add_argument("--n-per-prompt", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    import interp
    from interp.zoo.catalog import weights_path
    from interventions.checkpoint import reload, write_checkpoint
    from interventions.erasure import joint as J
    from interventions.erasure import report as R

    pipe = interp.zoo.load("shapes-flow")
    concept = R.shapes_concept(args.concept)
    attrs = R.eval_attributes(args.eval_prompts, seed=args.seed)
    prompts = [a.caption() for a in attrs]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    before = R.summarize(R.score_images(R.generate(pipe, prompts, args.n_per_prompt, args.seed, None), attrs,
                                        args.n_per_prompt), args.concept)
    report = {"concept": args.concept,
              "eval": f"{len(prompts)} captions x {args.n_per_prompt} images, seed {args.seed}",
              "original": before, "methods": {}}
    print(f"original: rate {before['concept_rate']:.3f} ({time.time() - t0:.0f} s)", flush=True)
    fns = {"context_leace": J.context_leace, "joint": J.joint_erase,
           "joint_kv": lambda p, c: J.joint_kv(p, c, clean=J.shapes_renders)}  # keys on noised renders
    for m in args.methods:
        t1 = time.time()
        edit = fns[m](pipe, concept)
        dest = write_checkpoint(edit.applied(pipe), out / m, edit, source=weights_path("shapes-flow"), overwrite=True)
        edited = reload(pipe, dest)
        after = R.summarize(R.score_images(R.generate(edited, prompts, args.n_per_prompt, args.seed, None), attrs,
                                           args.n_per_prompt), args.concept)
        cmp = R.compare(before, after, args.concept)
        report["methods"][m] = {"edit": edit.manifest(), "checkpoint": str(dest), "after": after, "comparison": cmp,
                                "seconds": round(time.time() - t1, 1)}
        print(f"{m}: rate {cmp['concept_rate_before']:.3f} -> {cmp['concept_rate_after']:.3f} (drop "
              f"{cmp['relative_drop']:.0%}), other colours {cmp['other_values_accuracy_change']:+.3f}, "
              "other attributes "
              f"{ {k: round(v, 3) for k, v in cmp['other_attribute_accuracy_change'].items()} }", flush=True)
        (out / "report.json").write_text(json.dumps(report, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
