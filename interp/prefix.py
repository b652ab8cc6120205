"""Positional prefix reuse: replay a block range on the positions >= p only.

With causal attention an edit at position p leaves every position < p unchanged, so a row whose
edits all sit at block >= l and position >= p needs blocks l.. only at positions p..T-1, attending
to the base run's keys/values for positions < p. Rows of one start block are packed along the
sequence axis (row r occupies positions p_r..T-1 of a packed sequence); an additive mask lets each
packed token see the base keys before its row's start and its own row's earlier tokens. The
blocks are called with a small duck-typed cache object whose `update` prepends the base keys.

The engine validates this path once against real forwards and falls back if they disagree.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch

from .hooks import StopForward

CACHE_NAMES = ("cache", "past_key_values", "layer_past", "past_key_value")


class _Recorder:
    """Cache stand-in that records the keys/values a block computes; with stop=True it ends the
    block's forward right there (only the keys/values were wanted)."""

    def __init__(self, stop: bool = False):
        self.kv: tuple[torch.Tensor, torch.Tensor] | None = None
        self.stop = stop

    def update(self, k, v, *args, **kwargs):
        self.kv = (k, v)
        if self.stop:
            raise StopForward
        return k, v

    def get_seq_length(self, *args, **kwargs) -> int:
        return 0


class _Prefixed:
    """Cache stand-in whose `update` prepends the base run's keys/values of one block."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor):
        self.k, self.v, self.used = k, v, False

    def update(self, k, v, *args, **kwargs):
        self.used = True
        return torch.cat([self.k.to(k.dtype), k], -2), torch.cat([self.v.to(v.dtype), v], -2)

    def get_seq_length(self, *args, **kwargs) -> int:
        return int(self.k.shape[-2])


@dataclass
class Pack:
    """Rows packed along the sequence axis: row j covers absolute positions starts[j]..T-1."""

    starts: list[int]
    T: int

    def __post_init__(self):
        self.lengths = [self.T - p for p in self.starts]
        self.offsets = [sum(self.lengths[:j]) for j in range(len(self.starts))]
        self.Q = sum(self.lengths)

    def positions(self, dev) -> torch.Tensor:
        return torch.cat([torch.arange(p, self.T, device=dev) for p in self.starts])

    def row_ids(self, dev) -> torch.Tensor:
        return torch.cat([torch.full((n,), j, device=dev) for j, n in enumerate(self.lengths)])

    def last_index(self) -> list[int]:
        return [o + n - 1 for o, n in zip(self.offsets, self.lengths)]

    def shift(self, j: int) -> int:
        """Packed index of absolute position t in row j is t + shift(j)."""
        return self.offsets[j] - self.starts[j]


def _signature(block: torch.nn.Module):
    try:
        return inspect.signature(block.forward)
    except (TypeError, ValueError):
        return None


def _named(block, hidden, args, kwargs):
    """(hidden name, other arguments by name, cache parameter name) for a block call, or None."""
    sig = _signature(block)
    if sig is None:
        return None
    try:
        bound = sig.bind_partial(hidden, *args, **kwargs)
    except TypeError:
        return None
    params = list(sig.parameters)
    cache_name = next((n for n in CACHE_NAMES if n in sig.parameters), None)
    if cache_name is None:
        return None
    named = dict(bound.arguments)
    hname = params[0]
    named.pop(hname, None)
    extra = named.pop(next((n for n, p in sig.parameters.items() if p.kind is p.VAR_KEYWORD), "\0"), {})
    named.update(extra)
    return hname, named, cache_name


def _gather(obj, T: int, pos: torch.Tensor, batch: int):
    if isinstance(obj, torch.Tensor):
        if obj.dim() >= 2 and obj.shape[1] == T and obj.shape[0] in (1, batch) and obj.dtype != torch.bool:
            return obj[:, pos.to(obj.device)]
        if obj.dim() == 1 and obj.shape[0] == T and not obj.is_floating_point():
            return obj[pos.to(obj.device)]
        return obj
    if isinstance(obj, tuple):
        return tuple(_gather(o, T, pos, batch) for o in obj)
    if isinstance(obj, list):
        return [_gather(o, T, pos, batch) for o in obj]
    return obj


def _mask(pack: Pack, base_mask, dtype, dev) -> torch.Tensor:
    """Additive mask [B|1, 1, Q, T + Q]: base keys j < start(row), own row's keys up to the query."""
    T = pack.T
    pos = pack.positions(dev)
    rid = pack.row_ids(dev)
    start = torch.tensor(pack.starts, device=dev)[rid]
    base_ok = torch.arange(T, device=dev)[None, :] < start[:, None]                      # [Q, T]
    own_ok = (rid[:, None] == rid[None, :]) & (pos[None, :] <= pos[:, None])           # [Q, Q]
    ok = torch.cat([base_ok, own_ok], 1)[None, None]
    if isinstance(base_mask, torch.Tensor) and base_mask.dim() == 4:
        allowed = base_mask if base_mask.dtype == torch.bool else base_mask == 0
        kpos = torch.cat([torch.arange(T, device=dev), pos])
        allowed = allowed[:, :, -T:, -T:].to(dev)[:, :, pos][:, :, :, kpos]
        ok = ok & allowed
    m = torch.zeros(ok.shape, dtype=dtype, device=dev)
    return m.masked_fill(~ok, torch.finfo(dtype).min)


