"""`interp edit`: rewrite a fact in a language model's weights (ROME / MEMIT / AlphaEdit) and ship the checkpoint,
or run the CounterFact-style study and the LM concept-erasure comparison.

  interp edit fact --model smollm2 --prompt "The {} is located in the city of" --subject "Eiffel Tower" \\
      --target " Rome" --method rome --layers 6 --out interp-out/edit/eiffel-rome
  interp edit study --model smollm2 --facts 20 --out interp-out/edit/study
  interp edit erase-study --model smollm2 --site blocks.15.resid_post --out interp-out/edit/erase
"""
from __future__ import annotations

import json
from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("edit", help="edit facts in an LM's MLP weights (ROME/MEMIT/AlphaEdit) and write the checkpoint")
    p.add_argument("task", choices=("fact", "study", "erase-study"), help="what to do (see `interp edit -h`)")
    p.add_argument("--model", default="smollm2", help="zoo name or a local HF folder (default: %(default)s)")
    p.add_argument("--prompt", help="fact prompt with {} for the subject, e.g. 'The {} is located in the city of'")
    p.add_argument("--subject", help="the subject, e.g. 'Eiffel Tower'")
    p.add_argument("--target", help="the new object with its leading space, e.g. ' Rome'")
    p.add_argument("--method", default="rome", choices=("rome", "memit", "alphaedit"))
    p.add_argument("--layers", default="6", help="comma list of blocks (ROME: one; default: %(default)s)")
    p.add_argument("--text", default="licenses", help="text for key statistics: 'licenses' (Debian's licence texts), "
                                                      "a .txt file or a folder of them (default: %(default)s)")
    p.add_argument("--tokens", type=int, default=20_000, help="tokens of key statistics (default: %(default)s)")
    p.add_argument("--facts", type=int, default=20, help="study: facts to edit (default: %(default)s)")
    p.add_argument("--site", default="blocks.15.resid_post", help="erase-study: the one site (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="interp-out/edit", help="output folder (default: %(default)s)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.set_defaults(func=run)


def _fact(args, lm):
    import torch

    from interventions.checkpoint import write_checkpoint
    from interventions.editing import EditError, Fact, edit
    from interventions.editing.evaluate import edited, next_token_probs

    if not (args.prompt and args.subject and args.target):
        raise EditError("`interp edit fact` needs --prompt (with {}), --subject and --target")
    fact = Fact(args.prompt, args.subject, args.target)
    layers = [int(v) for v in args.layers.split(",") if v.strip()]
    e = edit(lm, [fact], args.method, layers, text=args.text, n_tokens=args.tokens, seed=args.seed)
    tid = lm.tokenizer(args.target)["input_ids"][0]
    before = float(next_token_probs(lm, [fact.text()])[0, tid])
    model = lm.model
    src = getattr(getattr(model, "config", None), "_name_or_path", None)
    with edited(model, e):
        after = float(next_token_probs(lm, [fact.text()])[0, tid])
        ids = lm.tokenizer(fact.text(), return_tensors="pt")["input_ids"]
        with torch.no_grad():
            want = model(ids).logits

        def same_outputs(reloaded) -> bool:
            with torch.no_grad():
                return float((reloaded(ids).logits - want).abs().max()) < 1e-5

        dest = write_checkpoint(model, args.out, e, source=src if src and Path(src).is_dir() else None,
                                overwrite=args.overwrite, verify=same_outputs)
    lm.tokenizer.save_pretrained(dest)
    print(f"{args.method} edit of {fact.text()!r} -> {args.target!r}: p(target) {before:.4f} -> {after:.4f}; "
          f"layers {layers}; checkpoint {dest} (reloaded and compared: logits within 1e-5)")
    return 0


def run(args) -> int:
    from interp import attach

    from .models import load

    lm = attach(load(args.model))
    if args.task == "fact":
        return _fact(args, lm)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.task == "study":
        from interventions.editing.study import StudyConfig, run_study

        cfg = StudyConfig(layers=[int(v) for v in args.layers.split(",")] if "," in args.layers else [4, 5, 6],
                          max_facts=args.facts, n_prefixes=1, value_steps=15, n_tokens=args.tokens, text=args.text,
                          seed=args.seed)
        report = run_study(lm, out, cfg)
        print(json.dumps({k: v["summary"] for k, v in report["runs"].items()}, indent=1))
        return 0
    from interventions.erasure.lm_baselines import study

    report = study(lm, args.site, seed=args.seed, acts_file=out / "activations.safetensors")
    (out / "erasure_baselines.json").write_text(json.dumps(report, indent=1))
    for split in ("by_prompt", "by_name"):
        for m, r in report[split]["one_site"].items():
            print(f"{split:9s} {m:16s} held-out probe accuracy {r['accuracy']:.3f} (95% CI {r['ci95'][0]:.3f}-"
                  f"{r['ci95'][1]:.3f}; chance {r['chance_range'][0]:.3f}-{r['chance_range'][1]:.3f})")
    return 0
