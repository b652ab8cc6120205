"""Site identities and shortcut parity: what interp's site names promise, verified on a model.

The canonical grammar implies identities that hold on every family; `check` runs them on the user's
own model and input and reports one row per identity kind:

  chain          resid_post[l] == resid_pre[l+1]
  sum            resid_mid == resid_pre + attn.out and resid_post == resid_mid + mlp.out (sequential
                 blocks), resid_post == resid_pre + attn.out + mlp.out (parallel blocks); the terms
                 come from the adapter (`Site.meta["sum"]`, weighted for residual multipliers)
  attn.z         attn.out == out-projection applied to the concatenated attn.z heads (then the
                 post-attention norm, where the family has one)
  head           logits == head(final); the model output == the adapter's tail(last resid_post)
  patch:<kind>   a Patch at a site of that kind equals a plain torch hook doing the same edit on the
                 module the adapter names (both against the logits of the whole model)
  grid:<path>    run_grid with layer-prefix replay, positional packs and the column head on equals
                 per-cell full forwards

Differences are max |a - b| / max(1, max |b|) over all compared elements; grid metrics (functions of
the last position's logits) are relative to the largest last-position logit of the base run, since
they can be no more exact than the logits they are computed from.
"""
from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import InterpError
from .ops import Add, Op, Patch, at
from .sites import Site


class CheckError(InterpError, ValueError):
    """check() was given something it cannot check (no input for a model without token ids, ...)."""


@dataclass
class CheckRow:
    kind: str
    ok: bool
    max_diff: float
    n: int = 0          # comparisons made
    detail: str = ""


@dataclass
class CheckReport:
    """The rows of one check; `ok` is False if any row failed."""

    model: str
    rows: list[CheckRow]
    settings: dict = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.rows)

    @property
    def max_diff(self) -> float:
        return max((r.max_diff for r in self.rows if not math.isnan(r.max_diff)), default=0.0)

    def failures(self) -> list[CheckRow]:
        return [r for r in self.rows if not r.ok]

    def table(self) -> str:
        w = max([len("site kind")] + [len(r.kind) for r in self.rows])
        lines = [f"{'site kind':{w}s} | ok   | max diff  | n    | detail", "-" * (w + 40)]
        for r in self.rows:
            d = "-" if math.isnan(r.max_diff) else f"{r.max_diff:.2e}"
            lines.append(f"{r.kind:{w}s} | {'ok' if r.ok else 'FAIL':4s} | {d:9s} | {r.n:<4d} | {r.detail}")
        s = ", ".join(f"{k}={v}" for k, v in self.settings.items())
        lines.append(f"{self.model}: {'PASS' if self.ok else 'FAIL'} (max diff {self.max_diff:.2e}; {s}; "
                     f"{self.seconds:.1f} s)")
        return "\n".join(lines)

    def to_result(self):
        """An interp.Result [check, field] (ok, max_diff, n) with the settings as attributes."""
        from .results import Result

        vals = torch.tensor([[float(r.ok), r.max_diff, float(r.n)] for r in self.rows], dtype=torch.float64)
        return Result(vals.reshape(len(self.rows), 3), ("check", "field"),
                      {"check": [r.kind for r in self.rows], "field": ["ok", "max_diff", "n"]},
                      {"model": self.model, "settings": self.settings, "title": f"interp check {self.model}"})


class _Acc:
    """Accumulates comparisons of one row kind."""

    def __init__(self):
        self.diff, self.n, self.notes, self.refusals = 0.0, 0, [], set()

    def compare(self, got: torch.Tensor, want: torch.Tensor, what: str = "", scale: float | None = None) -> None:
        """scale: the magnitude differences are relative to (default: max(1, max |want|))."""
        got, want = got.detach().double(), want.detach().double()
        if got.shape != want.shape:
            self.diff = math.inf
            self.notes.append(f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}")
            return
        scale = max(1.0, float(want.abs().max()) if want.numel() else 1.0, scale or 0.0)
        d = float((got - want).abs().max() / scale) if want.numel() else 0.0
        if math.isnan(d):
            d = math.inf
        if d > self.diff and what:
            self.notes = [f"worst: {what}"]
        self.diff = max(self.diff, d)
        self.n += 1


