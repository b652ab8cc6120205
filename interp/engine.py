"""Runs: one experiment (`run`) or many rows packed into the batch dimension (`run_grid`).

An op is bound to a site and to the batch items of its row; at the site's hook all bound edits are
applied through interp.kernels, patches from one source in one fused call. Rows whose edits all sit
at block >= l start from the base run's cached input of block l ("prefix reuse").
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from tqdm.auto import tqdm

from .adapters.base import Prepared
from .cache import ActivationCache, capture_entry
from .errors import InterpError, OpNeverFiredError, PositionError, SiteShapeError, SpecError
from .hooks import Entry, attached, read_input
from .ops import Add, Op, Positions, Subject, Target, Where
from .sites import Site


def _layer(site: Site) -> int:
    return -1 if site.layer is None else site.layer


# ---------------------------------------------------------------------------------------------
# positions and selections
# ---------------------------------------------------------------------------------------------

def subject_positions(tokens: Sequence[str], text: str, occurrence: int = 0) -> list[int]:
    """Token positions whose characters overlap `text` in the decoded prompt (its first occurrence by
    default, as in ROME; -1 is the last)."""
    return Subject(text, "all", occurrence).find(tokens)


def resolve_positions(spec: Any, tokens: Sequence[str] | None, T: int, site: str = "") -> list[int]:
    """A position spec (None, int, list, slice, Tokens, Subject) -> position list for one item (Positions.resolve)."""
    return Positions.of(spec).resolve(tokens, T, site)


def resolve_heads(spec: Any, n_heads: int | None, site: Site) -> list[int] | None:
    if spec is None:
        return None
    if n_heads is None:
        raise PositionError(f"heads= was given for {site.name!r}, which has no head axis "
                            f"(axes {site.axes}); use a per-head site such as 'blocks.0.attn.z'")
    hs = [spec] if isinstance(spec, int) else list(spec)
    for h in hs:  # Where normalised them to ints >= 0
        if not 0 <= h < n_heads:
            raise PositionError(f"head {h} is out of range for {site.name!r}, which has {n_heads} heads")
    return hs


@dataclass
class Bound:
    """An op bound to a site and to the batch items [start, stop) of the current tensor."""

    op: Op
    site: Site
    start: int
    stop: int
    base_batch: int
    positions: list[list[int]]  # per base item
    fired: bool = False
    lazy_tokens: list | None = None  # set: positions resolve on the site's own axis 1 at each call (diffusers sites)
    pos_shift: int = 0              # packed rows (interp.prefix): destination position = position + pos_shift
    full_len: int | None = None     # packed rows: the unpacked sequence length that sources carry

    def items(self, ctx: RunContext | None = None) -> list[int]:
        return [row for _, row in self.rows(ctx)]

    def rows(self, ctx: RunContext | None = None) -> list[tuple[int, int]]:
        """(base row, tensor row) pairs. With classifier-free guidance (ctx.branches), base row r sits at
        tensor row ctx.branches[branch][r] for each branch the op selects."""
        keep = self.op.where.items
        rows: list[int] | range = range(self.start, self.stop)
        if keep is not None:
            rows = [r for r in rows if (r - self.start) % self.base_batch in keep]
        if ctx is None or ctx.branches is None:
            return [(r, r) for r in rows]
        names = ("uncond", "cond") if self.op.where.branch == "both" else (self.op.where.branch,)
        return [(r, ctx.branches[n][r]) for n in names if n in ctx.branches for r in rows]

    def target(self, heads: list[int] | None, dev, ctx: RunContext | None = None) -> Target:
        """The destinations in the site tensor: [K, 2] (row, pos) or [K, 3] (row, pos, head)."""
        dest: list[tuple[int, ...]] = []
        rows: list[tuple[int, list[int]]] = []
        for r, row in self.rows(ctx):
            ps = [p + self.pos_shift for p in self.positions[(r - self.start) % self.base_batch % len(self.positions)]]
            rows.append((row, ps))
            for p in ps:
                dest.extend([(row, p)] if heads is None else [(row, p, h) for h in heads])
        idx = torch.tensor(dest, dtype=torch.long, device=dev).reshape(-1, 2 if heads is None else 3)
        return Target(self.site, idx, (idx[:, 0] - self.start) % self.base_batch, idx[:, 1] - self.pos_shift,
                      rows, heads, self.full_len, self.base_batch)


@dataclass
class RunContext:
    """What the hooks know about the call in flight; the diffusion runner sets `step` and `branches`."""

    step: int | None = None
    branches: dict[str, list[int]] | None = None  # "cond"/"uncond" -> tensor row of each base row
    n_steps: int | None = None  # denoising steps of the sampling run in flight (range checks)


def _step_ok(where: Where, ctx: RunContext, site: Site) -> bool:
    if where.steps is None:
        return True
    if ctx.n_steps is not None:
        where.steps.indices(ctx.n_steps, site.name)  # range check against the run in flight
        if ctx.step is None:
            raise PositionError(f"an op at {site.name!r} selects steps={where.steps!r}, but {site.name!r} runs before "
                                "the denoising loop (once per sampling run); to edit the text conditioning inside a "
                                "step window use the denoiser's context site ('unet.context' / 'transformer.context')")
    if ctx.step is None:
        raise PositionError(f"an op at {site.name!r} selects steps={where.steps!r}, but this run has no "
                            "denoising steps; use interp.diffusion for step-aware runs")
    return where.steps.contains(ctx.step)


def _stream_site(site: Site, stream: str, table) -> Site:
    """The img / txt stream of a joint-attention site (where=at(stream=...))."""
    streams = site.meta.get("streams")
    if not streams:
        raise PositionError(f"stream={stream!r} was given for {site.name!r}, which has no img/txt streams; "
                            "streams exist on joint-attention sites such as 'transformer.blocks.0'")
    if stream not in streams:
        raise PositionError(f"{site.name!r} has streams {sorted(streams)}, not {stream!r}")
    return table.get(streams[stream])


# ---------------------------------------------------------------------------------------------
# applying ops at a site
# ---------------------------------------------------------------------------------------------

def _check_axes(op: Op, site: Site) -> None:
    """An op that indexes positions on a site whose axis 1 is not a position axis (conv maps)."""
    if len(site.axes) > 1 and site.axes[1] == "channel" and isinstance(op, Add) and op.uses_positions():
        raise SiteShapeError(f"{op.describe()}: {site.name!r} is a feature map {site.axes}, where axis 1 holds "
                             "channels, not positions; pass spatial='average' (one channel vector added at every "
                             "location) or spatial='keep' (a vector of the item's full shape)")


def _branch_ok(where: Where, ctx: RunContext, site: Site) -> bool:
    if where.branch == "both":
        return True
    if ctx.branches is None:
        raise PositionError(f"an op at {site.name!r} selects branch={where.branch!r}, but this run has no "
                            "classifier-free-guidance branches; branch selection needs a diffusers pipeline run")
    return bool(ctx.branches.get(where.branch))


def _applier(bs: list[Bound], ctx: RunContext) -> Callable[[torch.Tensor], torch.Tensor | None]:
    """The hook function of one site's bound ops."""
    return lambda x: apply_bound(x, bs, ctx)


