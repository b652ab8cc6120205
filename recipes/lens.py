"""`interp lens`: what each layer of a language model would predict (logit lens, tuned lens).

    interp lens "The Eiffel Tower is in the city of"                 # SmolLM2, logit lens, every layer
    interp lens "..." --train-tuned --tokens 4000 --out interp-out/lens   # + a tuned lens trained on offline text
    interp lens "..." --tuned interp-out/lens/tuned                  # use a saved tuned lens

Writes into --out: logit_lens.{json,safetensors,png} (Result (layer, pos): top-1 probability, top tokens and KL to
the final layer in attrs; heatmap labelled with each cell's top token) and, with a tuned lens, tuned_lens.* and
the saved translators in tuned/ plus kl.json (held-out KL per layer of both lenses).
"""
from __future__ import annotations

import json
from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("lens", help="logit lens / tuned lens at every layer of a language model (Result + heatmap)",
                       description=__doc__, formatter_class=__import__("argparse").RawDescriptionHelpFormatter)
    p.add_argument("prompt", nargs="?", default="The Eiffel Tower is in the city of")
    p.add_argument("--model", default="smollm2", help="zoo name or folder (default: %(default)s)")
    p.add_argument("--tuned", help="folder of a saved tuned lens to apply")
    p.add_argument("--train-tuned", action="store_true", help="train a tuned lens on offline text first")
    p.add_argument("--tokens", type=int, default=4000, help="tuned lens: stored tokens to train on")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="interp-out/lens")
    p.set_defaults(func=run)


def run(args) -> int:
    import torch

    import interp
    from probes.dictionaries.lens import TunedLens, lens_kl, logit_lens, plot_lens, train_tuned_lens
    from recipes.models import load as load_model

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lm = interp.attach(load_model(args.model))
    res = logit_lens(lm, args.prompt)
    res.save(out / "logit_lens")
    plot_lens(res, out / "logit_lens.png")
    tuned = TunedLens.load(args.tuned) if args.tuned else None
    if args.train_tuned:
        from interp.store import ActivationStore, batched, token_windows
        from probes.dictionaries.corpus import fortunes

        wins = torch.stack(list(token_windows(lm.tokenizer, fortunes(), 64, sep="\n\n")))
        n_held = 8
        store = ActivationStore(lm, "blocks.*.resid_post", skip_first=1, dtype=torch.float32, shard_rows=4096)
        store.fill(batched(wins[:-n_held], 8), max_rows=args.tokens)
        held = ActivationStore(lm, "blocks.*.resid_post", skip_first=1).fill(batched(wins[-n_held:], 8)).tensors()
        tuned = train_tuned_lens(lm, store, steps=args.steps, batch_size=128)
        tuned.save(out / "tuned")
        kl = {"logit_lens": lens_kl(lm, held), "tuned_lens": lens_kl(lm, held, tuned), "train_tokens": len(store),
              "heldout_tokens": int(held["pos"].shape[0])}
        (out / "kl.json").write_text(json.dumps(kl, indent=1))
        print(json.dumps({k: [round(x, 3) for x in v] if isinstance(v, list) else v for k, v in kl.items()}))
    if tuned is not None:
        tres = logit_lens(lm, args.prompt, tuned=tuned)
        tres.save(out / "tuned_lens")
        plot_lens(tres, out / "tuned_lens.png")
    last = [row[-1] for row in res.attrs["top_tokens"]]
    print(f"logit lens, last position, top token per layer: {last}")
    print(f"wrote {out}")
    return 0
