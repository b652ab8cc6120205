"""Runs: one experiment (`run`) or many rows packed into the batch dimension (`run_grid`).

An op is bound to a site and to the batch items of its row; at the site's hook all bound edits are
applied through interp.kernels, patches from one source in one fused call. Rows whose edits all sit
at block >= l start from the base run's cached input of block l ("prefix reuse").
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from tqdm.auto import tqdm

from . import kernels as K
from .adapters.base import Prepared
from .cache import ActivationCache, capture_entry
from .errors import OpNeverFiredError, PositionError, SiteShapeError
from .hooks import Entry, StopForward, attached, read_input
from .ops import Ablate, Add, Noise, Op, Patch, Project, Replace, Subject, Tokens, Where
from .sites import Site

_MIX = 0x9E3779B97F4A7C15 % (1 << 61)


def _layer(site: Site) -> int:
    return -1 if site.layer is None else site.layer


# ---------------------------------------------------------------------------------------------
# positions and selections
# ---------------------------------------------------------------------------------------------

def subject_positions(tokens: Sequence[str], text: str) -> list[int]:
    """Token positions whose characters overlap the last occurrence of `text` in the decoded prompt."""
    starts, s = [], 0
    for t in tokens:
        starts.append(s)
        s += len(t)
    full = "".join(tokens)
    at = full.rfind(text)
    if at < 0:
        at = full.rfind(text.strip())
        text = text.strip()
    if at < 0:
        raise PositionError(f"subject {text!r} does not occur in the prompt {full!r} (tokens: {list(tokens)})")
    end = at + len(text)
    return [i for i, (st, t) in enumerate(zip(starts, tokens)) if st < end and st + len(t) > at]


def resolve_positions(spec: Any, tokens: Sequence[str] | None, T: int, site: str = "") -> list[int]:
    """A position spec (None, int, list, slice, Tokens, Subject) -> sorted position list for one item."""
    if spec is None:
        return list(range(T))
    if isinstance(spec, Tokens):
        if not tokens:
            raise PositionError(f"Tokens({spec.text!r}) needs token strings: run on prompts with a tokenizer")
        hits = [i for i, t in enumerate(tokens) if t.strip() == spec.text.strip()]
        if not hits:
            raise PositionError(f"token {spec.text!r} is not in the prompt; its tokens are {list(tokens)}")
        return hits if spec.occurrence is None else [hits[spec.occurrence]]
    if isinstance(spec, Subject):
        if not tokens:
            raise PositionError(f"Subject({spec.text!r}) needs token strings: run on prompts with a tokenizer")
        pos = subject_positions(tokens, spec.text)
        return {"last": pos[-1:], "first": pos[:1], "all": pos}[spec.which]
    if isinstance(spec, slice):
        return list(range(T))[spec]
    if isinstance(spec, range):
        spec = list(spec)
    items = [spec] if isinstance(spec, int) else list(spec)
    out = []
    for p in items:
        p = int(p)
        if not -T <= p < T:
            raise PositionError(f"position {p} is out of range for {site or 'the site'}: the input has "
                                f"{T} positions (valid: 0..{T - 1} or -{T}..-1)")
        out.append(p % T)
    return out


def resolve_heads(spec: Any, n_heads: int | None, site: Site) -> list[int] | None:
    if spec is None:
        return None
    if n_heads is None:
        raise PositionError(f"heads= was given for {site.name!r}, which has no head axis "
                            f"(axes {site.axes}); use a per-head site such as 'blocks.0.attn.z'")
    hs = [spec] if isinstance(spec, int) else list(spec)
    for h in hs:
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

    def items(self, ctx: "RunContext | None" = None) -> list[int]:
        return [row for _, row in self.rows(ctx)]

    def rows(self, ctx: "RunContext | None" = None) -> list[tuple[int, int]]:
        """(base row, tensor row) pairs. With classifier-free guidance (ctx.branches), base row r sits at
        tensor row ctx.branches[branch][r] for each branch the op selects."""
        w = self.op.where.items
        rows = range(self.start, self.stop)
        if w is not None:
            keep = {w} if isinstance(w, int) else set(w)
            rows = [r for r in rows if (r - self.start) % self.base_batch in keep]
        if ctx is None or ctx.branches is None:
            return [(r, r) for r in rows]
        names = ("uncond", "cond") if self.op.where.branch == "both" else (self.op.where.branch,)
        return [(r, ctx.branches[n][r]) for n in names if n in ctx.branches for r in rows]

    def index(self, heads: list[int] | None, dev, ctx: "RunContext | None" = None) -> torch.Tensor:
        """[K, 2] (item, pos) or [K, 3] (item, pos, head) destination index."""
        rows = []
        for r, row in self.rows(ctx):
            for p in self.positions[(r - self.start) % self.base_batch % len(self.positions)]:
                if heads is None:
                    rows.append((row, p + self.pos_shift))
                else:
                    rows.extend((row, p + self.pos_shift, h) for h in heads)
        width = 2 if heads is None else 3
        return torch.tensor(rows, dtype=torch.long, device=dev).reshape(-1, width)


@dataclass
class RunContext:
    """What the hooks know about the call in flight; the diffusion runner sets `step` and `branches`."""

    step: int | None = None
    branches: dict[str, list[int]] | None = None  # "cond"/"uncond" -> tensor row of each base row
    n_steps: int | None = None  # denoising steps of the sampling run in flight (range checks)


def _step_list(s) -> list[int]:
    if isinstance(s, tuple) and len(s) == 2:
        return [s[0], s[1] - 1]
    return list(s) if isinstance(s, (range, list, set, tuple)) else [s]


def _step_ok(where: Where, ctx: RunContext, site: Site) -> bool:
    if where.steps is None:
        return True
    if ctx.n_steps is not None:
        s = where.steps
        if any(not 0 <= int(v) < ctx.n_steps for v in _step_list(s)) or (isinstance(s, tuple) and len(s) == 2 and s[1] <= s[0]):
            raise PositionError(f"steps={s!r} for an op at {site.name!r} is out of range: this run has "
                                f"{ctx.n_steps} denoising steps (indices 0..{ctx.n_steps - 1}; a window is (start, stop))")
        if ctx.step is None:
            raise PositionError(f"an op at {site.name!r} selects steps={s!r}, but {site.name!r} runs before the "
                                "denoising loop (once per sampling run); to edit the text conditioning inside a step "
                                "window use the denoiser's context site ('unet.context' / 'transformer.context')")
    if ctx.step is None:
        raise PositionError(f"an op at {site.name!r} selects steps={where.steps!r}, but this run has no "
                            "denoising steps; use interp.diffusion for step-aware runs")
    s = where.steps
    if isinstance(s, tuple) and len(s) == 2:
        return s[0] <= ctx.step < s[1]
    return ctx.step in (s if isinstance(s, (range, list, set, tuple)) else [s])


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

def _source_for(op_source: torch.Tensor, x: torch.Tensor, site: Site, what: str, T: int | None = None) -> torch.Tensor:
    """Check a source/pool tensor against the site tensor x [N, T, *F]; returns it as [B, T, *F]."""
    feat, T = tuple(x.shape[2:]), (x.shape[1] if T is None else T)
    src = op_source
    if site.heads is not None and tuple(src.shape[-len(feat):]) != feat and tuple(src.shape[-1:]) == (math.prod(feat),):
        src = src.unflatten(-1, feat)  # merged-head source for a per-head site
    if tuple(src.shape[-len(feat):] if feat else ()) != feat or src.dim() not in (len(feat) + 1, len(feat) + 2):
        raise SiteShapeError(f"{what} for {site.name!r} has shape {tuple(op_source.shape)}, but the site carries "
                             f"[batch, {T}, {', '.join(map(str, feat))}] ({', '.join(site.axes)}): pass a tensor "
                             f"of shape [{T}, {', '.join(map(str, feat))}] or [batch, {T}, ...] captured at this site")
    if src.dim() == len(feat) + 1:
        src = src[None]
    if src.shape[1] != T:
        raise SiteShapeError(f"{what} for {site.name!r} has {src.shape[1]} positions, the running input has {T}: "
                             "clean and corrupted prompts must have the same token length")
    if src.dtype != x.dtype:
        raise SiteShapeError(f"{what} for {site.name!r} has dtype {src.dtype}, the site carries {x.dtype}: "
                             f"cast it with .to({x.dtype})")
    return src.to(x.device)


def _flat_heads(x: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, T, H, D] with [K, 3] index -> [N, T*H, D] view with [K, 2] index."""
    H = x.shape[2]
    return x.flatten(1, 2), torch.stack([idx[:, 0], idx[:, 1] * H + idx[:, 2]], 1)


