"""Circuits as edge sets: top-k and greedy selection, faithfulness curves (MIB protocol), MIB JSON files.

faithfulness f(C) = (m(C) - m(empty)) / (m(full) - m(empty)), with m(C) the metric of the clean run with every
edge outside C ablated (mean over items first). Over edge budgets (fractions of all edges) the curve's area
CPR = integral of f over the fraction of edges in [0, 1] (trapezoids, f(0) = 0 and f(1) = 1 by definition)
and CMD = integral of |1 - f| over the same axis.
"""
from __future__ import annotations

import heapq
import json
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

import interp
from interp.errors import InterpError
from interp.results import atomic_write

from .graph import CircuitArgumentError, Graph
from .patching import _parts, evaluate

BUDGETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5)
MIB_FORMAT = "mib-circuit/1 (EAP-IG Graph.to_json layout)"


class CircuitFileError(InterpError, ValueError):
    """A circuit JSON file does not match this model's graph."""


def _order(scores: torch.Tensor, absolute: bool) -> torch.Tensor:
    s = scores.float().abs() if absolute else scores.float()
    return torch.argsort(s, descending=True, stable=True)


def top_k(scores: interp.Result | torch.Tensor, k: int, absolute: bool = True) -> torch.Tensor:
    """The k highest-scoring edges (by |score| unless absolute=False) as a bool mask."""
    s = scores.values if isinstance(scores, interp.Result) else scores
    m = torch.zeros(s.numel(), dtype=torch.bool)
    m[_order(s, absolute)[:max(0, int(k))]] = True
    return m


def greedy(graph: Graph, scores: interp.Result | torch.Tensor, k: int, absolute: bool = True) -> torch.Tensor:
    """Grow a circuit from the logits: repeatedly add the best-scoring edge into a node already connected
    to the logits (EAP-IG's greedy search), so every chosen edge lies on a path to the output."""
    s = (scores.values if isinstance(scores, interp.Result) else scores).float()
    s = s.abs() if absolute else s
    into: dict[int, list[int]] = {}
    for e, r in enumerate(graph.dst.tolist()):
        into.setdefault(r, []).append(e)
    recv_of = _receivers_of_sender(graph)
    heap: list[tuple[float, int]] = []
    seen_recv: set[int] = set()

    def open_receiver(r: int):
        if r not in seen_recv:
            seen_recv.add(r)
            for e in into.get(r, []):
                heapq.heappush(heap, (-float(s[e]), e))
    open_receiver(len(graph.receivers) - 1)
    chosen = torch.zeros(graph.n_edges, dtype=torch.bool)
    while heap and int(chosen.sum()) < k:
        _, e = heapq.heappop(heap)
        if chosen[e]:
            continue
        chosen[e] = True
        for r in recv_of[int(graph.src[e])]:
            open_receiver(r)
    return chosen


