"""The `interp` command: each recipe module registers its own subcommand."""
from __future__ import annotations

import argparse
import contextlib
import importlib
import sys

# Recipe modules that add a subcommand through `register(subparsers)`; each sets `func` on its parser.
COMMANDS = ("recipes.demo", "recipes.sites", "recipes.zoo", "recipes.zoo_train", "recipes.trace",
            "recipes.steer", "recipes.erase", "recipes.probe", "recipes.edit")


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

    import torch

    grad, threads = torch.is_grad_enabled(), torch.get_num_threads()
    with _ranks(args):
        try:
            return int(args.func(args) or 0)
        except InterpError as e:
            print(f"interp {args.command}: error: {e}", file=sys.stderr)
            return 2
        finally:  # recipes may switch off autograd or pin threads; a caller in the same process keeps its own
            torch.set_grad_enabled(grad)
            torch.set_num_threads(threads)


@contextlib.contextmanager
def _ranks(args):
    """Under torchrun: one process group for the whole command (run_grid splits its rows over it);
    only rank 0 prints to stdout and writes into --out (the other ranks write into a temporary folder
    that is removed)."""
    import os

    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) < 2:
        yield
        return
    import io
    import shutil
    import tempfile

    import torch.distributed as dist

    from interp import distributed

    owned = not (dist.is_available() and dist.is_initialized())
    rank, _ = distributed.init()
    scratch = None
    try:
        if rank == 0:
            yield
        else:
            if getattr(args, "out", None) is not None:
                scratch = tempfile.mkdtemp(prefix=f"interp-rank{rank}-")
                args.out = scratch
            with contextlib.redirect_stdout(io.StringIO()):
                yield
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
        if owned and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
