"""The `interp` command: each recipe module registers its own subcommand."""
from __future__ import annotations

import argparse
import contextlib
import importlib
import sys

from interp.errors import InterpError
from recipes.models import DTYPES

# Recipe modules that add a subcommand through `register(subparsers)`; each sets `func` on its parser.
COMMANDS = ("recipes.demo", "recipes.sites", "recipes.zoo", "recipes.zoo_train", "recipes.trace",
            "recipes.steer", "recipes.erase", "recipes.probe", "recipes.check", "recipes.sae", "recipes.lens",
            "recipes.circuit", "recipes.saliency", "recipes.report", "recipes.edit")


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line (what was wrong, and where the help is), exit code 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


# Errors that mean "the user asked for something that cannot be done": one line, exit code 2. Anything else is
# a bug in interp or a dependency: one line naming it, exit code 1, and the traceback with --debug.
USER_ERRORS = (InterpError, ValueError, KeyError, FileNotFoundError, FileExistsError, NotADirectoryError,
               IsADirectoryError, PermissionError)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="interp", description="Causal interpretability through one hook engine.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)
    for name in COMMANDS:
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:  # recipe not part of this installation
                continue
            raise
        mod.register(sub)
    for p in sub.choices.values():
        _add_common(p)
    return parser


def _add_common(p: argparse.ArgumentParser) -> None:
    """--device / --dtype / --device-map / --debug on every subcommand (a recipe's own option of the same name
    wins)."""
    have = {s for a in p._actions for s in a.option_strings}
    g = p.add_argument_group("placement and debugging (every command)")
    if "--device" not in have:
        g.add_argument("--device", default=None, help="torch device of the model: cpu, cuda, cuda:1, mps "
                       "(default: cpu)")
    if "--dtype" not in have:
        g.add_argument("--dtype", default=None, choices=DTYPES, help="parameter dtype (default: float32)")
    if "--device-map" not in have:
        g.add_argument("--device-map", default=None, help="accelerate device_map for local/hub folders, e.g. auto "
                       "(default: none)")
    if "--debug" not in have:
        g.add_argument("--debug", action="store_true", help="show the Python traceback of an error")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import shlex

    import torch

    args.command_line = "interp " + shlex.join(sys.argv[1:] if argv is None else argv)

    from recipes.models import placement, quiet_loading

    grad, threads = torch.is_grad_enabled(), torch.get_num_threads()
    prefix = f"interp {args.command}"
    try:
        with _ranks(args), quiet_loading(), placement(getattr(args, "device", None), getattr(args, "dtype", None),
                                                      getattr(args, "device_map", None)):
            code = args.func(args)
        return code if isinstance(code, int) and not isinstance(code, bool) else 0  # zoo-train returns its metrics
    except USER_ERRORS as e:
        if getattr(args, "debug", False):
            raise
        print(f"{prefix}: error: {one_line(e)}", file=sys.stderr)
        return 2
    except SystemExit as e:  # a recipe's `raise SystemExit("message")`: a user error like the others
        if not isinstance(e.code, str):
            raise
        msg = e.code.split(": ", 1)[1] if e.code.startswith(f"{prefix}: ") else e.code
        print(f"{prefix}: error: {' '.join(msg.split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prefix}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001  not a user error: name it, exit 1, traceback on request
        if getattr(args, "debug", False):
            raise
        print(f"{prefix}: internal error: {type(e).__name__}: {one_line(e)} "
              f"(rerun with --debug for the traceback)", file=sys.stderr)
        return 1
    finally:  # recipes may switch off autograd or pin threads; a caller in the same process keeps its own
        torch.set_grad_enabled(grad)
        torch.set_num_threads(threads)


def one_line(e: BaseException) -> str:
    """An exception's message on one line (KeyError's quotes dropped; whitespace runs collapsed)."""
    text = e.args[0] if isinstance(e, KeyError) and len(e.args) == 1 and isinstance(e.args[0], str) else str(e)
    return " ".join(text.split()) or type(e).__name__


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