def _receivers_of_sender(graph: Graph) -> list[list[int]]:
    """For each sender, the receivers that are its own inputs (a head's q, its KV group's k and v; an MLP's input)."""
    group = graph.n_heads // graph.n_kv
    out: list[list[int]] = [[] for _ in graph.senders]
    for i, name in enumerate(graph.senders):
        if name == "input":
            continue
        layer = graph.sender_layer[i]
        for j, r in enumerate(graph.receivers):
            if r.layer != layer:
                continue
            if name.startswith("m") and r.kind == "mlp":
                out[i].append(j)
            elif name.startswith("a") and r.kind in ("q", "k", "v"):
                h = int(name.split(".h")[1])
                if (r.kind == "q" and r.head == h) or (r.kind in ("k", "v") and r.head == h // group):
                    out[i].append(j)
    return out


def faithfulness(lm_or_parts, clean, corrupted, metric: Callable, scores: interp.Result, *,
                 budgets: Sequence[float] = BUDGETS, select: str = "top-k", absolute: bool = True,
                 ablation: str = "patching", reference=None, progress: bool = True) -> interp.Result:
    """f over edge budgets for circuits chosen from `scores`; attrs carry CPR, CMD, m(full), m(empty)."""
    parts = _parts(lm_or_parts)
    g = parts.graph
    E = g.n_edges
    ks = [max(1, round(f * E)) for f in budgets]
    pick = {"top-k": lambda k: top_k(scores, k, absolute), "greedy": lambda k: greedy(g, scores, k, absolute)}
    if select not in pick:
        raise CircuitArgumentError(f"select must be 'top-k' or 'greedy', not {select!r}")
    circuits = [pick[select](k) for k in ks] + [torch.zeros(E, dtype=torch.bool)]
    vals, base = evaluate(parts, clean, corrupted, metric, circuits, ablation=ablation, reference=reference,
                          progress=progress)
    m = vals.mean(1)
    m_empty, m_full = float(m[-1]), float(base.mean())
    if abs(m_full - m_empty) < 1e-12:
        raise CircuitArgumentError("m(full) equals m(empty): the clean and ablated runs give the same metric, so "
                         "faithfulness is undefined; choose prompt pairs whose metric differs")
    f = (m[:-1] - m_empty) / (m_full - m_empty)
    cpr, cmd = area(list(budgets), f.tolist())
    attrs = {"metric": getattr(metric, "name", "metric"), "select": select, "absolute": absolute,
             "ablation": ablation, "m_full": m_full, "m_empty": m_empty, "CPR": cpr, "CMD": cmd,
             "n_edges": E, "edges_kept": ks, "scores_method": scores.attrs.get("method", "")}
    return interp.Result(f, ("budget",), {"budget": list(budgets)}, attrs)


def auroc(scores: torch.Tensor, positives: torch.Tensor) -> float:
    """Area under the ROC curve of |scores| separating `positives` (bool mask) from the rest (ties count 1/2)."""
    s = scores.float().abs()
    pos, neg = s[positives.bool()], s[~positives.bool()]
    if pos.numel() == 0 or neg.numel() == 0:
        raise CircuitArgumentError("AUROC needs at least one positive and one negative edge")
    gt = (pos[:, None] > neg[None]).double().sum() + 0.5 * (pos[:, None] == neg[None]).double().sum()
    return float(gt / (pos.numel() * neg.numel()))


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman rank correlation (average ranks for ties)."""
    def rank(x):
        x = x.double()
        order = torch.argsort(x, stable=True)
        r = torch.empty_like(x)
        r[order] = torch.arange(x.numel(), dtype=torch.double)
        for v in torch.unique(x):  # average the ranks of ties
            m = x == v
            if int(m.sum()) > 1:
                r[m] = r[m].mean()
        return r
    ra, rb = rank(a), rank(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()).clamp_min(1e-12))


def top_overlap(a: torch.Tensor, b: torch.Tensor, k: int) -> float:
    """Fraction of the k edges with the largest |a| that are also among the k largest |b|."""
    ta = set(torch.argsort(a.abs(), descending=True)[:k].tolist())
    tb = set(torch.argsort(b.abs(), descending=True)[:k].tolist())
    return len(ta & tb) / max(1, k)


def area(budgets: list[float], f: list[float]) -> tuple[float, float]:
    """(CPR, CMD): trapezoid areas of f and |1 - f| over the fraction of edges, with f(0)=0, f(1)=1."""
    xs, ys = [0.0, *budgets, 1.0], [0.0, *f, 1.0]
    cpr = cmd = 0.0
    for x0, x1, y0, y1 in zip(xs, xs[1:], ys, ys[1:]):
        cpr += (x1 - x0) * (y0 + y1) / 2
        cmd += (x1 - x0) * (abs(1 - y0) + abs(1 - y1)) / 2
    return cpr, cmd


# ---------------------------------------------------------------------------------------------
# MIB / EAP-IG circuit files
# ---------------------------------------------------------------------------------------------

def save_circuit(path, graph: Graph, scores: interp.Result | torch.Tensor, in_graph: torch.Tensor | None = None,
                 cfg: dict | None = None) -> Path:
    """Write {"cfg", "nodes": {name: {"in_graph"}}, "edges": {name: {"score", "in_graph"}}} atomically
    (the layout of MIB's circuit submissions and EAP-IG's Graph.to_json)."""
    s = (scores.values if isinstance(scores, interp.Result) else scores).float()
    keep = torch.ones(graph.n_edges, dtype=torch.bool) if in_graph is None else in_graph.bool()
    names = graph.edge_names
    nodes_in = {"logits"} | {graph.senders[i] for i in graph.src[keep].tolist()}
    d = {"cfg": {"n_layers": graph.n_layers, "n_heads": graph.n_heads, "n_key_value_heads": graph.n_kv,
                 "parallel_attn_mlp": False, **(cfg or {})},
         "nodes": {n: {"in_graph": n in nodes_in} for n in [*graph.senders, "logits"]},
         "edges": {n: {"score": float(v), "in_graph": bool(k)} for n, v, k in zip(names, s.tolist(), keep.tolist())}}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda p: Path(p).write_text(json.dumps(d)))
    return path


def load_circuit(path, graph: Graph) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores [E], in_graph [E]) from a circuit JSON, checked against `graph`."""
    d = json.loads(Path(path).read_text())
    if not isinstance(d, dict) or "edges" not in d:
        raise CircuitFileError(f"{path} has no 'edges' mapping; a circuit file is "
                               '{"cfg": ..., "nodes": ..., "edges": {"a0.h1->m0": {"score": s, "in_graph": b}}}')
    cfg = d.get("cfg", {})
    for key, want in (("n_layers", graph.n_layers), ("n_heads", graph.n_heads)):
        if key in cfg and int(cfg[key]) != want:
            raise CircuitFileError(f"{path} is for a model with {key}={cfg[key]}, this graph has {want}")
    names = graph.edge_names
    unknown = [n for n in d["edges"] if n not in set(names)]
    if unknown:
        raise CircuitFileError(f"{path} names {len(unknown)} edges this graph does not have (first: {unknown[:3]}); "
                               "was it written for another model?")
    scores = torch.tensor([float(d["edges"].get(n, {}).get("score", 0.0)) for n in names])
    keep = torch.tensor([bool(d["edges"].get(n, {}).get("in_graph", False)) for n in names])
    return scores, keep
