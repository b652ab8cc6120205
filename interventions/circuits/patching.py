"""Exact edge patching and circuit evaluation, through interp ops on the engine's grids.

Edge patching of s -> r: r's input becomes the base run's input of r plus (s's output in the source run
minus s's output in the base run); nothing else changes, so every input upstream of r is the base run's.
For a head's q/k/v input that is a new value of that head's slice of the projection output, for an MLP a
new MLP input, for the logits a new final-norm input. Each edge is one row of `run_grid` holding one
Replace op at the receiver's site, so the rows of receivers in layer l start from the base run's input of
block l (prefix reuse) and run many to a batch; edges into the logits need only the head.

Circuit evaluation: each receiver's input is rebuilt inside the run from the outputs the senders actually
produced there, with the outputs of senders whose edge is outside the circuit swapped for their ablated
value (the corrupted run's, or a mean over reference inputs).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

import interp
from interp import Replace

from .graph import CircuitArgumentError, Parts

Metric = Callable[[torch.Tensor], torch.Tensor]


def _parts(lm_or_parts) -> Parts:
    return lm_or_parts if isinstance(lm_or_parts, Parts) else Parts(lm_or_parts)


def _edge_op(parts: Parts, r, delta: torch.Tensor, cache) -> Replace:
    """The Replace op that puts `delta` [b, T, d] into receiver r's input (r in layers 0..L-1)."""
    l = r.layer
    if not bool(delta.any()):  # a sender whose output is the same in both runs: the receiver is unchanged
        return Replace(parts.mlp_in_site(l) if r.kind == "mlp" else parts.proj_site(l, r.kind), fn=lambda sel: sel)
    if r.kind == "mlp":
        mid = cache[f"blocks.{l}.resid_mid"]
        return Replace(parts.mlp_in_site(l), fn=lambda sel: parts.ln2(l)(mid + delta).to(sel.dtype))
    W, bias = parts.proj_weight(l, r.kind)
    pre, h, c = cache[f"blocks.{l}.resid_pre"], r.head, r.kind

    def fn(sel):
        u = parts.ln1(l)(pre + delta)
        val = torch.einsum("ntd,ed->nte", u, W[h].to(u.dtype))
        val = val if bias is None else val + bias[h].to(u.dtype)
        out = sel.clone()
        parts.heads_of(out, c)[..., h, :] = val.to(sel.dtype)
        return out
    return Replace(parts.proj_site(l, c), fn=fn)


def _captures(parts: Parts, inputs):
    with torch.no_grad():
        run = parts.lm.run(inputs, capture=parts.capture_sites(), last_only=True)
    return run.cache


def edge_patching(lm_or_parts, clean, corrupted, metric: Metric, *, direction: str = "denoise",
                  edges: Sequence[int] | None = None, chunk_rows: int | None = None,
                  memory_budget: int = 1 << 30, progress: bool = True) -> interp.Result:
    """Exact effect of patching each edge: mean over items of m(patched) - m(base).

    direction "denoise": the corrupted run with one edge carrying the clean sender's output (comparable with
    EAP's sign); "noise": the clean run with one edge carrying the corrupted sender's output."""
    parts = _parts(lm_or_parts)
    if direction not in ("denoise", "noise"):
        raise CircuitArgumentError(f"direction must be 'denoise' or 'noise', not {direction!r}")
    base, source = (corrupted, clean) if direction == "denoise" else (clean, corrupted)
    g = parts.graph
    idx = list(range(g.n_edges)) if edges is None else [int(e) for e in edges]
    bc, sc = _captures(parts, base), _captures(parts, source)
    parts.check(bc)
    delta = parts.sender_outputs(sc) - parts.sender_outputs(bc)
    values = torch.zeros(len(idx))
    L = parts.L
    into_blocks = [j for j, e in enumerate(idx) if g.receivers[int(g.dst[e])].layer < L]
    into_logits = [j for j, e in enumerate(idx) if g.receivers[int(g.dst[e])].layer == L]
    stats = {"rows": len(into_blocks), "forward_equivalents": 0.0}
    base_val = None
    if into_logits:
        vals, base_val = _logit_edges(parts, [idx[j] for j in into_logits], delta, bc, metric)
        values[into_logits] = vals - base_val
    if into_blocks:
        # one grid: the engine groups rows by their first layer and replays blocks l.. for each group
        rows = [[_edge_op(parts, g.receivers[int(g.dst[idx[j]])], delta[int(g.src[idx[j]])], bc)]
                for j in into_blocks]
        out = parts.lm.run_grid(base, rows, metric, chunk_rows=chunk_rows, memory_budget=memory_budget,
                                progress=progress, desc="edges")
        base_val = out.base.float().mean()
        values[into_blocks] = out.values.float().mean(1) - base_val
        stats["forward_equivalents"] = out.stats["forward_equivalents"] + 1  # + its base run
    names = g.edge_names
    attrs = {"method": "exact edge patching", "direction": direction, "metric": getattr(metric, "name", "metric"),
             "base_metric": float(base_val), **stats}
    return interp.Result(values, ("edge",), {"edge": [names[e] for e in idx]}, attrs)