def _rel(tab: dict[str, _Acc], kind: str) -> _Acc:
    return tab.setdefault(kind, _Acc())


# ---------------------------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------------------------

def default_seq_len(model) -> int:
    """Longer than every sliding / local attention window of the model's config, within its positions."""
    cfg = getattr(model, "config", None)
    cfg = getattr(cfg, "text_config", None) or cfg
    found = [getattr(cfg, k, None) for k in ("sliding_window", "attention_window", "local_attention",
                                               "window_size")]
    windows = [int(w) for w in found if isinstance(w, int) and w > 0]
    T = (max(windows) + 8) if windows else 24
    limit = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
    return min(T, int(limit)) if limit else T


def token_inputs(lm, batch: int, T: int, seed: int) -> torch.Tensor:
    vocab = getattr(getattr(lm.model, "config", None), "vocab_size", None)
    vocab = getattr(getattr(lm.model.config, "text_config", None), "vocab_size", vocab) if vocab is None else vocab
    if not vocab:
        raise CheckError(f"cannot make token inputs for {type(lm.model).__name__}: its config has no vocab_size; "
                         "pass inputs= to check()")
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, int(vocab), (batch, T), generator=g)


# ---------------------------------------------------------------------------------------------
# identities from one capture
# ---------------------------------------------------------------------------------------------

def _identities(lm, inputs, tab: dict[str, _Acc]) -> None:
    table = lm.adapter.site_table()
    sites = [s for s in table if not s.is_raw]
    proj = [s for s in sites if s.meta.get("proj")]
    names = [s.name for s in sites]
    out = lm.run(inputs, capture=names)
    c = out.cache
    by_layer: dict[tuple[int, str], torch.Tensor] = {}
    for s in sites:
        if s.name in c and s.layer is not None:
            by_layer[(s.layer, s.kind)] = c[s.name]
    # chain
    L = lm.n_layers
    for l in range(L - 1):
        a, b = by_layer.get((l, "resid_post")), by_layer.get((l + 1, "resid_pre"))
        if a is not None and b is not None:
            _rel(tab, "chain resid_post[l]=resid_pre[l+1]").compare(a, b, f"layer {l}")
    # residual sums
    for s in sites:
        terms = s.meta.get("sum")
        if not terms or s.name not in c:
            continue
        if any(t not in c for t, _ in terms):
            _rel(tab, f"sum {s.kind}").notes.append(f"{s.name}: term missing")
            _rel(tab, f"sum {s.kind}").diff = math.inf
            continue
        total = sum(c[t].double() * w for t, w in terms)
        norm = s.meta.get("norm")
        if norm:
            total = lm.model.get_submodule(norm)(total.to(c[s.name].dtype)).double()
        _rel(tab, f"sum {s.kind}=" + "+".join(t.split(".", 2)[-1] for t, _ in terms)).compare(total, c[s.name], s.name)
    # attn.out == post(o_proj(z))
    with torch.no_grad():
        for s in proj:
            if s.name not in c or s.meta.get("out") not in c:
                continue
            z = c[s.name].flatten(-2) if s.heads else c[s.name]
            y = lm.model.get_submodule(s.meta["proj"])(z)
            if s.meta.get("post"):
                y = lm.model.get_submodule(s.meta["post"])(y)
            _rel(tab, "attn.out=o_proj(attn.z)").compare(y, c[s.meta["out"]], s.name)
        # logits == head(final), model output == tail(last resid_post)
        logits = next((s for s in sites if s.kind == "logits"), None)
        if logits is not None and logits.meta.get("of") in c and logits.name in c:
            h = c[logits.meta["of"]]
            if logits.meta.get("via"):  # a projection between the final norm and the head (OPT-350m)
                h = lm.model.get_submodule(logits.meta["via"])(h)
            y = lm.model.get_submodule(logits.module)(h)
            _rel(tab, "head logits=head(final)").compare(y, c[logits.name], "head")
            fin = getattr(lm.adapter, "finish_logits", None)
            if fin is not None:
                _rel(tab, "head output=finish(logits)").compare(fin(c[logits.name]), out.logits, "finish")
        last = by_layer.get((L - 1, "resid_post"))
        tail = getattr(lm.adapter, "tail", None)
        if last is not None and tail is not None and out.logits.dim() == 3:
            _rel(tab, "head output=tail(resid_post[L-1])").compare(tail(last, False), out.logits, "tail")