def apply_bound(x: torch.Tensor, bound: list[Bound], ctx: RunContext) -> torch.Tensor | None:
    """Apply every bound op to the site tensor x, in order; returns the edited tensor or None if none applied.

    Consecutive ops with one batch key (patches from one source) apply in one kernel call. The kernels
    are called with check=False: positions and heads were range-checked on the host when the ops were
    bound, so the kernels' check (one device-to-host sync per call on a GPU) would only repeat it."""
    active = [b for b in bound if _step_ok(b.op.where, ctx, b.site) and _branch_ok(b.op.where, ctx, b.site)]
    if not active:
        return None
    rows = max(b.stop for b in active)
    if x.dim() < 2 or x.shape[0] < rows:
        raise SiteShapeError(f"{active[0].op.describe()}: site {active[0].site.name!r} carries a tensor of shape "
                             f"{tuple(x.shape)}, but ops need [batch, features...] with {rows} batch items on axis 0: "
                             "this site has no batch axis; edit a site whose tensor is [batch, ...] (e.g. the "
                             "module's input, 'module:PATH:input')")
    flat = x.dim() == 2 and any(b.lazy_tokens is not None for b in active)  # [batch, d] diffusers sites: 1 position
    x = x.clone()
    x = x[:, None] if flat else x
    site = active[0].site
    n_heads = x.shape[2] if site.heads is not None or "head" in site.axes else None
    group: list[tuple[Op, Target]] = []
    for b in active:
        b.fired = True
        if b.lazy_tokens is not None:
            b.positions = [b.op.where.pos.resolve(t, x.shape[1], site.name) for t in b.lazy_tokens]
        top = max((max(p) for p in b.positions if p), default=-1) + b.pos_shift  # host-side: no device sync
        if top >= x.shape[1]:
            raise PositionError(f"{b.op.describe()}: position {top - b.pos_shift} is out of range for {site.name!r}, "
                                f"whose tensor has {x.shape[1]} positions on axis 1 (shape {tuple(x.shape)}; the "
                                f"input has {b.full_len or 'more'}): pass positions 0..{x.shape[1] - 1} of this site")
        t = b.target(resolve_heads(b.op.where.heads, n_heads, site), x.device, ctx)
        if t.idx.numel() == 0 and b.op.uses_positions():
            continue
        if group and not (type(group[-1][0]) is type(b.op) and b.op.batch_key() is not None
                          and group[-1][0].batch_key() == b.op.batch_key()):
            type(group[0][0]).apply_many(x, group)
            group = []
        group.append((b.op, t))
    if group:
        type(group[0][0]).apply_many(x, group)
    return x[:, 0] if flat else x