def _as_rows(x: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A [N, T, *F] tensor and index -> [N, T', F'] view and [K, 2] index for the row kernels."""
    if idx.shape[1] == 3:
        x, idx = _flat_heads(x, idx)
    return x.flatten(2) if x.dim() > 3 else x, idx


def _branch_ok(where: Where, ctx: RunContext, site: Site) -> bool:
    if where.branch == "both":
        return True
    if ctx.branches is None:
        raise PositionError(f"an op at {site.name!r} selects branch={where.branch!r}, but this run has no "
                            "classifier-free-guidance branches; branch selection needs a diffusers pipeline run")
    return bool(ctx.branches.get(where.branch))


def apply_bound(x: torch.Tensor, bound: list[Bound], ctx: RunContext) -> torch.Tensor | None:
    """Apply every bound op to the site tensor x; returns the edited tensor or None if none applied.

    The kernels are called with check=False: the indices are built here from positions and heads that
    resolve_positions / resolve_heads already checked on the host, so the kernels' range check (one
    device-to-host sync per call on a GPU) would only repeat it."""
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
    patches: dict[int, list[tuple[Bound, torch.Tensor, torch.Tensor]]] = {}
    for b in active:
        b.fired = True
        op = b.op
        if b.lazy_tokens is not None:
            b.positions = [resolve_positions(op.where.pos, t, x.shape[1], site.name) for t in b.lazy_tokens]
        if isinstance(op, Add) and op.spatial is not None:
            if op.alpha != 0:
                _add_spatial(x, op, b.items(ctx), site)
            continue
        heads = resolve_heads(op.where.heads, n_heads, site)
        top = max((max(p) for p in b.positions if p), default=-1) + b.pos_shift  # host-side: no device sync
        if top >= x.shape[1]:
            raise PositionError(f"{op.describe()}: position {top - b.pos_shift} is out of range for {site.name!r}, "
                                f"whose tensor has {x.shape[1]} positions on axis 1 (shape {tuple(x.shape)}; the "
                                f"input has {b.full_len or 'more'}): pass positions 0..{x.shape[1] - 1} of this site")
        idx = b.index(heads, x.device, ctx)
        if idx.numel() == 0:
            continue
        if isinstance(op, Patch):
            source = op.source
            if flat and source.dim() in (1, 2) and source.shape[-1] == x.shape[-1]:
                source = source.reshape(-1, 1, x.shape[-1])  # a [batch, d] site: one position per item
            src = _source_for(source, x, site, "patch source", b.full_len)
            rows = (idx[:, 0] - b.start) % b.base_batch % src.shape[0]
            sidx = idx.clone()
            sidx[:, 0] = rows
            sidx[:, 1] -= b.pos_shift
            patches.setdefault(id(op.source), []).append((b, idx, sidx, src))
        elif isinstance(op, Add):
            if op.alpha == 0:
                continue
            v = op.vector.to(device=x.device, dtype=x.dtype)
            xr, ridx = _as_rows(x, idx)
            if v.numel() != xr.shape[-1]:
                raise SiteShapeError(f"steering vector for {site.name!r} has {v.numel()} elements, the site's "
                                     f"feature size is {xr.shape[-1]} (axes {site.axes})")
            K.add_scaled(xr, v.reshape(-1), ridx, float(op.alpha), norm=op.norm, renorm=op.renorm, check=False)
        elif isinstance(op, Noise):
            xr, ridx = _as_rows(x, idx)
            item = (idx[:, 0] - b.start) % b.base_batch
            seeds = (((op.seed * _MIX) % (1 << 62) + item * 1_000_003 + ridx[:, 1]) % (1 << 62)).to(torch.long)
            K.noise(xr, ridx, float(op.std), seeds, check=False)
        elif isinstance(op, Ablate):
            _ablate(x, op, b, idx, site)
        elif isinstance(op, Project):
            L, R, mu = op.factors()
            xr, ridx = _as_rows(x, idx)
            K.project(xr, L.to(x.device, x.dtype), R.to(x.device, x.dtype),
                      None if mu is None else mu.to(x.device, x.dtype), ridx, check=False)
        elif isinstance(op, Replace):
            items = torch.tensor(b.items(ctx), device=x.device)
            pos = torch.tensor(b.positions[0], device=x.device)
            sel = x[items][:, pos]
            new = op.fn(sel)
            if not isinstance(new, torch.Tensor) or new.shape != sel.shape:
                raise SiteShapeError(f"Replace fn at {site.name!r} must return a tensor of shape {tuple(sel.shape)}, "
                                     f"got {getattr(new, 'shape', type(new).__name__)}")
            x[items[:, None], pos[None, :]] = new.to(x.dtype)
    for group in patches.values():
        src = group[0][3]
        didx = torch.cat([g[1] for g in group])
        sidx = torch.cat([g[2] for g in group])
        alphas = [g[0].op.alpha for g in group]
        alpha = None if all(a == 1.0 for a in alphas) else torch.cat(
            [torch.full((g[1].shape[0],), float(g[0].op.alpha), device=x.device) for g in group])
        K.row_patch(x, src, didx, sidx, alpha, check=False)
    return x[:, 0] if flat else x


def _add_spatial(x: torch.Tensor, op: Add, items: list[int], site: Site) -> None:
    """Add.spatial on a grid tensor: "keep" = one row per item; "average" = one row per location."""
    N = x.shape[0]
    if op.spatial == "keep":
        rows = x.reshape(N, 1, -1).contiguous()
    elif x.dim() >= 4:  # channels first: [N, C, *S] -> [N, prod(S), C]
        rows = x.movedim(1, -1).reshape(N, -1, x.shape[1]).contiguous()
    else:
        rows = x.reshape(N, -1, x.shape[-1]).contiguous()
    v = op.vector.to(device=x.device, dtype=x.dtype).reshape(-1)
    if v.numel() != rows.shape[-1]:
        want = "the item's full shape " + str(tuple(x.shape[1:])) if op.spatial == "keep" else f"{rows.shape[-1]} channels"
        raise SiteShapeError(f"steering vector for {site.name!r} has {v.numel()} elements, but spatial={op.spatial!r} "
                             f"on a tensor of shape {tuple(x.shape)} needs {want}")
    idx = torch.tensor([(r, p) for r in items for p in range(rows.shape[1])], dtype=torch.long,
                       device=x.device).reshape(-1, 2)
    K.add_scaled(rows, v, idx, float(op.alpha), norm=op.norm, renorm=op.renorm, check=False)
    if op.spatial == "average" and x.dim() >= 4:
        x.copy_(rows.reshape(N, *x.shape[2:], x.shape[1]).movedim(-1, 1))
    else:
        x.copy_(rows.reshape(x.shape))


def _ablate(x: torch.Tensor, op: Ablate, b: Bound, idx: torch.Tensor, site: Site) -> None:
    feat = x.shape[2:]
    if op.mode == "zero":
        src = torch.zeros((1, 1, *feat), dtype=x.dtype, device=x.device)
        sidx = torch.zeros_like(idx)
        if idx.shape[1] == 3:
            sidx[:, 2] = idx[:, 2]
            src = torch.zeros((1, 1, *feat), dtype=x.dtype, device=x.device)
        K.row_patch(x, src, idx, sidx, check=False)
        return
    if op.values is None:
        raise SiteShapeError(f"Ablate(mode={op.mode!r}) at {site.name!r} needs values=: the mean activation "
                             "([*F] or [T, *F]) or a pool of activations ([B, T, *F]) from a reference dataset")
    vals = op.values.to(x.device, x.dtype)
    if op.mode == "mean":
        if vals.dim() == len(feat):
            src = vals.expand(1, x.shape[1], *feat)
        else:
            src = _source_for(vals, x, site, "mean values")
        sidx = idx.clone()
        sidx[:, 0] = 0
        K.row_patch(x, src.contiguous(), idx, sidx, check=False)
    else:  # resample: each destination item takes a seeded random item of the pool
        pool = _source_for(vals, x, site, "resample pool")
        g = torch.Generator().manual_seed(op.seed)
        pick = torch.randint(0, pool.shape[0], (b.stop - b.start,), generator=g).to(x.device)
        sidx = idx.clone()
        sidx[:, 0] = pick[(idx[:, 0] - b.start) % (b.stop - b.start)]
        K.row_patch(x, pool, idx, sidx, check=False)


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
        out = []
        for op in ops:
            items = op.where.items
            bad = [i for i in ([items] if isinstance(items, int) else (items or ())) if not 0 <= int(i) < prepared.batch]
            if bad:
                raise PositionError(f"items={items!r} for an op at {op.site!r}: {bad} out of range, this input has "
                                    f"{prepared.batch} item(s) (0..{prepared.batch - 1}); items index the batch "
                                    "of the input (the prompts, or one sampling request's images)")
        for j in range(n_rows):
            for op in ops:
                site = table.get(op.site)
                if op.where.stream is not None:
                    site = _stream_site(site, op.where.stream, table)
                view = getattr(prepared, "site_view", None)  # diffusers inputs: per-component token axes
                lazy = view(site) if view is not None else None
                positions = None if lazy is not None else self._positions(op.where.pos, prepared, site, op.where.items)
                out.append(Bound(op, site, start + j * prepared.batch, start + (j + 1) * prepared.batch,
                                 prepared.batch, positions, lazy_tokens=lazy))
        return out

    def _positions(self, spec, prepared: Prepared, site: Site, where_items=None) -> list[list[int]]:
        T = prepared.seq_len
        if T is None:
            if spec is not None:
                raise PositionError(f"positions were given for {site.name!r} but the input has no sequence axis")
            return [[]]
        toks = prepared.tokens or [None]
        if isinstance(spec, (Tokens, Subject)):
            items = where_items
            keep = None if items is None else ({items} if isinstance(items, int) else set(items))
            return [resolve_positions(spec, t, T, site.name) if keep is None or i in keep else []
                    for i, t in enumerate(toks)]
        return [resolve_positions(spec, None, T, site.name)]

    def entries(self, bound: list[Bound], ctx: RunContext) -> list[Entry]:
        by_site: dict[str, list[Bound]] = {}
        for b in bound:
            by_site.setdefault(b.site.name, []).append(b)
        context = getattr(self.adapter, "context_entries", None)  # pipelines: step / CFG-branch tracking
        return (context(ctx) if context is not None else []) + \
            [Entry(bs[0].site, (lambda x, bs=bs: apply_bound(x, bs, ctx))) for bs in by_site.values()]

    @staticmethod
    def check_fired(bound: list[Bound]) -> None:
        missing = {b.site.name: b.op for b in bound if not b.fired}
        if missing:
            name, op = next(iter(missing.items()))
            raise OpNeverFiredError(
                f"{op.describe()} never fired: site {name!r} (module {next(b.site.module for b in bound if b.site.name == name)!r}) "
                f"did not run during this forward pass{'' if op.where.steps is None else f' within steps {op.where.steps!r}'}. "
                f"Unfired sites: {sorted(missing)}. Check that the site is on the path of this input "
                "(e.g. a cross-attention or a branch the model skipped), or drop the op.")

    # -- one experiment ------------------------------------------------------------------------
    def run(self, inputs, ops: Sequence[Op] = (), capture: Sequence[str] | str = (), *, capture_dtype=None,
            offload: str | None = None, pad: bool = False, last_only: bool = False, grad: bool = False,
            ctx: RunContext | None = None) -> RunOutput:
        ad = self.adapter
        prepared = ad.prepare(inputs, pad=pad)
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
    def run_grid(self, inputs, rows: Sequence[Sequence[Op]], metric: Callable[[torch.Tensor], torch.Tensor] | None = None,
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
        prepared = ad.prepare(inputs)
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
        groups: dict[int, list[int]] = {}
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
            got = True if chunk_hook is None else chunk_hook.before(chunk)
            if got is True:
                return False
            for j, r in enumerate(chunk if got is not None else ()):
                values[r] = got[j].to(base_val.device)
            bar.update(len(chunk))
            return True
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
                    sbound = [bb for bb in self.bind(shared, prepared, 0, n)] if (start == 0 or not replay) else \
                        [bb for bb in self.bind([o for o in shared if _layer(table.get(o.site)) >= start], prepared, 0, n)]
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
                q_max = max(T, min(512, int(memory_budget // max(1, b * per_item))))
            for start, members in sorted(packed.items()):
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
            with torch.no_grad():  # the head runs once over many packs' final states
                for chunk, val in (pre.tails(pending, metric) if pending else ()):
                    if chunk_hook is not None:
                        chunk_hook.after(chunk, val)
                    for j, r in enumerate(chunk):
                        values[r] = val[j]
        finally:
            bar.close()
        if chunk_hook is not None:  # rows another process computes
            values = [torch.zeros_like(base_val.reshape(b, *base_val.shape[1:])) if v is None else v for v in values]
        stats = {"rows": len(rows), "chunk_rows": n_chunk, "prefix_reuse": replay,
                 "positional_reuse": bool(packable), "packed_rows": len(packable),
                 "forward_equivalents": forwards, "base_batch": b, "refused": dict(self.refused)}
        return GridOutput(torch.stack(values) if values else torch.empty(0), base_val.reshape(b, *base_val.shape[1:]),
                          prepared.tokens, stats)

    def _replay(self, block_in: dict, start: int, n: int, b: int, last_only: bool, metric=None) -> torch.Tensor:
        """Blocks start.. on n copies of the base batch; the logits, or `metric` of them when given
        (then a column metric needs only its columns of the head: interp.prefix.head_metric)."""
        ad = self.adapter
        hidden = _expand_batch(block_in[start][0], b, n) if b > 1 else block_in[start][0].expand(n, *block_in[start][0].shape[1:])
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

    _PACK_OPS = (Patch, Add, Project)

    def _pack_start(self, ops, start: int, shared, prepared: Prepared, table) -> int | None:
        """The first position a row's edits touch, if the row can run on positions >= it only (else None)."""
        if not ops or start < 0 or any(_layer(table.get(o.site)) >= 0 for o in shared):
            return None  # shared ops inside the blocks would also shape the recorded keys/values
        first = None
        for op in ops:
            if not (isinstance(op, self._PACK_OPS) or (isinstance(op, Ablate) and op.mode == "zero")):
                return None
            site = table.get(op.site)
            if op.where.pos is None or op.where.steps is not None or len(site.axes) < 2 or site.axes[1] != "pos" \
                    or site.layer is None or not 0 <= site.layer < len(self.adapter.block_paths):
                return None
            if isinstance(op, Add) and getattr(op, "spatial", None) is not None:
                return None
            pos = self._positions(op.where.pos, prepared, site, op.where.items)
            lo = min((min(p) for p in pos if p), default=None)
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
                ok = got is not None and got.shape == want.shape and bool(((got.float() - want).abs().max() / scale) < 1e-4)
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