# ---------------------------------------------------------------------------------------------
# patch == plain torch hook
# ---------------------------------------------------------------------------------------------

def _get(value, slot):
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)):
        return value[slot if isinstance(slot, int) else 0]
    if isinstance(slot, str) and hasattr(value, "__getitem__"):
        return value[slot]
    return value.sample


def _put(value, slot, new):
    if isinstance(value, torch.Tensor):
        return new
    if isinstance(value, tuple):
        i = slot if isinstance(slot, int) else 0
        return (*value[:i], new, *value[i + 1:])
    if isinstance(value, list):
        value = list(value)
        value[slot if isinstance(slot, int) else 0] = new
        return value
    if isinstance(slot, str):
        value[slot] = new
        return value
    value.sample = new
    return value


def _edit(t: torch.Tensor, src: torch.Tensor, pos: list[int] | None, heads: int | None,
          head: int | None) -> torch.Tensor:
    """t with positions `pos` (all: None) and head `head` overwritten from src: the plain-torch reference edit."""
    idx: slice | list[int] = slice(None) if pos is None else pos
    new = t.clone()
    if heads:
        v, s = new.unflatten(-1, (heads, -1)), src.reshape(*src.shape[:2], heads, -1)
        sel = slice(None) if head is None else head
        v[:, idx, sel] = s[:, idx, sel].to(v.dtype)
        return v.flatten(-2)
    new[:, idx] = src[:, idx].to(new.dtype)
    return new


@contextlib.contextmanager
def _reference_hook(model, site: Site, src, pos, head):
    """A plain torch hook that performs the patch on the module the site names. It is the independent
    reference the engine is compared with, so it deliberately does not go through interp.hooks."""
    module = model.get_submodule(site.module) if site.module else model

    def edit(t):  # a module that sees [batch*pos, d] (OPT's fc2): the same edit on its [batch, pos, d] view
        if site.meta.get("unflat") and t.dim() == 2:
            return _edit(t.view(src.shape[0], -1, t.shape[-1]), src, pos, site.heads, head).reshape(t.shape)
        return _edit(t, src, pos, site.heads, head)
    if site.io == "output":
        def hook(mod, args, output):
            return _put(output, site.slot, edit(_get(output, site.slot)))
        handle = module.register_forward_hook(hook)
    else:
        def hook(mod, args, kwargs):
            if isinstance(site.slot, int) and len(args) > site.slot:
                t = args[site.slot]
            else:
                t = kwargs[site.arg_name or site.slot]
            new = edit(t)
            if site.inplace:  # the residual tensor itself: every consumer sees the edit
                with torch.no_grad():
                    t.copy_(new)
                return None
            if isinstance(site.slot, int) and len(args) > site.slot:
                return (*args[:site.slot], new, *args[site.slot + 1:]), kwargs
            return args, {**kwargs, (site.arg_name or site.slot): new}
        handle = module.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def _patch_sites(lm, layers: Sequence[int]) -> list[Site]:
    """One site per (kind, layer) for the chosen layers, plus the sites outside the blocks."""
    out = []
    for s in lm.adapter.site_table():
        if s.is_raw or s.kind in ("raw", "", "tl"):  # canonical kinds only (not every TransformerLens hook)
            continue
        if s.layer is None or s.layer < 0 or s.layer >= lm.n_layers or s.layer in layers:
            out.append(s)
    return out