def _logit_edges(parts: Parts, es: list[int], delta, bc, metric):
    """Edges into the logits: the final norm and head on the last position's patched residual."""
    g = parts.graph
    final = bc[f"blocks.{parts.L - 1}.resid_post"][:, -1:]
    b = final.shape[0]
    with torch.no_grad():
        base_val = metric(parts.lm.adapter.tail(final, True)).float().mean()
        hidden = torch.cat([final + delta[int(g.src[e])][:, -1:] for e in es])
        vals = metric(parts.lm.adapter.tail(hidden, True)).float().reshape(len(es), b).mean(1)
    return vals, base_val


# ---------------------------------------------------------------------------------------------
# circuits: everything outside ablated, evaluated inside the run
# ---------------------------------------------------------------------------------------------

class _CircuitRow:
    """The ops of one circuit: record what senders write, rebuild each receiver's input."""

    def __init__(self, parts: Parts, keep: torch.Tensor, ablated: torch.Tensor):
        g = parts.graph
        miss = g.mask() & ~_dense(g, keep)            # [S, R]: edges to ablate
        self.parts, self.ablated = parts, ablated     # ablated: [S, b or 1, T, d]
        self.miss = miss.to(ablated.dtype)
        self.act: list[torch.Tensor] = []            # sender outputs as this run produces them
        self.pre: dict[int, torch.Tensor] = {}
        self.mid: dict[int, torch.Tensor] = {}
        self._diff: torch.Tensor | None = None
        self.r_start = _receiver_starts(g)

    def _delta(self, r0: int, r1: int, like: torch.Tensor) -> torch.Tensor | None:
        """[b, T, n, d] ablated-minus-actual sum over the missing edges into receivers r0..r1-1."""
        m = self.miss[:, r0:r1]
        S = self.n_act()
        if not bool(m[:S].any()):
            return None
        if self._diff is None or self._diff.shape[0] != S:  # q, k and v of one layer share it
            self._diff = self.ablated[:S].to(like.dtype) - torch.cat(self.act)   # [S', b, T, d]
        return torch.einsum("sr,sbtd->btrd", m[:S].to(like.dtype), self._diff)

    def n_act(self) -> int:
        return sum(a.shape[0] for a in self.act)

    def ops(self) -> list[Replace]:
        p, L = self.parts, self.parts.L
        ops = [Replace("blocks.0.resid_pre", fn=self._input)]
        for l in range(L):
            if l:
                ops.append(Replace(f"blocks.{l}.resid_pre", fn=lambda s, l=l: self._rec(self.pre, l, s)))
            for site in sorted({p.proj_site(l, c) for c in "qkv"}):
                ops.append(Replace(site, fn=lambda s, l=l, site=site: self._qkv(l, site, s)))
            ops.append(Replace(f"blocks.{l}.attn.z", fn=lambda s, l=l: self._heads(l, s)))
            # the MLP's residual input is resid_pre + attn.out (recorded here: a hook on the MLP norm's input
            # would fire again when _mlp_in calls that norm)
            ops.append(Replace(f"blocks.{l}.attn.out", fn=lambda s, l=l: self._rec(self.mid, l, s, self.pre[l])))
            ops.append(Replace(p.mlp_in_site(l), fn=lambda s, l=l: self._mlp_in(l, s)))
            ops.append(Replace(f"blocks.{l}.mlp.out", fn=lambda s: self._push(s[None], s)))
        ops.append(Replace(f"blocks.{L - 1}.resid_post", fn=self._logits))
        return ops

    def _input(self, sel):
        self.act, self.pre, self.mid, self._diff = [sel[None]], {0: sel}, {}, None
        return sel

    @staticmethod
    def _rec(store, l, sel, plus=None):
        store[l] = sel if plus is None else plus + sel
        return sel

    def _push(self, outs, sel):
        self.act.append(outs)
        return sel

    def _heads(self, l, sel):
        return self._push(self.parts.head_outputs(sel, l), sel)

    def _qkv(self, l, site, sel):
        p = self.parts
        for c in "qkv":
            if p.proj_site(l, c) != site:
                continue
            r0, n = self.r_start[(l, c)], (p.H if c == "q" else p.KV)
            d = self._delta(r0, r0 + n, sel)
            if d is None:
                continue
            heads = torch.nonzero(self.miss[:self.n_act(), r0:r0 + n].any(0)).flatten()
            u = p.ln1(l)(self.pre[l][:, :, None] + d)           # [b, T, n, d]
            W, bias = p.proj_weight(l, c)
            val = torch.einsum("btnd,ned->btne", u, W.to(u.dtype))
            val = val if bias is None else val + bias.to(u.dtype)
            sel = p.with_heads(sel, c, val, heads)
        return sel

    def _mlp_in(self, l, sel):
        r = self.r_start[(l, "mlp")]
        d = self._delta(r, r + 1, sel)
        return sel if d is None else self.parts.ln2(l)(self.mid[l] + d[:, :, 0]).to(sel.dtype)

    def _logits(self, sel):
        r = self.r_start[("logits",)]
        d = self._delta(r, r + 1, sel)
        return sel if d is None else sel + d[:, :, 0]


