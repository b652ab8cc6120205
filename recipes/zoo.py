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
        metrics = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in e.get("metrics", {}).items())
        print(f"{e['name']:18s} {e['kind']}\n{'':18s} {metrics}")
    return 0