# ---------------------------------------------------------------------------------------------
# the runner
# ---------------------------------------------------------------------------------------------

@dataclass
class RunOutput:
    """What `run` returns: the raw model output, its main tensor, captured activations and tokens."""

    output: Any
    logits: torch.Tensor
    cache: ActivationCache
    tokens: list[list[str]]

    @property
    def str_tokens(self) -> list[str]:
        return self.tokens[0] if self.tokens else []


@dataclass
class GridOutput:
    """What `run_grid` returns: metric values per row [n_rows, batch, ...] and for the unedited base run."""

    values: torch.Tensor
    base: torch.Tensor
    tokens: list[list[str]]
    stats: dict = field(default_factory=dict)


def _expand_batch(obj, b: int, n: int):
    if n == 1:
        return obj
    if isinstance(obj, torch.Tensor):
        if obj.dim() > 0 and obj.shape[0] == b and b > 1:
            return obj.repeat(n, *([1] * (obj.dim() - 1)))
        return obj
    if isinstance(obj, tuple):
        return tuple(_expand_batch(o, b, n) for o in obj)
    if isinstance(obj, list):
        return [_expand_batch(o, b, n) for o in obj]
    if isinstance(obj, dict):
        return {k: _expand_batch(v, b, n) for k, v in obj.items()}
    return obj


def _check_rows(rows, shared, chunk_rows) -> None:
    if isinstance(rows, Op) or any(isinstance(r, Op) or not isinstance(r, (list, tuple)) for r in rows):
        raise SpecError("run_grid takes rows, each a list of ops (rows=[[op1], [op2, op3]]), not a flat list of ops")
    bad = next((o for r in [*rows, shared] for o in r if not isinstance(o, Op)), None)
    if bad is not None:
        raise SpecError(f"expected an op (Patch, Add, ...) in a grid row, got {type(bad).__name__}")
    if chunk_rows is not None and (isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int) or chunk_rows < 1):
        raise SpecError(f"chunk_rows={chunk_rows!r}: give a positive int (rows per chunk) or None (fit the budget)")


def _checked_input(ad, prepared: Prepared) -> Prepared:
    """Refuse an empty input, token ids beyond the vocabulary and sequences beyond the context window."""
    if prepared.seq_len == 0:
        raise SpecError("the input is empty (0 tokens): give at least one token")
    ids = prepared.kwargs.get("input_ids")
    emb = ad.model.get_input_embeddings() if isinstance(ids, torch.Tensor) and hasattr(
        ad.model, "get_input_embeddings") else None
    if isinstance(ids, torch.Tensor) and isinstance(emb, torch.nn.Embedding) and ids.numel():
        top, low = int(ids.max()), int(ids.min())
        if top >= emb.num_embeddings or low < 0:
            raise SpecError(f"token id {top if top >= emb.num_embeddings else low} is outside the vocabulary "
                            f"(0..{emb.num_embeddings - 1}) of this model")
        cfg = getattr(ad.model, "config", None)
        ctx_len = getattr(cfg, "n_positions", None) or getattr(cfg, "max_position_embeddings", None)
        if isinstance(ctx_len, int) and ids.shape[-1] > ctx_len:
            raise SpecError(f"the input has {ids.shape[-1]} tokens, beyond this model's context of {ctx_len}")
    return prepared