def _receiver_starts(g) -> dict:
    out: dict[tuple, int] = {}
    for i, r in enumerate(g.receivers):
        key = ("logits",) if r.kind == "logits" else (r.layer, r.kind)
        out.setdefault(key, i)
    return out


def _dense(g, keep: torch.Tensor) -> torch.Tensor:
    m = torch.zeros(len(g.senders), len(g.receivers), dtype=torch.bool)
    m[g.src[keep], g.dst[keep]] = True
    return m


def ablated_outputs(parts: Parts, corrupted, ablation: str = "patching", reference=None) -> torch.Tensor:
    """[S, b or 1, T, d] what an ablated sender writes: its corrupted output, or its mean over `reference`
    inputs (per position; mean ablation)."""
    if ablation == "patching":
        return parts.sender_outputs(_captures(parts, corrupted))
    if ablation == "mean":
        if reference is None:
            raise CircuitArgumentError("mean ablation needs reference= inputs (same token length) to average over")
        return parts.sender_outputs(_captures(parts, reference)).mean(1, keepdim=True)
    raise CircuitArgumentError(f"ablation must be 'patching' or 'mean', not {ablation!r}")


def evaluate(lm_or_parts, clean, corrupted, metric: Metric, circuits: Sequence[torch.Tensor], *,
             ablation: str = "patching", reference=None, chunk_rows: int | None = None,
             progress: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Metric of the clean run with every edge outside each circuit ablated: ([n_circuits, b], clean [b]).

    A circuit is a bool mask over the graph's edges (or a list of edge indices)."""
    parts = _parts(lm_or_parts)
    g = parts.graph
    abl = ablated_outputs(parts, corrupted, ablation, reference)
    masks = [_as_mask(c, g.n_edges) for c in circuits]
    rows = [_CircuitRow(parts, m, abl).ops() for m in masks]
    out = parts.lm.run_grid(clean, rows, metric, chunk_rows=chunk_rows, progress=progress, desc="circuits")
    return out.values.float(), out.base.float()


def _as_mask(c, n: int) -> torch.Tensor:
    c = torch.as_tensor(c)
    if c.dtype == torch.bool:
        if c.numel() != n:
            raise CircuitArgumentError(f"a circuit mask needs {n} entries (one per edge), got {c.numel()}")
        return c
    m = torch.zeros(n, dtype=torch.bool)
    m[c.long()] = True
    return m


def path_patching(lm_or_parts, clean, corrupted, metric: Metric, sender: str, receivers: Sequence[str], *,
                  progress: bool = False) -> float:
    """Path patching: the clean run with `sender`'s corrupted output entering only `receivers` (names such
    as "a5.h1<q>", "m7", "logits"); everything downstream of those receivers is recomputed. Returns the
    mean over pairs of m(patched) - m(clean)."""
    parts = _parts(lm_or_parts)
    g = parts.graph
    names = [f"{sender}->{r}" for r in receivers]
    keep = torch.ones(g.n_edges, dtype=torch.bool)
    for n in names:
        keep[g.index(n)] = False
    vals, base = evaluate(parts, clean, corrupted, metric, [keep], progress=progress)
    return float(vals[0].mean() - base.mean())