def head_metric(adapter, hidden: torch.Tensor, metric, check=None) -> torch.Tensor:
    """`metric` of the model's head on last-position states [n, 1, d]. A metric with `columns`
    (interp.metrics.ColumnMetric) gets only those logits when the adapter can compute them alone
    (`tail_columns`): the unembedding then costs len(columns) / vocab of the full one. check =
    (hidden [b, 1, d], full logits) from a real run: the column path is used only if it reproduces them."""
    cols = getattr(metric, "columns", None)
    part = getattr(adapter, "tail_columns", None)
    if cols is not None and part is not None:
        ok = True
        if check is not None:
            h0, full = check
            sub = part(h0, cols)
            want = full[..., list(cols)].float()
            ok = sub is not None and bool(((sub.float() - want).abs().max() / want.abs().max().clamp_min(1e-6)) < 1e-5)
        sub = part(hidden, cols) if ok else None
        if sub is not None:
            return metric.on_columns(sub)
    return metric(adapter.tail(hidden, True))


class PrefixReplay:
    """Block replays for one base run: the base keys/values, then packed partial-position rows."""

    def __init__(self, adapter, block_in: dict, batch: int, T: int):
        self.adapter, self.block_in, self.b, self.T = adapter, block_in, batch, T
        self.kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        # (last hidden, logits) of the recording replay: checks the column-only head
        self._last: tuple[torch.Tensor, torch.Tensor] | None = None

    def _block(self, i: int):
        return self.adapter.root.get_submodule(self.adapter.block_paths[i])

    def record(self) -> torch.Tensor | None:
        """Replay every block on the full sequence, recording keys/values; returns the last-position logits."""
        hidden = self.block_in[0][0]
        for i in range(len(self.adapter.block_paths)):
            _, args, kwargs = self.block_in[i]
            named = _named(self._block(i), hidden, args, kwargs)
            if named is None:
                return None
            _, rest, cache_name = named
            rec = _Recorder()
            rest[cache_name] = rec
            out = self._block(i)(hidden, **rest)
            if rec.kv is None:
                return None
            self.kv[i] = rec.kv
            hidden = out[0] if isinstance(out, (tuple, list)) else out
        logits = self.adapter.tail(hidden, True)
        self._last = (hidden[:, -1:], logits)
        return logits

    def run(self, start: int, pack: Pack, tail: bool = True, cut_last: bool = True) -> torch.Tensor:
        """Blocks start.. on the packed rows; returns last-position logits [n_rows * batch, 1, vocab]
        (row-major: all base items of row 0 first), or the final hidden states there with tail=False.

        cut_last: the last block only needs each row's last position, so it runs twice: once on every
        packed token, stopped as soon as the keys/values exist, then in full on the last tokens only.
        The caller must not have edits inside the last block when cut_last is set."""
        dev = self.block_in[start][0].device
        pos = pack.positions(dev)
        last = torch.tensor(pack.last_index(), device=dev)
        hidden = self.block_in[start][0][:, pos]
        mask, mask_key = None, None
        n_blocks = len(self.adapter.block_paths)
        for i in range(start, n_blocks):
            _, args, kwargs = self.block_in[i]
            block = self._block(i)
            named = _named(block, hidden, args, kwargs)
            if named is None:
                raise RuntimeError(f"block {self.adapter.block_paths[i]} cannot be replayed position-wise")
            _, rest, cache_name = named
            base_mask = rest.get("attention_mask")  # per block: sliding and full layers get different masks
            key = (base_mask.data_ptr(), tuple(base_mask.shape)) if isinstance(base_mask, torch.Tensor) else None
            if mask is None or key != mask_key:
                mask, mask_key = _mask(pack, base_mask, hidden.dtype, dev), key
            others = {k: v for k, v in rest.items() if k != "attention_mask"}
            k, v = self.kv[i]
            if cut_last and i == n_blocks - 1:
                rec = _Recorder(stop=True)
                first = {k_: _gather(v_, self.T, pos, self.b) for k_, v_ in others.items()}
                first[cache_name], first["attention_mask"] = rec, mask
                try:
                    block(hidden, **first)
                except StopForward:
                    pass
                if rec.kv is None:
                    raise RuntimeError(f"block {self.adapter.block_paths[i]} did not use the key/value cache")
                k = torch.cat([k.to(rec.kv[0].dtype), rec.kv[0]], -2)
                v = torch.cat([v.to(rec.kv[1].dtype), rec.kv[1]], -2)
                # the last tokens see exactly their full-run keys; their appended duplicates are masked out
                n = last.shape[0]
                lmask = torch.cat([mask[:, :, last], torch.full((*mask.shape[:2], n, n), torch.finfo(mask.dtype).min,
                                                                 dtype=mask.dtype, device=dev)], -1)
                hidden, pos, mask = hidden[:, last], pos[last], lmask
                last = torch.arange(n, device=dev)
            rest = {k_: _gather(v_, self.T, pos, self.b) for k_, v_ in others.items()}
            cache = _Prefixed(k, v)
            rest[cache_name] = cache
            rest["attention_mask"] = mask
            out = block(hidden, **rest)
            if not cache.used:
                raise RuntimeError(f"block {self.adapter.block_paths[i]} did not use the key/value cache")
            hidden = out[0] if isinstance(out, (tuple, list)) else out
        hid = hidden[:, last]                                                # [b, n, d]
        hid = hid.transpose(0, 1).reshape(-1, 1, hid.shape[-1])             # [n * b, 1, d]
        return self.adapter.tail(hid, True) if tail else hid

    def tails(self, pending: list, metric, max_items: int = 256) -> list:
        """Apply the model's head and `metric` to deferred final states, many chunks per call:
        pending = [(rows, hidden [n * batch, 1, d])] -> [(rows, values [n, batch, ...])]."""
        out: list = []
        group: list = []
        size = 0

        def flush():
            if not group:
                return
            val = head_metric(self.adapter, torch.cat([h for _, h in group]), metric, self._last)
            at = 0
            for rows, h in group:
                k = h.shape[0]
                v = val[at:at + k]
                out.append((rows, v.reshape(len(rows), self.b, *v.shape[1:])))
                at += k
            group.clear()
        for rows, h in pending:
            if size + h.shape[0] > max_items and group:
                flush()
                size = 0
            group.append((rows, h))
            size += h.shape[0]
        flush()
        return out
