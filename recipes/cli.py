"""The `interp` command: each recipe module registers its own subcommand."""
from __future__ import annotations

import argparse
import importlib
import sys

# Recipe modules that add a subcommand through `register(subparsers)`; each sets `func` on its parser.
COMMANDS = ("recipes.demo", "recipes.sites", "recipes.zoo", "recipes.zoo_train", "recipes.trace",
            "recipes.steer", "recipes.erase", "recipes.probe")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="interp", description="Causal interpretability through one hook engine.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:  # recipe not part of this installation
                continue
            raise
        mod.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from interp.errors import InterpError

    try:
        return int(args.func(args) or 0)
    except InterpError as e:
        print(f"interp {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
