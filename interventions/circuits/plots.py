"""Figures of circuits: the graph (layers on the x axis, edge width = |score|), the faithfulness curve and
an edge-score heatmap (senders x receivers, the highest-scoring ones)."""
from __future__ import annotations

from pathlib import Path

import torch

import interp
from interp.results import figure, save_figure

from .graph import Graph


def _node_xy(graph: Graph) -> dict[str, tuple[float, float]]:
    """Senders and receiver nodes placed by layer: input left, logits right, heads stacked, MLP on top."""
    xy = {"input": (0.0, graph.n_heads / 2), "logits": (2 * graph.n_layers + 1.0, graph.n_heads / 2)}
    for l in range(graph.n_layers):
        for h in range(graph.n_heads):
            xy[f"a{l}.h{h}"] = (2 * l + 1.0, float(h))
        xy[f"m{l}"] = (2 * l + 2.0, graph.n_heads / 2)
    return xy


def _receiver_node(graph: Graph, r) -> list[str]:
    if r.kind == "logits":
        return ["logits"]
    if r.kind == "mlp":
        return [f"m{r.layer}"]
    if r.kind == "q" or graph.n_kv == graph.n_heads:
        return [f"a{r.layer}.h{r.head}"]
    g = graph.n_heads // graph.n_kv
    return [f"a{r.layer}.h{h}" for h in range(r.head * g, (r.head + 1) * g)]


def plot_circuit(graph: Graph, scores: interp.Result, keep: torch.Tensor, path, title: str) -> Path:
    """The circuit's edges between node positions; width and opacity from |score|; q/k/v colour-coded."""
    xy = _node_xy(graph)
    s = scores.values.float()
    idx = torch.nonzero(keep).flatten().tolist()
    top = float(s[idx].abs().max()) if idx else 1.0
    fig = figure(max(6, 0.8 * graph.n_layers + 3), max(4, 0.35 * graph.n_heads + 2.5))
    ax = fig.subplots()
    colors = {"q": "tab:blue", "k": "tab:green", "v": "tab:purple", "mlp": "tab:orange", "logits": "black"}
    used = set()
    for e in idx:
        src = graph.senders[int(graph.src[e])]
        r = graph.receivers[int(graph.dst[e])]
        w = abs(float(s[e])) / (top or 1.0)
        for dst in _receiver_node(graph, r):
            (x0, y0), (x1, y1) = xy[src], xy[dst]
            ax.plot([x0, x1], [y0, y1], color=colors[r.kind], lw=0.5 + 4 * w, alpha=0.25 + 0.7 * w,
                    ls="-" if float(s[e]) >= 0 else "--", label=r.kind if r.kind not in used else None)
            used.add(r.kind)
            used.update({src, dst})
    for name, (x, y) in xy.items():
        on = name in used
        ax.scatter([x], [y], s=60 if on else 12, c="tab:red" if on else "lightgray", zorder=3)
        if on:
            ax.annotate(name, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xticks([0] + [2 * l + 1.5 for l in range(graph.n_layers)] + [2 * graph.n_layers + 1],
                  ["input"] + [f"L{l}" for l in range(graph.n_layers)] + ["logits"], fontsize=7)
    ax.set_yticks([])
    ax.set_xlabel("layer (heads at odd x, MLP at even x); dashed = negative score")
    ax.legend(fontsize=7, loc="upper left", title="edge into", title_fontsize=7)
    ax.set_title(f"{title}\n{len(idx)} of {graph.n_edges} edges", fontsize=9)
    return _save(fig, path)


def plot_faithfulness(curves: dict[str, interp.Result], path, title: str) -> Path:
    """f against the fraction of edges kept (log x), one line per method, CPR / CMD in the legend."""
    fig = figure(6.5, 4.2)
    ax = fig.subplots()
    for label, r in curves.items():
        x = [float(b) * 100 for b in r.coord("budget")]
        ax.plot(x, r.values.float().tolist(), marker="o",
                label=f"{label} (CPR {r.attrs['CPR']:.3f}, CMD {r.attrs['CMD']:.3f})")
    ax.axhline(1.0, color="gray", lw=0.7, ls=":")
    ax.axhline(0.0, color="gray", lw=0.7, ls=":")
    ax.set_xscale("log")
    ax.set_xlabel("edges kept (% of all edges)")
    ax.set_ylabel("faithfulness (m(C) - m(empty)) / (m(full) - m(empty))")
    ax.legend(fontsize=7)
    ax.set_title(title, fontsize=9)
    return _save(fig, path)


def score_matrix(graph: Graph, scores: interp.Result, n: int = 30) -> interp.Result:
    """[sender, receiver] scores of the n senders and n receivers with the largest total |score|."""
    full = torch.zeros(len(graph.senders), len(graph.receivers))
    full[graph.src, graph.dst] = scores.values.float()
    si = full.abs().sum(1).topk(min(n, full.shape[0])).indices.sort().values
    ri = full.abs().sum(0).topk(min(n, full.shape[1])).indices.sort().values
    return interp.Result(full[si][:, ri], ("sender", "receiver"),
                         {"sender": [graph.senders[i] for i in si.tolist()],
                          "receiver": [graph.receivers[i].name for i in ri.tolist()]},
                         {**scores.attrs, "metric": f"edge score ({scores.attrs.get('method', '')})"})


def _save(fig, path) -> Path:
    return save_figure(fig, path)
