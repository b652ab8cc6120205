"""`interp zoo`: the models interp ships or finds offline, with their recorded metrics."""
from __future__ import annotations

import json


def register(sub) -> None:
    p = sub.add_parser("zoo", help="list zoo models and their metrics")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run)


def run(args) -> int:
    from interp.zoo import available

    entries = available()
    if args.json:
        print(json.dumps(entries, indent=1, default=str))
        return 0
    for e in entries:
        print(f"{e['name']:18s} {e['kind']}\n{'':18s} {summary(e.get('metrics', {}))}")
    print("(--json for every recorded number: per caption, per regime, training lineage)")
    return 0


def summary(m: dict) -> str:
    """One line of the numbers that say how good a zoo model is (all of them: --json)."""
    parts = []
    held = m.get("held_out")
    if held:
        acc = ", ".join(f"{k} {v:.2f}" for k, v in held["accuracy"].items())
        parts.append(f"held-out accuracy ({held['n_captions']} captions x {held['n_per_caption']}): {acc}")
    if "one_step_rel_l2" in m:
        parts.append(f"one-step rel. L2 {m['one_step_rel_l2']:.2g}")
    if "kappa_fit" in m:
        fits = m["kappa_fit"].values()
        ok = sum(f["rel_err"] <= 0.10 for f in fits)
        parts.append(
            f"fitted kappa within 10% in {ok} of {len(m['kappa_fit'])} regimes (worst {m['kappa_fit_max_rel_err']:.0%})"
        )
    steps = [r.get("train_steps") for r in m.get("lineage", [])] or [m.get("train_steps")]
    if all(isinstance(x, int) for x in steps) and steps:
        parts.append(f"{sum(steps)} training steps")
    if not parts:  # e.g. a pretrained LM: whatever it records
        parts = [f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in m.items()]
    return "; ".join(parts)
