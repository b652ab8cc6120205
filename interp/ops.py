"""Intervention values: frozen, inspectable descriptions of an edit at one site.

An op never touches a model. It validates itself when it is built (one-line InterpError naming the
field), says whether the positional-pack shortcut can run it (`packable`), fingerprints itself for
resumable sweeps (`fingerprint`) and applies itself to a site tensor (`apply`, through the fused
kernels in interp.kernels) once the engine has bound it to destinations (a `Target`).

`Where` normalises its `pos` into a `Positions` value and its `steps` into a `Steps` value, so a
bad spec is refused when the op is written, not when a hook runs; `Positions.resolve` is the one
position resolver of `run`, `run_grid` and sessions.
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, cast

import torch

from .errors import PositionError, PositionSpecError, SiteShapeError, SpecError

GENERATED = "generated"
PosSpec = Any  # None | int | Sequence[int] | slice | range | Tokens | Subject | "generated"


def _finite(name: str, value: Any) -> None:
    """NaN / inf policy: refused where an op is built."""
    if isinstance(value, torch.Tensor):
        if value.device.type == "meta":
            raise SpecError(f"{name} is on the meta device (it has no values): pass a tensor with data, "
                            "e.g. captured from a real run or moved with .to('cpu')")
        if value.is_floating_point() or value.is_complex():
            if value.numel() and not bool(torch.isfinite(value).all()):
                raise SpecError(f"{name} contains NaN or inf values: ops only take finite tensors")
    elif isinstance(value, numbers.Real) and not isinstance(value, bool):
        if not math.isfinite(float(value)):
            raise SpecError(f"{name}={value!r} is not finite: ops only take finite numbers")
    else:
        raise SpecError(f"{name} must be a number, not {type(value).__name__}")


def _as_int(v: Any, what: str) -> int:
    if isinstance(v, torch.Tensor) and v.dim() == 0 and not v.is_floating_point():
        v = int(v)
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise SpecError(f"{what} {v!r} is not an integer ({type(v).__name__}); positions, items, heads and "
                        "steps are ints")
    return int(v)


def _int_tuple(spec: Any, what: str) -> tuple[int, ...]:
    """An int, a sequence / range / 1-D tensor or array of ints -> a non-empty tuple of ints."""
    if isinstance(spec, (str, bytes)):
        raise SpecError(f"{what}={spec!r} is a string: give an int or a list of ints")
    if not isinstance(spec, numbers.Number) and hasattr(spec, "shape") and hasattr(spec, "tolist"):
        if len(spec.shape) > 1:
            raise SpecError(f"{what} is a {len(spec.shape)}-D array of shape {tuple(spec.shape)}: give an int or a "
                            "1-D list of ints (one list serves every batch item)")
        spec = spec.tolist()
    if isinstance(spec, (set, frozenset)):
        spec = sorted(spec)
    out = tuple(_as_int(v, what) for v in spec) if isinstance(spec, (Sequence, range)) else (_as_int(spec, what),)
    if not out:
        raise SpecError(f"{what}=[] selects nothing; every op must edit something (drop the op instead)")
    return out


@dataclass(frozen=True)
class Tokens:
    """Positions whose token string matches `text` (stripped, case-sensitive); `occurrence` picks one."""

    text: str
    occurrence: int | None = None  # None: every match; 0: first; -1: last

    def __post_init__(self):
        if not isinstance(self.text, str) or not self.text.strip():
            raise SpecError(f"Tokens(text={self.text!r}): the token text must be a non-empty string")
        if self.occurrence is not None:
            _as_int(self.occurrence, "Tokens occurrence")

    def find(self, tokens: Sequence[str], site: str = "") -> list[int]:
        hits = [i for i, t in enumerate(tokens) if t.strip() == self.text.strip()]
        if not hits:
            raise PositionError(f"token {self.text!r} is not in the prompt; its tokens are {list(tokens)}")
        if self.occurrence is None:
            return hits
        if not -len(hits) <= self.occurrence < len(hits):
            raise PositionError(f"Tokens({self.text!r}, occurrence={self.occurrence}): the prompt has {len(hits)} "
                                f"occurrence(s) at positions {hits} (valid occurrence: {-len(hits)}..{len(hits) - 1})")
        return [hits[self.occurrence]]


@dataclass(frozen=True)
class Subject:
    """Positions of the tokens that spell `text` inside the prompt.

    which: "last" (default), "first" or "all" of those tokens. occurrence: which appearance of `text`
    when it appears more than once: 0 (default) is the first, as in ROME's causal tracing; -1 the last.
    """

    text: str
    which: str = "last"
    occurrence: int = 0

    def __post_init__(self):
        if not isinstance(self.text, str) or not self.text.strip():
            raise SpecError(f"Subject(text={self.text!r}): the subject must be a non-empty string")
        if self.which not in ("last", "first", "all"):
            raise SpecError(f"Subject(which={self.which!r}): which must be 'last', 'first' or 'all'")
        _as_int(self.occurrence, "Subject occurrence")

    def find(self, tokens: Sequence[str], site: str = "") -> list[int]:
        starts, s = [], 0
        for t in tokens:
            starts.append(s)
            s += len(t)
        full = "".join(tokens)
        text = self.text if self.text in full else self.text.strip()
        found, i = [], full.find(text)
        while i >= 0:
            found.append(i)
            i = full.find(text, i + 1)
        if not found:
            raise PositionError(f"subject {text!r} does not occur in the prompt {full!r} (tokens: {list(tokens)})")
        if not -len(found) <= self.occurrence < len(found):
            raise PositionError(f"Subject({self.text!r}, occurrence={self.occurrence}): it occurs {len(found)} time(s) "
                                f"in {full!r} (valid occurrence: {-len(found)}..{len(found) - 1})")
        a = found[self.occurrence]
        pos = [j for j, (st, t) in enumerate(zip(starts, tokens)) if st < a + len(text) and st + len(t) > a]
        return {"last": pos[-1:], "first": pos[:1], "all": pos}[self.which]


@dataclass(frozen=True, repr=False)
class Positions:
    """A normalised position spec: kind "all" | "index" | "slice" | "tokens" | "generated"."""

    kind: str = "all"
    index: tuple[int, ...] = ()
    bounds: tuple[int | None, int | None, int | None] = (None, None, None)
    select: Tokens | Subject | None = None

    @staticmethod
    def of(spec: PosSpec) -> Positions:
        if isinstance(spec, Positions):
            return spec
        if spec is None:
            return Positions()
        if isinstance(spec, str):
            if spec == GENERATED:
                return Positions("generated")
            raise PositionSpecError(f"pos={spec!r}: the only string position is {GENERATED!r} (tokens made by generate "
                            "inside lm.applied); use ints (pos=-1 is the last position) or Tokens(text) for text")
        if isinstance(spec, (Tokens, Subject)):
            return Positions("tokens", select=spec)
        if isinstance(spec, slice):
            start, stop, step = (None if v is None else _as_int(v, "slice bound")
                                 for v in (spec.start, spec.stop, spec.step))
            b = (start, stop, step)
            if b[2] == 0:
                raise PositionSpecError("pos=slice(..., step=0): a slice step cannot be zero")
            return Positions("slice", bounds=b)
        try:
            return Positions("index", index=_int_tuple(spec, "pos"))
        except SpecError as e:
            raise PositionSpecError(str(e)) from None

    @property
    def spec(self) -> PosSpec:
        """The spec in the form a user writes it."""
        return {"all": None, "generated": GENERATED, "tokens": self.select, "slice": slice(*self.bounds),
                "index": self.index[0] if len(self.index) == 1 else list(self.index)}[self.kind]

    def __repr__(self) -> str:
        return repr(self.spec)

    def resolve(self, tokens: Sequence[str] | None, T: int, site: str = "") -> list[int]:
        """The positions this spec selects in one item of T positions (`tokens`: its token strings)."""
        where = f" for {site!r}" if site else ""
        if self.kind == "all":
            return list(range(T))
        if self.kind == "generated":
            raise PositionError(f"pos='generated'{where} selects tokens made by generate; a single run has none: use "
                                "it inside `with lm.applied([...]): model.generate(...)`")
        if self.kind == "tokens":
            if not tokens:
                raise PositionError(f"{self.select!r}{where} needs token strings: run on prompts with a tokenizer")
            assert self.select is not None  # kind "tokens" always carries its selector
            return self.select.find(tokens, site)
        if self.kind == "slice":
            got = list(range(T))[slice(*self.bounds)]
            if not got:
                raise PositionError(f"pos={self!r}{where} selects no position: the input has {T} positions")
            return got
        for p in self.index:
            if not -T <= p < T:
                raise PositionError(f"position {p} is out of range{where}: the input has {T} positions "
                                    f"(valid: 0..{T - 1} or -{T}..-1)")
        return [p % T for p in self.index]

    def absolute(self, tokens: Sequence[str] | None, P: int,
                 site: str = "") -> tuple[list[int], tuple[int, int] | None]:
        """For a sequence growing past a prompt of P positions (generate): fixed positions, and an open
        progression (start, step) reaching into generated tokens, or None. Negative ints and slices with
        a negative part count from the end of the prompt, so the edited set does not depend on how the
        sequence is cut into calls (with or without a KV cache)."""
        if self.kind == "all":
            return [], (0, 1)
        if self.kind == "generated":
            return [], (P, 1)
        if self.kind == "slice":
            a, b, s = self.bounds
            if b is None and (s or 1) > 0 and (a is None or a >= 0):
                return [], (a or 0, s or 1)
            return self.resolve(tokens, P, site), None
        if self.kind == "tokens":
            return self.resolve(tokens, P, site), None
        bad = [p for p in self.index if p < -P]
        if bad:
            raise PositionError(f"position {bad[0]} for {site!r} is before the start of the {P}-token prompt")
        return sorted({p % P if p < 0 else p for p in self.index}), None


@dataclass(frozen=True, repr=False)
class Steps:
    """Denoising steps an op acts at: explicit indices, or a window [start, stop)."""

    index: tuple[int, ...] = ()
    bounds: tuple[int, int] | None = None

    @staticmethod
    def window(start: int, stop: int) -> Steps:
        start, stop = _as_int(start, "step window start"), _as_int(stop, "step window stop")
        if not 0 <= start < stop:
            raise SpecError(f"steps=({start}, {stop}): a window is (start, stop) with 0 <= start < stop")
        return Steps(bounds=(start, stop))

    @staticmethod
    def of(spec: Any) -> Steps | None:
        if spec is None or isinstance(spec, Steps):
            return spec
        if isinstance(spec, tuple) and len(spec) == 2:
            return Steps.window(*spec)
        idx = _int_tuple(spec, "steps")
        if any(s < 0 for s in idx):
            raise SpecError(f"steps={spec!r}: step indices count from 0 (the first denoising step)")
        return Steps(index=idx)

    def __repr__(self) -> str:
        return repr(self.bounds) if self.bounds else repr(list(self.index))

    def contains(self, step: int) -> bool:
        return self.bounds[0] <= step < self.bounds[1] if self.bounds else step in self.index

    def first(self) -> int:
        return self.bounds[0] if self.bounds else min(self.index)

    def indices(self, n_steps: int, site: str = "") -> list[int]:
        """The selected steps of a run of n_steps, range-checked."""
        got = list(range(*self.bounds)) if self.bounds else list(self.index)
        last = self.bounds[1] - 1 if self.bounds else max(got)
        if last >= n_steps:
            raise PositionError(f"steps={self!r} for {site!r} are out of range: this run has {n_steps} denoising "
                                f"steps (indices 0..{n_steps - 1}; a window is (start, stop))")
        return got


def _branch(b: str) -> str:
    if b not in ("cond", "uncond", "both"):
        raise SpecError(f"branch must be 'cond', 'uncond' or 'both', not {b!r}")
    return b


@dataclass(frozen=True)
class Where:
    """What part of a site's tensor an op touches.

    pos: positions (None = all; see Positions); heads: head indices on per-head sites (None = all);
    items: batch items of the base input (None = all); steps: denoising step indices or a
    (start, stop) window (None = every call; see Steps); branch: "cond" | "uncond" | "both" for
    classifier-free guidance; stream: "img" | "txt" for joint-attention blocks.
    """

    # annotated with the normalized types; __post_init__ also accepts what interp.at() takes
    # (a position spec, an int or a sequence of ints, a (start, stop) step window) and normalizes it
    pos: Positions = field(default_factory=Positions)
    heads: tuple[int, ...] | None = None
    items: tuple[int, ...] | None = None
    steps: Steps | None = None
    branch: str = "both"
    stream: str | None = None

    def __post_init__(self):
        put = object.__setattr__
        put(self, "pos", Positions.of(self.pos))
        for name in ("heads", "items"):
            v = getattr(self, name)
            put(self, name, None if v is None else _int_tuple(v, name))
        if self.heads is not None and min(self.heads) < 0 or self.items is not None and min(self.items) < 0:
            raise SpecError(f"heads={self.heads!r} / items={self.items!r}: indices count from 0")
        put(self, "steps", Steps.of(self.steps))
        _branch(self.branch)
        if self.stream not in (None, "img", "txt"):
            raise SpecError(f"stream must be None, 'img' or 'txt', not {self.stream!r}")


ALL = Where()


def at(pos: PosSpec = None, heads=None, items=None, steps=None, branch: str = "both", stream=None) -> Where:
    """Shorthand for Where(...)."""
    return Where(pos=pos, heads=heads, items=items, steps=steps, branch=branch, stream=stream)


def _where(w: Any) -> Where:
    if w is None:
        return ALL
    if isinstance(w, Where):
        return w
    if isinstance(w, dict):
        return Where(**w)
    return Where(pos=w)  # a bare position spec


# ---------------------------------------------------------------------------------------------
# the op protocol
# ---------------------------------------------------------------------------------------------

_MIX = 0x9E3779B97F4A7C15 % (1 << 61)


@dataclass
class Target:
    """The destinations of one bound op in a site tensor x [N, T, *F] (heads split on per-head sites)."""

    site: Any                            # interp.sites.Site
    idx: torch.Tensor                    # [K, 2] (row, pos) or [K, 3] (row, pos, head)
    item: torch.Tensor                   # [K] base-batch item of each destination (source rows, seeds)
    src_pos: torch.Tensor                # [K] its position in the unpacked sequence (source positions)
    rows: list[tuple[int, list[int]]]    # (tensor row, its positions in x) for whole-row ops
    heads: list[int] | None
    full_len: int | None = None          # packed rows: the sequence length sources carry
    n_items: int = 1                     # rows of one copy of the base batch (resample pools)


def _fit(src: torch.Tensor, x: torch.Tensor, site: Any, what: str, T: int | None = None) -> torch.Tensor:
    """Check a source / pool against the site tensor x [N, T, *F]; returns it as [B, T, *F] on x's device."""
    feat, T = tuple(x.shape[2:]), (x.shape[1] if T is None else T)
    given = tuple(src.shape)
    if (src.dim() in (1, 2) and x.dim() == 3 and x.shape[1] == 1 and len(site.axes) == 2
            and src.shape[-1] == x.shape[-1]):
        src = src.reshape(-1, 1, x.shape[-1])  # a [batch, d] site (timestep embeddings): one position per item
    if site.heads is not None and tuple(src.shape[-len(feat):]) != feat and tuple(src.shape[-1:]) == (math.prod(feat),):
        src = src.unflatten(-1, feat)  # merged-head source for a per-head site
    if tuple(src.shape[-len(feat):] if feat else ()) != feat or src.dim() not in (len(feat) + 1, len(feat) + 2):
        raise SiteShapeError(f"{what} for {site.name!r} has shape {given}, but the site carries "
                             f"[batch, {T}, {', '.join(map(str, feat))}] ({', '.join(site.axes)}): pass a tensor "
                             f"of shape [{T}, {', '.join(map(str, feat))}] or [batch, {T}, ...] captured at this site")
    if src.dim() == len(feat) + 1:
        src = src[None]
    if src.shape[1] != T:
        axis = site.axes[1] if len(site.axes) > 1 else "axis 1"
        hint = ("clean and corrupted prompts must have the same token length" if axis == "pos" else
                f"axis 1 of this site is {axis!r}, not a token axis")
        raise SiteShapeError(f"{what} for {site.name!r} has {src.shape[1]} along {axis!r}, the running tensor has "
                             f"{T}: {hint}")
    if src.dtype != x.dtype:
        raise SiteShapeError(f"{what} for {site.name!r} has dtype {src.dtype}, the site carries {x.dtype}: "
                             f"cast it with .to({x.dtype})")
    return src.to(x.device)


