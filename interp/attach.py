"""attach(model) -> Instrumented: the adapter, its sites and the runs, in one object."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from . import adapters
from .adapters.nnsight import is_nnsight, unwrap
from .engine import Engine, GridOutput, RunContext, RunOutput, resolve_positions
from .errors import PositionError
from .ops import Op
from .sites import Site


class Instrumented:
    """A model with interp's sites and runs. Holds no hooks between calls; the model is never modified."""

    def __init__(self, adapter: adapters.Adapter, wrapped: Any = None):
        self.adapter = adapter
        self.engine = Engine(adapter)
        self.wrapped = wrapped  # the object the user passed (e.g. an nnsight wrapper), if not the module

    @property
    def model(self) -> torch.nn.Module:
        return self.adapter.model

    @property
    def tokenizer(self):
        return self.adapter.tokenizer

    @property
    def family(self) -> str:
        return self.adapter.family

    def __repr__(self) -> str:
        return f"Instrumented({self.adapter.describe()}, {len(self.adapter.site_table())} sites)"

    # -- sites ---------------------------------------------------------------------------------
    def sites(self, pattern: str | None = None) -> list[Site]:
        """All sites in forward order, or those matching a name / wildcard / raw path."""
        table = self.adapter.site_table()
        return list(table) if pattern is None else table.resolve(pattern)

    def site(self, name: str) -> Site:
        return self.adapter.site_table().get(name)

    def site_names(self, pattern: str | None = None) -> list[str]:
        return [s.name for s in self.sites(pattern)]

    @property
    def n_layers(self) -> int:
        return len(getattr(self.adapter, "block_paths", []) or []) or getattr(self.adapter, "n_layers", 0)

    # -- inputs --------------------------------------------------------------------------------
    def tokens(self, inputs) -> list[str]:
        """Token strings of the first item of `inputs`."""
        p = self.adapter.prepare(inputs)
        return p.tokens[0] if p.tokens else []

    def positions(self, inputs, pos) -> list[int]:
        """Resolve a position spec (int, list, Tokens, Subject, ...) on `inputs`."""
        p = self.adapter.prepare(inputs)
        if p.seq_len is None:
            raise PositionError("positions were given but the input has no sequence axis (no token positions)")
        return resolve_positions(pos, p.tokens[0] if p.tokens else None, p.seq_len)

    # -- runs ----------------------------------------------------------------------------------
    def run(self, inputs, ops: Sequence[Op] = (), capture: Sequence[str] | str = (), **kw) -> RunOutput:
        """One forward pass with `ops` applied and `capture` sites recorded (see Engine.run)."""
        return self.engine.run(inputs, ops, capture, **kw)

    def capture(self, inputs, sites: Sequence[str] | str, **kw):
        """Shorthand: run with no ops and return the ActivationCache."""
        return self.engine.run(inputs, (), sites, **kw).cache

    def run_grid(self, inputs, rows: Sequence[Sequence[Op]], metric: Callable | None = None, *,
                 distributed: bool | None = None, resume_dir=None, **kw) -> GridOutput:
        """Many experiments on one base input, packed into the batch dimension (see Engine.run_grid).

        Inside an initialised torch.distributed group of several processes (torchrun) the rows are split
        over the ranks and gathered, equal bit for bit to a one-process run; distributed=False keeps every
        row here, True requires a group. resume_dir= saves finished chunks and skips them on a rerun.
        `group=` and `broadcast=` go to interp.distributed.run_grid."""
        if distributed is False and resume_dir is None:
            kw.pop("group", None), kw.pop("broadcast", None)
            return self.engine.run_grid(inputs, rows, metric, **kw)
        from .distributed import run_grid

        return run_grid(self.engine, inputs, rows, metric, distributed=distributed, resume_dir=resume_dir, **kw)

    def check(self, inputs=None, **kw):
        """Verify the site identities, patch parity and grid shortcuts on this model (interp.check.check);
        returns a CheckReport (`.ok`, `.table()`, `.to_result()`)."""
        from .check import check

        return check(self, inputs, **kw)

    def applied(self, ops: Sequence[Op] = (), capture: Sequence[str] | str = (), *, ctx: RunContext | None = None,
                steps_from: str | None = None, check: bool = True):
        """Context manager: `ops` edit (and `capture` records) every forward call inside the block, e.g.
        `with lm.applied([Add(...)]): model.generate(...)`; positions are relative to the full sequence
        (KV cache aware, pos="generated" for new tokens only); `steps_from` names the module whose calls
        count `RunContext.step` ("" = the root). Every op must edit something by the end (see interp.session)."""
        from .session import applied

        return applied(self.adapter, ops, capture, ctx=ctx, steps_from=steps_from, check=check)


def attach(obj: Any, tokenizer=None, family: str | None = None) -> Instrumented:
    """Instrument an HF model, a TransformerLens model, an nnsight-wrapped model, a diffusers
    pipeline or component, or any nn.Module. The model itself is not changed."""
    if isinstance(obj, Instrumented):
        return obj
    wrapped = None
    if is_nnsight(obj):
        wrapped = obj
        obj, tok = unwrap(obj)
        tokenizer = tokenizer or tok
    if tokenizer is None:
        tokenizer = getattr(obj, "tokenizer", None)
    return Instrumented(adapters.pick(obj, tokenizer, family), wrapped)


__all__ = ["attach", "Instrumented", "RunContext"]
