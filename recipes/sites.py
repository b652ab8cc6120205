"""`interp sites MODEL`: list a model's site names (and optionally its raw module paths)."""
from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("sites", help="list the sites of a model")
    p.add_argument("model", help="zoo name, local folder or hub name")
    p.add_argument("pattern", nargs="?", default=None, help="optional wildcard, e.g. 'blocks.*.attn.z'")
    p.add_argument("--modules", action="store_true", help="also list raw module paths (module:...)")
    p.set_defaults(func=run)


def run(args) -> int:
    import interp
    from recipes.models import load

    m = interp.attach(load(args.model))
    print(m)
    for s in m.sites(args.pattern):
        extra = f" heads={s.heads}" if s.heads else ""
        print(f"{s.name:40s} {s.io:6s} module:{s.module or '<root>'}  axes={','.join(s.axes)}{extra}")
    if args.modules:
        for path in sorted(m.adapter.site_table().module_names):
            print(f"module:{path}")
    return 0
