"""Ops bound to every forward call inside a `with` block: HF `generate`, diffusers pipelines, rollouts.

    with lm.applied([Add("blocks.10.resid_post", v, alpha=4.0, where=at(pos="generated"))]) as s:
        model.generate(ids, max_new_tokens=20)

`Engine.run` is one forward; a session keeps the ops attached while the user's own loop calls the
model many times. Positions refer to the full sequence: each call's offset is read from the KV
cache it is given (`cache` / `past_key_values`, else `cache_position`), and every spec resolves to
one fixed set of absolute positions per prompt (`Positions.absolute`), so greedy `generate` gives
the same tokens with and without a KV cache: ints, `Tokens(...)` / `Subject(...)` and negative ints
resolve on the prompt (the first call; -1 = the prompt's last token, as in `run`); `pos=None`,
`pos="generated"` (every position after the prompt) and open slices with a non-negative start
(`slice(3, None)`) reach into the generated tokens. A capture of a site with a position axis holds
the whole sequence of the last prompt, `[batch, prompt + generated, ...]`, the same with and without
the cache; other sites (diffusers, rollouts) stack their calls on a new axis 0. `steps_from` names a module
(""  = the root) whose every call is one step: `RunContext.step` counts them, so `where.steps`
windows work in a denoising loop or a physics rollout. At a clean exit every op must have edited
something at least once, else OpNeverFiredError.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from .cache import ActivationCache, capture_entry
from .engine import Bound, RunContext, apply_bound
from .errors import OpNeverFiredError, PositionError
from .hooks import Entry, attached
from .ops import GENERATED, Add, Op, Positions
from .sites import Site


@dataclass
class Session:
    """What `applied` yields: the live RunContext, captured activations and per-op bookkeeping."""

    ops: list[Op]
    ctx: RunContext
    cache: ActivationCache = field(default_factory=ActivationCache)
    calls: int = 0                   # forward calls of the root so far
    offset: int = 0                  # sequence offset of the call in flight
    prompt_len: int | None = None    # length of the first call (the prompt)
    prompt_ids: torch.Tensor | None = None
    prompt_tokens: list[list[str]] | None = None
    edits: list[int] = field(default_factory=list)  # per op: calls in which it edited something
    prompts: int = 0                 # prompts seen (a new one restarts sequence captures)

    def fired(self) -> list[bool]:
        return [n > 0 for n in self.edits]


def _offset(args: tuple, kwargs: dict) -> int:
    for key in ("cache", "past_key_values"):
        c = kwargs.get(key)
        if c is not None and hasattr(c, "get_seq_length"):
            return int(c.get_seq_length())
    cp = kwargs.get("cache_position")
    if isinstance(cp, torch.Tensor) and cp.numel():
        return int(cp.reshape(-1)[0])
    return 0


def _ids(args: tuple, kwargs: dict) -> torch.Tensor | None:
    ids = kwargs.get("input_ids")
    if ids is None and args and isinstance(args[0], torch.Tensor) and not args[0].is_floating_point():
        ids = args[0]
    return ids if isinstance(ids, torch.Tensor) and ids.dim() == 2 else None


class _Positions:
    """One op's `where.pos` as absolute positions of the current prompt, cut to the call in flight."""

    def __init__(self, spec: Positions, site: Site, items: tuple[int, ...] | None = None):
        self.spec, self.site, self.items = spec, site, items
        self.fixed: list[list[int]] | None = None  # per item, absolute
        self.open: tuple[int, int] | None = None   # (start, step) reaching into generated tokens

    def __call__(self, s: Session, T: int, n: int) -> list[list[int]]:
        o, end = s.offset, s.offset + T
        if self.fixed is None:
            P = s.prompt_len if s.prompt_len is not None else end
            toks: list = s.prompt_tokens or [None]
            if self.spec.kind == "tokens" and not s.prompt_tokens:
                raise PositionError(f"{self.spec!r} at {self.site.name!r} needs token strings: attach the model with "
                                    "its tokenizer and pass input_ids")
            keep = None if self.spec.kind != "tokens" else self.items  # other specs: one list for every item
            got = [self.spec.absolute(t, P, self.site.name) if keep is None or i in keep else ([], None)
                   for i, t in enumerate(toks if self.spec.kind == "tokens" else [None])]
            self.fixed, self.open = [g[0] for g in got], next((g[1] for g in got if g[1] is not None), None)
        out = []
        for fixed in self.fixed:
            ps = [p - o for p in fixed if o <= p < end]
            if self.open is not None:
                a, step = self.open
                first = a if a >= o else a + -(-(o - a) // step) * step
                ps = sorted(set(ps) | {p - o for p in range(first, end, step)})
            out.append(ps)
        return out


class _SequenceStore:
    """Session captures: a site with a position axis, called on token ids, keeps the last prompt's whole
    sequence [batch, positions so far, ...] (positions [offset, offset + T) of each call written in place,
    so cached and cache-less generation give one tensor); any other site stacks its calls."""

    def __init__(self, s: Session):
        self.s = s
        self.calls: dict = {}
        self.prompt: dict = {}

    def __call__(self, site: Site, t: torch.Tensor) -> None:
        s = self.s
        if s.prompt_len is None or t.dim() < 2 or len(site.axes) < 2 or site.axes[1] != "pos":
            s.cache._store(site, t, self.calls)
            return
        buf = s.cache.get(site.name)
        if self.prompt.get(site.name) != s.prompts or buf is None or s.offset > buf.shape[1]:
            buf = t[:, :0]
        o, T = s.offset, t.shape[1]
        s.cache[site.name] = torch.cat([buf[:, :o], t, buf[:, o + T:]], 1)
        s.cache.axes[site.name] = site.axes
        self.prompt[site.name] = s.prompts


@contextlib.contextmanager
def applied(adapter, ops: Sequence[Op] = (), capture: Sequence[str] | str = (), *, ctx: RunContext | None = None,
            steps_from: str | None = None, check: bool = True) -> Iterator[Session]:
    """Keep `ops` (and `capture`) attached to every forward call of the adapter's model in the block."""
    table = adapter.site_table()
    ops = list(ops)
    s = Session(ops, ctx or RunContext(), edits=[0] * len(ops))
    if steps_from is not None:
        s.ctx.step = None  # the first call of `steps_from` is step 0
    by_site: dict[str, list[int]] = {}
    sites: dict[str, Site] = {}
    for i, op in enumerate(ops):
        site = table.get(op.site)
        sites[site.name] = site
        by_site.setdefault(site.name, []).append(i)
    resolvers = [_Positions(op.where.pos, sites[table.get(op.site).name], op.where.items) for op in ops]

    def on_call(io):
        args, kwargs, _ = io
        s.offset = _offset(args, kwargs)
        ids = _ids(args, kwargs)
        if s.offset == 0 and (s.prompt_ids is None or ids is None or ids.shape[1] < s.prompt_len
                              or ids.shape[0] != s.prompt_ids.shape[0]
                              or not torch.equal(ids[:, :s.prompt_len], s.prompt_ids)):
            s.prompt_len = None if ids is None else ids.shape[1]  # a new prompt (not a cache-less re-run)
            s.prompts += 1
            s.prompt_ids = None if ids is None else ids.detach().clone()
            s.prompt_tokens = None
            for r in resolvers:
                r.fixed = None
            if ids is not None and adapter.tokenizer is not None and any(op.where.pos.kind == "tokens" for op in ops):
                tok = adapter.tokenizer
                s.prompt_tokens = [[tok.decode([int(t)]) for t in row] for row in ids]
        s.calls += 1

    def on_step(io):
        s.ctx.step = 0 if s.ctx.step is None else s.ctx.step + 1

    def site_fn(name: str):
        idxs = by_site[name]
        site = sites[name]

        def fn(x: torch.Tensor):
            n = x.shape[0]
            seq = x.dim() >= 3 and ("pos" in site.axes or site.is_raw)
            bounds = []
            for i in idxs:
                op = ops[i]
                if isinstance(op, Add) and op.spatial is not None:
                    pos = [[0]]
                elif seq:
                    pos = resolvers[i](s, x.shape[1], n)
                else:
                    raise PositionError(f"{op.describe()} at {name!r}: the site's tensor {tuple(x.shape)} has no "
                                        "position axis; for grid activations use Add(..., spatial='average'|'keep')")
                bounds.append(Bound(op, site, 0, n, n, pos))
            out = apply_bound(x, bounds, s.ctx)
            for i, b in zip(idxs, bounds):
                if b.fired and any(b.positions) and b.items():
                    s.edits[i] += 1
            return out
        return fn

    root_site = Site("__call", "", io="input", slot=0)
    entries = [Entry(root_site, on_call, raw_io=True)]
    if steps_from is not None:
        step_site = Site("__step", steps_from, io="input", slot=0)
        table.resolve(f"module:{steps_from}") if steps_from else None  # a clear error for an unknown path
        entries.append(Entry(step_site, on_step, raw_io=True))
    entries += [Entry(sites[name], site_fn(name)) for name in by_site]
    store = _SequenceStore(s)
    for pattern in ([capture] if isinstance(capture, str) else capture):
        for site in table.resolve(pattern):
            entries.append(capture_entry(site, s.cache, store=store))
    with attached(adapter.root, entries):
        yield s
    if check:
        missing = [op for op, n in zip(ops, s.edits) if n == 0]
        if missing:
            op = missing[0]
            raise OpNeverFiredError(
                f"{op.describe()} never edited anything in {s.calls} forward call(s) of this `applied` block: its site "
                f"did not run{'' if op.where.steps is None else f' within steps {op.where.steps!r}'} or its positions "
                f"{op.where.pos!r} selected nothing (e.g. pos='generated' with no generated token). Unfired: "
                f"{[o.describe() for o in missing]}. Check the site and positions, or pass check=False.")


__all__ = ["applied", "Session", "GENERATED"]