def _patches(lm, inputs, other, layers, tab, positions) -> None:
    sites = _patch_sites(lm, layers)
    src = lm.run(other, capture=[s.name for s in sites]).cache
    for s in sites:
        if s.name not in src or src[s.name].dim() < 2 or src.axes[s.name][0] == "call":
            continue  # a module that runs several times per forward has no one tensor to patch
        x = src[s.name]
        pos = positions
        if pos is not None and max(pos) >= x.shape[1]:  # a site shorter than the input (physics `final`)
            pos = sorted({0, x.shape[1] // 2, x.shape[1] - 1})
        head = 0 if s.heads else None
        where = at(pos=pos, heads=head) if s.heads else at(pos=pos)
        try:
            got = lm.run(inputs, [Patch(s.name, source=x, where=where)]).logits
        except InterpError as e:  # a site interp cannot patch back is a failed row, not a crashed check
            acc = _rel(tab, f"patch {s.kind}")
            acc.diff, acc.notes = math.inf, [f"{s.name}: {type(e).__name__}: {str(e)[:160]}"]
            continue
        with torch.no_grad(), _reference_hook(lm.model, s, x.flatten(-2) if s.heads else x, pos, head):
            want = lm.adapter.main_output(lm.adapter.forward(lm.adapter.prepare(inputs)))
        _rel(tab, f"patch {s.kind}").compare(got, want, s.name)


# ---------------------------------------------------------------------------------------------
# grid shortcuts == per-cell full forwards
# ---------------------------------------------------------------------------------------------

def _grid_layers(lm, layers: Sequence[int]) -> set[int]:
    """Blocks the grid rows start at: the patched ones, block 1 and the first block of every kind
    (block class, attention type, sliding window, config layer type), so every layer type starts a
    replay and a pack."""
    out = set(layers) | ({1} if lm.n_layers > 1 else set())
    paths = getattr(lm.adapter, "block_paths", None) or []
    cfg = getattr(lm.model, "config", None)
    cfg = getattr(cfg, "text_config", None) or cfg
    types = list(getattr(cfg, "layer_types", None) or [None] * len(paths))
    seen = set()
    for i, path in enumerate(paths):
        blk = lm.adapter.root.get_submodule(path)
        attn = next((m for n, m in blk.named_children() if "attn" in n or "attention" in n), None)
        key = (type(blk).__name__, getattr(blk, "attention_type", None), getattr(attn, "sliding_window", None),
               getattr(attn, "is_sliding", None), types[i] if i < len(types) else None)
        if key not in seen:
            seen.add(key)
            out.add(i)
    return out


def _grid_rows(lm, other, T: int, layers: set[int]) -> tuple[list[list], list[str]]:
    """Rows that start at every kind of block (so every layer type starts a replay), at early and late
    positions (so packs of several lengths form), with patches, head patches and steering adds."""
    table = lm.adapter.site_table()
    kinds = ("resid_pre", "attn.out", "mlp.out", "resid_mid", "attn.z", "resid_post")
    sites = [s for s in table if not s.is_raw and s.kind in kinds and s.layer in layers]
    src = lm.run(other, capture=[s.name for s in sites]).cache
    rows: list[list[Op]] = []
    labels: list[str] = []
    g = torch.Generator().manual_seed(1)
    for s in sites:
        x = src[s.name]
        for p in sorted({1, T - 1}):  # a long and a short pack
            w = at(pos=[p], heads=[0]) if s.heads else at(pos=[p])
            rows.append([Patch(s.name, source=x, where=w)])
            labels.append(f"{s.name}@{p}")
        if s.kind == "resid_pre":
            v = torch.randn(x.shape[-1], generator=g).to(x.dtype)
            rows.append([Add(s.name, vector=v, alpha=2.0, where=at(pos=[T - 2]))])
            labels.append(f"{s.name}+v")
    return rows, labels


def _grids(lm, inputs, other, T: int, layers: Sequence[int], tab: dict[str, _Acc]) -> None:
    from .metrics import logit_diff

    rows, labels = _grid_rows(lm, other, T, _grid_layers(lm, layers))
    if not rows:
        return
    base = lm.run(inputs, last_only=True).logits
    scale = float(base.abs().max())

    def plain(out):  # the last position of [batch, pos, vocab] logits; any other output whole
        return out[:, -1].float() if out.dim() == 3 else out.float().reshape(out.shape[0], -1)

    metrics = [("full head", plain)]
    if base.dim() == 3:  # token logits: also the column head (only the metric's vocabulary rows)
        a, b = [int(i) for i in base[0, -1].topk(2).indices]
        metrics.insert(0, ("column head", logit_diff(a, b)))
    per_cell: dict[str, list[torch.Tensor]] = {name: [] for name, _ in metrics}
    for ops in rows:
        out = lm.run(inputs, ops).logits
        for name, metric in metrics:
            per_cell[name].append(metric(out))
    lm.engine._replay_ok = lm.engine._packed_ok = None  # validate the shortcuts on this model afresh
    for name, metric in metrics:
        want = torch.stack(per_cell[name])
        grid = lm.run_grid(inputs, rows, metric, progress=False, distributed=False)
        st = grid.stats
        used = [k for k, on in (("prefix", st.get("prefix_reuse")), ("packs", st.get("positional_reuse"))) if on]
        acc = _rel(tab, f"grid {name} ({'+'.join(used) or 'full forwards'})")
        for what, why in (st.get("refused") or {}).items():
            if not (what == "positional_reuse" and not st.get("prefix_reuse")):
                acc.refusals.add(f"{what} refused: {why}")
        for r in range(len(rows)):  # a metric of logits is as exact as the logits: relative to their scale
            acc.compare(grid.values[r], want[r], labels[r], scale=scale)


# ---------------------------------------------------------------------------------------------
# entry point
# ---------------------------------------------------------------------------------------------

def check(lm, inputs: Any = None, *, other: Any = None, seq_len: int | None = None, batches: Sequence[int] = (1, 3),
          tol: float = 1e-5, grids: bool = True, patch_layers: Sequence[int] | None = None,
          seed: int = 0) -> CheckReport:
    """Verify the site identities, patch-vs-plain-hook parity and grid shortcuts on `lm` (see module doc).

    inputs/other: two inputs of equal shape (token-id tensors by default: random ids of a length longer
    than every sliding window, for each batch size in `batches`); patch_layers: blocks whose sites are
    patched one by one (default: first, middle, last)."""
    from .attach import attach

    lm = attach(lm)
    t0 = time.perf_counter()
    tab: dict[str, _Acc] = {}
    L = lm.n_layers
    layers = sorted(set(patch_layers if patch_layers is not None else {0, L // 2, max(0, L - 1)}))
    if inputs is not None:
        cases = [(inputs, other if other is not None else inputs)]
        if other is None:
            raise CheckError("check(inputs=...) needs other=...: a second input of the same shape to patch from")
        T = lm.adapter.prepare(inputs).seq_len or 1
    else:
        T = seq_len or default_seq_len(lm.model)
        cases = [(token_inputs(lm, bsz, T, seed + bsz), token_inputs(lm, bsz, T, seed + 100 + bsz)) for bsz in batches]
    # sites whose axis 1 is not the input's positions (diffusers: channels, spatial tokens) are patched whole
    positions = None if getattr(lm.adapter.prepare(cases[0][0]), "site_view", None) else sorted({0, T // 2, T - 1})
    was_training = lm.model.training
    lm.model.eval()
    try:
        with torch.no_grad():
            for x, y in cases:
                _identities(lm, x, tab)
                _patches(lm, x, y, layers, tab, positions)
                if grids and L > 0:  # models with blocks (the engine decides which shortcuts apply)
                    _grids(lm, x, y, T, layers, tab)
    finally:
        lm.model.train(was_training)
    rows = [CheckRow(k, a.diff <= tol, a.diff if a.n or a.diff else float("nan"), a.n,
                     "; ".join([*a.notes, *sorted(a.refusals)])) for k, a in tab.items()]
    if not rows:
        rows = [CheckRow("sites", False, float("nan"), 0, "no site identities could be checked on this model")]
    settings = {"seq_len": T, "batches": list(batches) if inputs is None else [lm.adapter.prepare(inputs).batch],
                "tol": tol, "patch_layers": layers}
    return CheckReport(lm.adapter.describe(), rows, settings, time.perf_counter() - t0)


__all__ = ["check", "CheckReport", "CheckRow", "CheckError", "default_seq_len"]