def _check_values(val: Any, b: int, rows: Sequence[Sequence[Op]], chunk: Sequence[int] | None) -> None:
    """A metric gives a tensor of one value per item ([n * batch, ...]) with finite values; `chunk` names
    the grid rows of this call (None: the base run)."""
    if not isinstance(val, torch.Tensor) or val.dim() == 0 or val.shape[0] % b:
        shape = tuple(val.shape) if isinstance(val, torch.Tensor) else type(val).__name__
        raise SpecError(f"the metric returned {shape}: it must return one value per item, a tensor of shape "
                        f"[batch, ...] (here batch = {b} per row); do not reduce over the batch")
    if val.is_floating_point() and not bool(torch.isfinite(val).all()):
        where = "the base run"
        if chunk is not None:
            bad = int(torch.isfinite(val.reshape(len(chunk), -1)).all(1).logical_not().nonzero()[0])
            where = f"row {chunk[bad]} ({' + '.join(o.describe() for o in rows[chunk[bad]])})"
        raise InterpError(f"the metric returned NaN or inf values for {where}: check the metric and that row's ops")


def replay_starts(adapter, block_in: dict, lowest: int = 1) -> list[int]:
    """Blocks to validate replays from: the middle one, and the first (>= lowest) of each kind of block
    call (block type, attention type, the attention mask it was given), so every layer type starts one."""
    seen, out = set(), {len(adapter.block_paths) // 2}
    for i in sorted(block_in):
        kw = block_in[i][2]
        mask = kw.get("attention_mask")
        block = adapter.root.get_submodule(adapter.block_paths[i])
        key = (type(block).__name__, getattr(block, "attention_type", None),
               getattr(getattr(block, "self_attn", None), "sliding_window", None),
               None if not isinstance(mask, torch.Tensor) else (mask.data_ptr(), tuple(mask.shape)))
        if key not in seen and i >= lowest:
            seen.add(key)
            out.add(i)
    return sorted(o for o in out if o in block_in and o >= lowest)


NO_CACHE = {"cache": None, "past_key_values": None, "layer_past": None, "past_key_value": None, "use_cache": False}


class Engine:
    """Binds ops, registers hooks through interp.hooks and runs the adapter."""

    def __init__(self, adapter):
        self.adapter = adapter
        self._replay_ok: bool | None = None
        self._packed_ok: bool | None = None
        self.refused: dict[str, str] = {}  # shortcut -> why the engine runs full forwards instead (grid stats)

    # -- binding -------------------------------------------------------------------------------
    def bind(self, ops: Sequence[Op], prepared: Prepared, start: int, n_rows: int) -> list[Bound]:
        table = self.adapter.site_table()
        out, sites = [], []
        for op in ops:
            if not isinstance(op, Op):
                raise SpecError(f"expected an op (Patch, Add, ...), got {type(op).__name__}: a grid takes rows, "
                                "each a list of ops (rows=[[op1], [op2, op3]])")
            bad = [i for i in (op.where.items or ()) if i >= prepared.batch]
            if bad:
                raise PositionError(f"items={list(op.where.items or ())} for an op at {op.site!r}: {bad} out of "
                                    f"range, this input has {prepared.batch} item(s) (0..{prepared.batch - 1}); "
                                    "items index the batch of the input (the prompts, or one sampling "
                                    "request's images)")
            site = table.get(op.site)
            if op.where.stream is not None:
                site = _stream_site(site, op.where.stream, table)
            _check_axes(op, site)
            view = getattr(prepared, "site_view", None)  # diffusers inputs: per-component token axes
            lazy = view(site) if view is not None else None
            # lazy sites resolve their positions at each call (apply_bound)
            sites.append((site, lazy, [] if lazy is not None else self._positions(op, prepared, site)))
        for j in range(n_rows):
            for op, (site, lazy, positions) in zip(ops, sites):
                out.append(Bound(op, site, start + j * prepared.batch, start + (j + 1) * prepared.batch,
                                 prepared.batch, positions, lazy_tokens=lazy))
        return out

    @staticmethod
    def _positions(op: Op, prepared: Prepared, site: Site) -> list[list[int]]:
        spec, T = op.where.pos, prepared.seq_len
        if T is None:
            if spec.kind != "all":
                raise PositionError(f"positions were given for {site.name!r} but the input has no sequence axis")
            return [[]]
        if spec.kind != "tokens":
            return [spec.resolve(None, T, site.name)]
        keep = op.where.items
        return [spec.resolve(t, T, site.name) if keep is None or i in keep else []
                for i, t in enumerate(prepared.tokens or [None])]

    def entries(self, bound: list[Bound], ctx: RunContext) -> list[Entry]:
        by_site: dict[str, list[Bound]] = {}
        for b in bound:
            by_site.setdefault(b.site.name, []).append(b)
        context = getattr(self.adapter, "context_entries", None)  # pipelines: step / CFG-branch tracking
        head: list[Entry] = context(ctx) if context is not None else []
        return head + [Entry(bs[0].site, _applier(bs, ctx)) for bs in by_site.values()]

    @staticmethod
    def check_fired(bound: list[Bound]) -> None:
        missing = {b.site.name: b for b in bound if not b.fired}
        if not missing:
            return
        name, b = next(iter(missing.items()))
        w = b.op.where
        why = f"site {name!r} (module {b.site.module!r}) did not run during this forward pass"
        if w.steps is not None:
            why += f" within steps {w.steps!r}"
        if w.branch != "both":
            why += (f", or had no rows of branch {w.branch!r} there (without classifier-free guidance a run has "
                    "only 'cond' rows)")
        raise OpNeverFiredError(
            f"{b.op.describe()} never fired: {why}. Unfired sites: {sorted(missing)}. Check that the site is on the "
            "path of this input (e.g. a cross-attention or a branch the model skipped), or drop the op.")

    # -- one experiment ------------------------------------------------------------------------
    def run(self, inputs, ops: Sequence[Op] = (), capture: Sequence[str] | str = (), *, capture_dtype=None,
            offload: str | None = None, pad: bool = False, last_only: bool = False, grad: bool = False,
            ctx: RunContext | None = None) -> RunOutput:
        ad = self.adapter
        prepared = _checked_input(ad, ad.prepare(inputs, pad=pad))
        ctx = ctx or RunContext()
        bound = self.bind(ops, prepared, 0, 1)
        cache = ActivationCache()
        cache.aliases = dict(ad.site_table().aliases)
        entries = self.entries(bound, ctx)
        for pattern in ([capture] if isinstance(capture, str) else capture):
            for site in ad.site_table().resolve(pattern):
                entries.append(capture_entry(site, cache, capture_dtype, offload, grad))
        with torch.set_grad_enabled(grad), attached(ad.root, entries):
            out = ad.forward(prepared, last_only=last_only)
        self.check_fired(bound)
        return RunOutput(out, ad.main_output(out), cache, prepared.tokens)

    # -- many experiments ----------------------------------------------------------------------
    def run_grid(self, inputs, rows: Sequence[Sequence[Op]],
                 metric: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 *, shared: Sequence[Op] = (), last_only: bool = True, chunk_rows: int | None = None,
                 memory_budget: int = 1 << 30, reuse_prefix: bool = True, progress: bool = True,
                 desc: str = "interp grid", ctx: RunContext | None = None, chunk_hook=None, on_base=None,
                 before_chunk=None, row_groups: Sequence[int] | None = None) -> GridOutput:
        # chunk_hook (interp.distributed): .before(rows) -> True to run that chunk here, a [n, batch, ...] tensor
        # of its values from elsewhere, or None to leave it (zeros); .after(rows, values) sees each computed chunk.
        # on_base(output): called with the base run's output; before_chunk(rows): called before a chunk of rows
        # runs here; row_groups: one key per row, rows with different keys never share a chunk
        # (interp.diffusion.sample_grid uses the three for its step-prefix reuse).
        ad = self.adapter
        _check_rows(rows, shared, chunk_rows)
        prepared = _checked_input(ad, ad.prepare(inputs))
        b = prepared.batch
        ctx = ctx or RunContext()
        metric = metric or (lambda logits: logits[:, -1])
        table = ad.site_table()
        blocks = list(getattr(ad, "block_paths", []) or [])
        can_replay = reuse_prefix and bool(blocks) and getattr(ad, "tail", None) is not None

        # base run: shared ops applied, block inputs and call arguments captured for replay
        starts = []
        for ops in rows:
            layers = [table.get(op.site).layer for op in ops]
            starts.append(min(-1 if l is None else l for l in layers) if layers else len(blocks))
        block_in: dict[int, tuple] = {}
        base_bound = self.bind(shared, prepared, 0, 1)
        entries = self.entries(base_bound, ctx)
        if can_replay:
            for i, path in enumerate(blocks):
                site = Site(f"__block_in.{i}", path, io="input", slot=0, arg_name="hidden_states")

                def grab(io, i=i, site=site):
                    args, kwargs, _ = io
                    block_in[i] = (read_input(site, args, kwargs).detach().clone(), args[1:], dict(kwargs))
                entries.insert(0, Entry(site, grab, raw_io=True))
        with torch.no_grad(), attached(ad.root, entries):
            base_out = ad.forward(prepared, last_only=last_only)
        self.check_fired(base_bound)
        if on_base is not None:
            on_base(base_out)
        base_logits = ad.main_output(base_out)
        base_val = metric(base_logits)
        _check_values(base_val, b, rows, None)
        if can_replay and self._replay_ok is None:
            self._replay_ok = self._validate_replay(block_in, base_logits, b, last_only, shared, prepared, ctx)
        replay = can_replay and bool(self._replay_ok)

        # positional prefix reuse (interp.prefix): rows whose edits all sit at position >= p run on positions p..
        T = prepared.seq_len
        packable: dict[int, int] = {}
        if replay and last_only and T and T > 1:
            for r, ops in enumerate(rows):
                p = self._pack_start(ops, starts[r], shared, prepared, table)
                if p is not None:
                    packable[r] = p
        pre = self._prefix_replay(block_in, base_logits, b, T, prepared, ctx) if packable else None
        if pre is None:
            packable = {}

        per_item = self._per_item_bytes(prepared, base_logits, block_in)
        n_chunk = chunk_rows or max(1, int(memory_budget // max(1, per_item * b)))
        values: list[torch.Tensor | None] = [None] * len(rows)
        groups: dict[Any, list[int]] = {}  # start block, or (row group, start block)
        packed: dict[int, list[int]] = {}
        for r, s in enumerate(starts):
            if r in packable:
                packed.setdefault(s, []).append(r)
            else:
                key = s if (replay and 1 <= s < len(blocks)) else 0  # edits after the blocks: full runs
                groups.setdefault(key if row_groups is None else (row_groups[r], key), []).append(r)
        forwards = 0.0
        L = max(1, len(blocks))
        bar = tqdm(total=len(rows), desc=desc, disable=not progress, leave=False)

        def elsewhere(chunk: list[int]) -> bool:
            got: Any = True if chunk_hook is None else chunk_hook.before(chunk)
            if got is True:
                return False
            for j, r in enumerate(chunk if got is not None else ()):
                values[r] = got[j].to(base_val.device)
            bar.update(len(chunk))
            return True
        def finish(pending: list) -> None:
            if not pending:
                return
            assert pre is not None  # packs are pending only when the prefix replay is set up
            with torch.no_grad():  # the head runs once over many packs' final states
                for chunk, val in pre.tails(pending, metric):
                    _check_values(val.reshape(len(chunk) * b, *val.shape[2:]), b, rows, chunk)
                    if chunk_hook is not None:
                        chunk_hook.after(chunk, val)
                    for j, r in enumerate(chunk):
                        values[r] = val[j]
        try:
            for gkey, members in sorted(groups.items()):
                start = gkey if row_groups is None else gkey[1]
                for c in range(0, len(members), n_chunk):
                    chunk = members[c:c + n_chunk]
                    n = len(chunk)
                    if elsewhere(chunk):
                        continue
                    if before_chunk is not None:
                        before_chunk(chunk)
                    bound = []
                    for j, r in enumerate(chunk):
                        bound += self.bind(rows[r], prepared, j * b, 1)
                    kept = shared if (start == 0 or not replay) else \
                        [o for o in shared if _layer(table.get(o.site)) >= start]
                    sbound = list(self.bind(kept, prepared, 0, n))
                    with torch.no_grad(), attached(ad.root, self.entries(sbound + bound, ctx)):
                        if replay and start >= 1:
                            val = self._replay(block_in, start, n, b, last_only, metric)
                            forwards += n * (L - start) / L
                        else:
                            # an edit of the logits themselves needs every position's logits (its positions index them)
                            at_head = any(_layer(bb.site) >= L for bb in bound + sbound)
                            out = ad.forward(prepared.repeat(n), last_only=last_only and not at_head)
                            val = metric(ad.main_output(out))
                            forwards += n
                    self.check_fired(bound + sbound)
                    _check_values(val, b, rows, chunk)
                    val = val.reshape(n, b, *val.shape[1:])
                    if chunk_hook is not None:
                        chunk_hook.after(chunk, val)
                    for j, r in enumerate(chunk):
                        values[r] = val[j]
                    bar.update(n)
            pending: list = []
            if packed:
                from .prefix import Pack
                forwards += 1  # the key/value recording replay
                assert T is not None  # packing needs a sequence axis (checked where packable is built)
                q_max = max(T, min(512, int(memory_budget // max(1, b * per_item))))
            for start, members in sorted(packed.items()):
                assert T is not None and pre is not None  # packed rows exist only with both
                members = sorted(members, key=lambda r: -packable[r])
                c = 0
                while c < len(members):
                    chunk, q = [], 0
                    while c < len(members) and (not chunk or q + T - packable[members[c]] <= q_max):
                        chunk.append(members[c])
                        q += T - packable[members[c]]
                        c += 1
                    if elsewhere(chunk):
                        continue
                    pack = Pack([packable[r] for r in chunk], T)
                    bound = []
                    for j, r in enumerate(chunk):
                        for bb in self.bind(rows[r], prepared, 0, 1):
                            bb.pos_shift, bb.full_len = pack.shift(j), T
                            bound.append(bb)
                    cut = all(_layer(bb.site) < L - 1 for bb in bound)  # no edit inside the last block
                    with torch.no_grad(), attached(ad.root, self.entries(bound, ctx)):
                        pending.append((chunk, pre.run(start, pack, tail=False, cut_last=cut)))
                    forwards += (pack.Q * (L - start - cut) + cut * len(chunk)) / (L * T)
                    self.check_fired(bound)
                    bar.update(len(chunk))
                    if chunk_hook is not None:  # a resumable / sharded sweep keeps each pack as it finishes
                        finish(pending)
                        pending = []
            finish(pending)
        finally:
            bar.close()
        if chunk_hook is not None:  # rows another process computes
            values = [torch.zeros_like(base_val.reshape(b, *base_val.shape[1:])) if v is None else v for v in values]
        stats = {"rows": len(rows), "chunk_rows": n_chunk, "prefix_reuse": replay,
                 "positional_reuse": bool(packable), "packed_rows": len(packable),
                 "forward_equivalents": forwards, "base_batch": b, "refused": dict(self.refused)}
        done = cast("list[torch.Tensor]", values)  # every row has its value now
        return GridOutput(torch.stack(done) if values else torch.empty(0), base_val.reshape(b, *base_val.shape[1:]),
                          prepared.tokens, stats)

    def _replay(self, block_in: dict, start: int, n: int, b: int, last_only: bool, metric=None) -> torch.Tensor:
        """Blocks start.. on n copies of the base batch; the logits, or `metric` of them when given
        (then a column metric needs only its columns of the head: interp.prefix.head_metric)."""
        ad = self.adapter
        first = block_in[start][0]
        hidden = _expand_batch(first, b, n) if b > 1 else first.expand(n, *first.shape[1:])
        for i in range(start, len(ad.block_paths)):
            _, args, kwargs = block_in[i]
            kwargs = {**_expand_batch(kwargs, b, n), **{k: v for k, v in NO_CACHE.items() if k in kwargs}}
            out = ad.root.get_submodule(ad.block_paths[i])(hidden, *_expand_batch(args, b, n), **kwargs)
            hidden = out[0] if isinstance(out, (tuple, list)) else out
        if metric is not None and last_only:
            from .prefix import head_metric

            return head_metric(ad, hidden[:, -1:], metric)
        logits = ad.tail(hidden, last_only)
        return logits if metric is None else metric(logits)

    def _pack_start(self, ops, start: int, shared, prepared: Prepared, table) -> int | None:
        """The first position a row's edits touch, if the row can run on positions >= it only (else None)."""
        if not ops or start < 0 or any(_layer(table.get(o.site)) >= 0 for o in shared):
            return None  # shared ops inside the blocks would also shape the recorded keys/values
        first = None
        for op in ops:
            site = table.get(op.site)
            if not op.can_pack() or op.where.pos.kind == "all" or op.where.steps is not None \
                    or len(site.axes) < 2 or site.axes[1] != "pos" \
                    or site.layer is None or not 0 <= site.layer < len(self.adapter.block_paths):
                return None
            lo = min((min(p) for p in self._positions(op, prepared, site) if p), default=None)
            if lo is None:
                return None
            first = lo if first is None else min(first, lo)
        return first

    def _prefix_replay(self, block_in, base_logits, b, T, prepared, ctx):
        """A validated interp.prefix.PrefixReplay for this base run, or None (then rows use full-length replays)."""
        from .prefix import Pack, PrefixReplay

        if self._packed_ok is False or not block_in:
            return None
        pre = PrefixReplay(self.adapter, block_in, b, T)
        want = base_logits[:, -1:].float()
        scale = want.abs().max().clamp_min(1e-6)
        got = None
        try:
            with torch.no_grad():
                got = pre.record()
                ok = (got is not None and got.shape == want.shape
                      and bool(((got.float() - want).abs().max() / scale) < 1e-4))
                if ok and self._packed_ok is None:
                    starts = sorted({1, T // 2, T - 1})
                    for first in replay_starts(self.adapter, block_in, lowest=0):
                        got = pre.run(first, Pack(starts, T)).float()
                        ok = ok and bool(((got - want.repeat(len(starts), 1, 1)).abs().max() / scale) < 1e-4)
        except Exception as e:  # an architecture whose blocks do not take a key/value cache this way
            ok = False
            self.refused["positional_reuse"] = f"packed replay raised {type(e).__name__}: {str(e)[:80]}"
        if not ok and "positional_reuse" not in self.refused:
            self.refused["positional_reuse"] = ("the blocks do not take a key/value cache interp can prepend to"
                                                if got is None else "packed replay differs from the forward")
        if self._packed_ok is None:  # the first check decides for this model; later misses skip one grid
            self._packed_ok = ok
        return pre if ok else None

    def _validate_replay(self, block_in, base_logits, b, last_only, shared, prepared, ctx) -> bool:
        """Replaying the blocks must give the real forward's logits, from the first block of every block
        type / attention-mask kind (sliding and full layers differ) and on two copies of the batch (the
        shape chunks run at: batch-carrying call arguments such as ALiBi biases must expand)."""
        want = base_logits[:, -1:] if last_only else base_logits
        want = want.repeat(2, *([1] * (want.dim() - 1)))
        scale = want.abs().max().clamp_min(1e-6)
        for start in replay_starts(self.adapter, block_in):
            later = [o for o in shared if _layer(self.adapter.site_table().get(o.site)) >= start]
            bound = self.bind(later, prepared, 0, 2)
            try:
                with torch.no_grad(), attached(self.adapter.root, self.entries(bound, ctx)):
                    got = self._replay(block_in, start, 2, b, last_only)
            except Exception as e:  # an architecture whose blocks cannot be called alone: use full forwards
                self.refused["prefix_reuse"] = (f"replaying blocks {start}.. on 2 batch copies raised "
                                                f"{type(e).__name__}: {str(e)[:80]}")
                return False
            got = got[:, -want.shape[1]:]
            if not (got.shape == want.shape and bool(((got - want).abs().max() / scale) < 1e-4)):
                diff = float((got - want).abs().max() / scale) if got.shape == want.shape else float("inf")
                self.refused["prefix_reuse"] = f"replaying blocks {start}.. differs from the forward by {diff:.1e}"
                return False
        return True

    @staticmethod
    def _per_item_bytes(prepared: Prepared, logits: torch.Tensor, block_in: dict) -> int:
        T = prepared.seq_len or 1
        width = block_in[0][0].shape[-1] if block_in else 1024
        act = T * width * 4 * 24
        return act + logits[0].numel() * logits.element_size()