def _distinct(t: Target) -> bool:
    """True when t's destinations are distinct (known from its python lists: no tensor read)."""
    rows = [r for r, _ in t.rows]
    heads = t.heads or []
    return (len(set(rows)) == len(rows) and all(len(set(ps)) == len(ps) for _, ps in t.rows)
            and len(set(heads)) == len(heads))


def _rows_view(x: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A [N, T, *F] tensor and index -> [N, T', F'] view and [K, 2] index for the row kernels."""
    if idx.shape[1] == 3:
        H = x.shape[2]
        x, idx = x.flatten(1, 2), torch.stack([idx[:, 0], idx[:, 1] * H + idx[:, 2]], 1)
    return x.flatten(2) if x.dim() > 3 else x, idx


@dataclass(frozen=True)
class Op:
    """An edit at one site. Subclasses validate their fields, apply themselves and say if they pack."""

    site: str
    where: Where = field(default=ALL, kw_only=True)
    packable: ClassVar[bool] = False  # the positional-pack shortcut (interp.prefix) can run it

    def __post_init__(self):
        if not isinstance(self.site, str) or not self.site:
            raise SpecError(f"{type(self).__name__}: site must be a site name such as 'blocks.0.resid_pre', "
                            f"not {self.site!r}")
        object.__setattr__(self, "where", _where(self.where))
        self.validate()

    def validate(self) -> None:
        """Refuse out-of-domain fields (one-line SpecError); called at construction."""

    def describe(self) -> str:
        return f"{type(self).__name__}({self.site!r})"

    def can_pack(self) -> bool:
        return self.packable

    def uses_positions(self) -> bool:
        """False for ops that edit whole items whatever `pos` says (spatial adds)."""
        return True

    def fingerprint(self) -> dict[str, Any]:
        """The values that decide what this op does (hashed by resumable sweeps)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def batch_key(self) -> int | None:
        """Ops of one class with the same non-None key apply in one kernel call (`apply_many`)."""
        return None

    def apply(self, x: torch.Tensor, t: Target) -> None:
        """Edit x in place at t's destinations."""
        raise SpecError(f"{type(self).__name__} does not define apply(x, target); subclass Op and define it")

    @classmethod
    def apply_many(cls, x: torch.Tensor, group: list[tuple[Op, Target]]) -> None:
        for op, t in group:
            op.apply(x, t)


def _tensor_field(op: Op, name: str) -> torch.Tensor:
    v = getattr(op, name)
    if not isinstance(v, torch.Tensor):
        raise SpecError(f"{op.describe()}: {name} must be a tensor, not {type(v).__name__}")
    _finite(f"{op.describe()}.{name}", v)
    return v


@dataclass(frozen=True, eq=False)
class Patch(Op):
    """Write `source` (an activation of this site from another run) at the selected places.

    source: [T, *F] or [B_src, T, *F] (B_src = 1 or the base batch size). alpha blends:
    (1 - alpha) * current + alpha * source; alpha = 1 is a plain overwrite.
    """

    source: torch.Tensor
    alpha: float = 1.0
    packable: ClassVar[bool] = True

    def validate(self) -> None:
        _tensor_field(self, "source")
        _finite(f"{self.describe()}.alpha", self.alpha)

    def batch_key(self) -> int | None:
        return id(self.source)

    def apply(self, x: torch.Tensor, t: Target) -> None:
        type(self).apply_many(x, [(self, t)])

    @classmethod
    def apply_many(cls, x: torch.Tensor, group: list[tuple[Op, Target]]) -> None:
        from . import kernels as K

        patches = cast("list[tuple[Patch, Target]]", group)  # the engine groups ops of one class
        op0, t0 = patches[0]
        src = _fit(op0.source, x, t0.site, "patch source", t0.full_len)
        if src.shape[0] not in (1, t0.n_items):
            raise SiteShapeError(f"patch source for {t0.site.name!r} has batch {src.shape[0]}, the input has "
                                 f"{t0.n_items} item(s): give one source for all items or one per item")
        didx = torch.cat([t.idx for _, t in group])
        sidx = didx.clone()
        sidx[:, 0] = torch.cat([t.item for _, t in group]) % src.shape[0]
        sidx[:, 1] = torch.cat([t.src_pos for _, t in group])
        alpha = None if all(op.alpha == 1.0 for op, _ in patches) else torch.cat(
            [torch.full((t.idx.shape[0],), float(op.alpha), device=x.device) for op, t in patches])
        K.row_patch(x, src, didx, sidx, alpha, check=False)


@dataclass(frozen=True, eq=False)
class Add(Op):
    """h <- h + alpha * vector, or alpha * vector * ||h|| / ||vector|| with norm="relative".

    spatial (grid activations, e.g. UNet [N, C, H, W] or token grids [N, T, F]): None adds a
    feature vector at the selected positions; "average" adds a channel vector at every spatial
    location (channel axis 1 for 4-D and larger tensors, the last axis for [N, T, F]), norms per
    location; "keep" adds a vector of the item's full shape, norms per item. Spatial adds ignore pos.
    A site without a position axis (a UNet block) needs spatial=.
    """

    vector: torch.Tensor
    alpha: float = 1.0
    norm: str | None = None
    renorm: bool = False
    spatial: str | None = None

    def validate(self) -> None:
        v = _tensor_field(self, "vector")
        _finite(f"{self.describe()}.alpha", self.alpha)
        if self.norm not in (None, "relative"):
            raise SpecError(f"Add.norm must be None or 'relative', not {self.norm!r}")
        if self.spatial not in (None, "average", "keep"):
            raise SpecError(f"Add.spatial must be None, 'average' or 'keep', not {self.spatial!r}")
        if self.norm == "relative" and v.numel() and not bool(v.ne(0).any()):
            raise SpecError(f"{self.describe()}: norm='relative' divides by ||vector||, and the vector is zero")

    def can_pack(self) -> bool:
        return self.spatial is None

    def uses_positions(self) -> bool:
        return self.spatial is None

    def apply(self, x: torch.Tensor, t: Target) -> None:
        from . import kernels as K

        if self.alpha == 0:
            return
        if self.spatial is not None:
            return _add_spatial(x, self, [r for r, _ in t.rows], t.site)
        v = self.vector.to(device=x.device, dtype=x.dtype)
        xr, ridx = _rows_view(x, t.idx)
        if v.numel() != xr.shape[-1]:
            raise SiteShapeError(f"steering vector for {t.site.name!r} has {v.numel()} elements, the site's "
                                 f"feature size is {xr.shape[-1]} (axes {t.site.axes})")
        K.add_scaled(xr, v.reshape(-1), ridx, float(self.alpha), norm=self.norm, renorm=self.renorm, check=False,
                     unique=_distinct(t))


def _add_spatial(x: torch.Tensor, op: Add, items: list[int], site: Any) -> None:
    """Add.spatial on a grid tensor: "keep" = one row per item; "average" = one row per location."""
    from . import kernels as K

    N = x.shape[0]
    if op.spatial == "keep":
        rows = x.reshape(N, 1, -1).contiguous()
    elif x.dim() >= 4:  # channels first: [N, C, *S] -> [N, prod(S), C]
        rows = x.movedim(1, -1).reshape(N, -1, x.shape[1]).contiguous()
    else:
        rows = x.reshape(N, -1, x.shape[-1]).contiguous()
    v = op.vector.to(device=x.device, dtype=x.dtype).reshape(-1)
    if v.numel() != rows.shape[-1]:
        want = f"the item's full shape {tuple(x.shape[1:])}" if op.spatial == "keep" else f"{rows.shape[-1]} channels"
        raise SiteShapeError(f"steering vector for {site.name!r} has {v.numel()} elements, but spatial={op.spatial!r} "
                             f"on a tensor of shape {tuple(x.shape)} needs {want}")
    idx = torch.tensor([(r, p) for r in items for p in range(rows.shape[1])], dtype=torch.long,
                       device=x.device).reshape(-1, 2)
    K.add_scaled(rows, v, idx, float(op.alpha), norm=op.norm, renorm=op.renorm, check=False)
    if op.spatial == "average" and x.dim() >= 4:
        x.copy_(rows.reshape(N, *x.shape[2:], x.shape[1]).movedim(-1, 1))
    else:
        x.copy_(rows.reshape(x.shape))


@dataclass(frozen=True, eq=False)
class Ablate(Op):
    """Zero, mean or resample ablation. `values` holds the mean ([*F] or [T, *F]) or the resample pool ([B, T, *F])."""

    mode: str = "zero"
    values: torch.Tensor | None = None
    seed: int = 0

    def validate(self) -> None:
        if self.mode not in ("zero", "mean", "resample"):
            raise SpecError(f"Ablate.mode must be 'zero', 'mean' or 'resample', not {self.mode!r}")
        if self.mode != "zero":
            if self.values is None:
                raise SpecError(f"Ablate(mode={self.mode!r}) at {self.site!r} needs values=: the mean activation "
                                "([*F] or [T, *F]) or a pool of activations ([B, T, *F]) from a reference dataset")
            _tensor_field(self, "values")
        _as_int(self.seed, "Ablate seed")

    def can_pack(self) -> bool:
        return self.mode == "zero"

    def apply(self, x: torch.Tensor, t: Target) -> None:
        from . import kernels as K

        feat, idx = x.shape[2:], t.idx
        if self.mode == "zero":
            src = torch.zeros((1, 1, *feat), dtype=x.dtype, device=x.device)
            sidx = torch.zeros_like(idx)
            if idx.shape[1] == 3:
                sidx[:, 2] = idx[:, 2]
            K.row_patch(x, src, idx, sidx, check=False)
            return
        assert self.values is not None  # validate() requires values for mean / resample
        vals = self.values.to(x.device, x.dtype)
        sidx = idx.clone()
        sidx[:, 1] = t.src_pos
        if self.mode == "mean":
            T = x.shape[1] if t.full_len is None else t.full_len
            src = vals.expand(1, T, *feat) if vals.dim() == len(feat) else _fit(vals, x, t.site, "mean values", T)
            sidx[:, 0] = 0
            K.row_patch(x, src.contiguous(), idx, sidx, check=False)
            return
        pool = _fit(vals, x, t.site, "resample pool", t.full_len)  # each item takes a seeded random pool item
        g = torch.Generator().manual_seed(self.seed)
        pick = torch.randint(0, pool.shape[0], (t.n_items,), generator=g).to(x.device)
        sidx[:, 0] = pick[t.item % t.n_items]
        K.row_patch(x, pool, idx, sidx, check=False)


@dataclass(frozen=True, eq=False)
class Noise(Op):
    """Add seeded Gaussian noise N(0, std^2) at the selected places (reproducible from seed)."""

    std: float = 1.0
    seed: int = 0

    def validate(self) -> None:
        _finite(f"{self.describe()}.std", self.std)
        if self.std < 0:
            raise SpecError(f"Noise(std={self.std}) at {self.site!r}: a standard deviation is >= 0")
        _as_int(self.seed, "Noise seed")

    def apply(self, x: torch.Tensor, t: Target) -> None:
        from . import kernels as K

        xr, ridx = _rows_view(x, t.idx)
        seeds = (((self.seed * _MIX) % (1 << 62) + t.item * 1_000_003 + ridx[:, 1]) % (1 << 62)).to(torch.long)
        K.noise(xr, ridx, float(self.std), seeds, check=False, unique=_distinct(t))


@dataclass(frozen=True, eq=False)
class Project(Op):
    """x <- x - ((x - mu) @ R.T) @ L.T: a low-rank eraser (LEACE). `eraser` has L, R and mu (or pass them)."""

    eraser: Any
    packable: ClassVar[bool] = True

    def validate(self) -> None:
        try:
            L, R, mu = self.factors()
        except (AttributeError, KeyError, TypeError, ValueError) as e:
            raise SpecError(f"{self.describe()}: eraser must have L and R (and optionally mu): a dict, a tuple "
                            f"(L, R[, mu]) or an object such as interp's LEACE eraser ({e})") from None
        for name, v in (("L", L), ("R", R), ("mu", mu)):
            if v is not None:
                if not isinstance(v, torch.Tensor):
                    raise SpecError(f"{self.describe()}: eraser.{name} must be a tensor, not {type(v).__name__}")
                _finite(f"{self.describe()} eraser.{name}", v)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        e = self.eraser
        if isinstance(e, dict):
            return e["L"], e["R"], e.get("mu")
        if isinstance(e, (tuple, list)):
            if len(e) not in (2, 3):
                raise ValueError(f"a tuple eraser has 2 or 3 entries, not {len(e)}")
            return (e[0], e[1], e[2] if len(e) == 3 else None)
        return e.L, e.R, getattr(e, "mu", None)

    def fingerprint(self) -> dict[str, Any]:
        return {"site": self.site, "where": self.where, "factors": self.factors()}

    def apply(self, x: torch.Tensor, t: Target) -> None:
        from . import kernels as K

        L, R, mu = self.factors()
        xr, ridx = _rows_view(x, t.idx)
        K.project(xr, L.to(x.device, x.dtype), R.to(x.device, x.dtype),
                  None if mu is None else mu.to(x.device, x.dtype), ridx, check=False)


@dataclass(frozen=True, eq=False)
class Replace(Op):
    """x_sel <- fn(x_sel) for the selected slice: [n_items, n_pos, *F], or [n_items, n_pos, n_heads, d_head]
    with heads=. Items whose positions differ (Tokens / Subject) are passed in groups of equal positions."""

    fn: Callable[[torch.Tensor], torch.Tensor]

    def validate(self) -> None:
        if not callable(self.fn):
            raise SpecError(f"{self.describe()}: fn must be a callable tensor -> tensor, not {type(self.fn).__name__}")

    def apply(self, x: torch.Tensor, t: Target) -> None:
        groups: dict[tuple[int, ...], list[int]] = {}
        for row, pos in t.rows:
            if pos:
                groups.setdefault(tuple(pos), []).append(row)
        for pos_t, rows in groups.items():
            items = torch.tensor(rows, device=x.device)[:, None]
            pos_idx = torch.tensor(pos_t, device=x.device)[None, :]
            sel = x[items, pos_idx] if t.heads is None else x[items, pos_idx][:, :, t.heads]
            new = self.fn(sel.clone())
            if not isinstance(new, torch.Tensor) or new.shape != sel.shape:
                raise SiteShapeError(f"Replace fn at {t.site.name!r} must return a tensor of shape "
                                     f"{tuple(sel.shape)}, got {getattr(new, 'shape', type(new).__name__)}")
            if t.heads is None:
                x[items, pos_idx] = new.to(x.dtype)
            else:
                x[items[..., None], pos_idx[..., None], torch.tensor(t.heads, device=x.device)] = new.to(x.dtype)


__all__ = ["Op", "Patch", "Add", "Ablate", "Noise", "Project", "Replace", "Where", "Tokens", "Subject", "at", "ALL",
           "Positions", "Steps", "Target", "GENERATED"]
