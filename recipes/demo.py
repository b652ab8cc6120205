"""`interp demo`: residual-stream patching on SmolLM2, Eiffel Tower vs Colosseum, as a heatmap + JSON."""
from __future__ import annotations

import time
from pathlib import Path

CLEAN = "The Eiffel Tower is located in the city of"
CORRUPTED = "The Colosseum is located in the city of"
TARGET, FOIL = " Paris", " Rome"


def register(sub) -> None:
    p = sub.add_parser("demo", help="patch SmolLM2's residual stream over layers x positions (Eiffel vs Colosseum)")
    p.add_argument("--out", default="interp-out/demo", help="output folder (default: %(default)s)")
    p.add_argument("--model", default="smollm2", help="zoo name or local folder of a causal LM (default: %(default)s)")
    p.add_argument("--clean", default=CLEAN)
    p.add_argument("--corrupted", default=CORRUPTED)
    p.add_argument("--target", default=TARGET)
    p.add_argument("--foil", default=FOIL)
    p.set_defaults(func=run)


def run(args) -> int:
    import torch

    import interp
    from interp import metrics
    from interventions.patching import patch_sweep
    from recipes.models import load

    t0 = time.perf_counter()
    lm = interp.attach(load(args.model))
    target, foil = (metrics.token_id(lm.tokenizer, w) for w in (args.target, args.foil))
    with torch.no_grad():
        res = patch_sweep(lm, args.clean, args.corrupted, "resid_pre", metric=metrics.logit_diff(target, foil))
    out = Path(args.out)
    json_path = res.save(out / "resid_pre_patching")
    png = res.plot(out / "resid_pre_patching.png",
                   title=f"{args.model}: resid_pre patching, clean {args.clean!r} -> corrupted {args.corrupted!r}; "
                         f"normalised logit diff {args.target!r} - {args.foil!r} (1 = clean, 0 = corrupted)")
    (layer, pos), best = tuple(res.top(1)[0][0].values()), res.top(1)[0][1]
    print(f"clean    {args.clean!r}: logit diff {res.attrs['clean_metric']:+.3f}")
    print(f"corrupt  {args.corrupted!r}: logit diff {res.attrs['corrupted_metric']:+.3f}")
    print(f"largest normalised effect {best:.3f} at layer {layer}, token {pos!r}")
    print(f"heatmap: {png}\nnumbers: {json_path} (+ .safetensors); {time.perf_counter() - t0:.1f} s")
    return 0
