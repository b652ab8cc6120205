"""SmolLM2 circuits for docs/FINDINGS_CIRCUITS.md: IOI-style and capital-country tasks.

For each task: EAP and EAP-IG (5 steps, over the inputs) on every edge; exact edge patching (denoising) on
a bounded edge set, the top edges of EAP-IG plus edges spread evenly over the graph (all-edge exact
patching of 70k edges does not fit 2 shared CPU cores); Spearman and top-k overlap of the methods on that
set; faithfulness curves (top-k, corrupted-run patching) for EAP and EAP-IG; figures and a JSON summary.

    PYTHONPATH=$PWD python benchmarks/circuits_smollm2.py --out docs/figures/circuits
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import interp  # noqa: E402
from interventions import circuits as C  # noqa: E402


def one_task(parts, tok, name: str, n: int, top: int, spread: int, steps: int, out: Path, budgets,
             scores_dir=None) -> dict:
    task = C.fitting(C.TASKS[name](n=6 * n), tok, n=n)
    metric = task.metric()
    g = parts.graph
    t0 = time.perf_counter()
    res: dict = {"task": name, "pairs": len(task), "example": [task.clean[0], task.corrupted[0], task.answers[0],
                                                               task.foils[0]]}
    scores = {}
    for method, kw in (("EAP", {"method": "eap"}), (f"EAP-IG ({steps} steps)", {"method": "eap-ig", "steps": steps})):
        t = time.perf_counter()
        scores[method] = C.eap(parts, task.clean, task.corrupted, metric, **kw)
        res[f"{method} seconds"] = round(time.perf_counter() - t, 1)
    ig = scores[f"EAP-IG ({steps} steps)"]
    order = torch.argsort(ig.values.abs(), descending=True)
    chosen = sorted(set(order[:top].tolist()) | set(torch.linspace(0, g.n_edges - 1, spread).round().long().tolist()))
    t = time.perf_counter()
    exact = C.edge_patching(parts, task.clean, task.corrupted, metric, edges=chosen, progress=False)
    res["exact seconds"] = round(time.perf_counter() - t, 1)
    res["exact edges"] = len(chosen)
    sub = torch.tensor(chosen)
    for method, s in scores.items():
        a, b = s.values[sub], exact.values
        res[f"{method} vs exact"] = {"spearman": C.spearman(a, b), "spearman |.|": C.spearman(a.abs(), b.abs()),
                                     "top-20 overlap": C.top_overlap(a, b, 20),
                                     "top-50 overlap": C.top_overlap(a, b, 50)}
    res["top exact edges"] = [(exact.coords["edge"][i], round(float(exact.values[i]), 4))
                              for i in torch.argsort(exact.values.abs(), descending=True)[:15].tolist()]
    res["top EAP-IG edges"] = [(g.edge_names[i], round(float(ig.values[i]), 4)) for i in order[:15].tolist()]
    curves = {}
    for method, s in scores.items():
        curves[method] = C.faithfulness(parts, task.clean, task.corrupted, metric, s, budgets=budgets, progress=False)
        res[f"{method} faithfulness"] = {"budgets": list(budgets),
                                         "f": [round(v, 4) for v in curves[method].values.tolist()],
                                         "CPR": curves[method].attrs["CPR"], "CMD": curves[method].attrs["CMD"]}
    res["m_full"], res["m_empty"] = curves["EAP"].attrs["m_full"], curves["EAP"].attrs["m_empty"]
    title = f"SmolLM2-135M, {name} ({len(task)} pairs), metric {metric.name}"
    C.plot_faithfulness(curves, out / f"smollm2_{name}_faithfulness.png",
                        f"{title}\ntop-k circuits, corrupted-run patching")
    k = max(1, round(0.002 * g.n_edges))
    C.plot_circuit(g, ig, C.greedy(g, ig, k), out / f"smollm2_{name}_circuit.png",
                   f"{title}\nEAP-IG ({steps} steps), greedy {k} edges (0.2%)")
    C.score_matrix(g, ig, n=30).plot(out / f"smollm2_{name}_scores.png",
                                     title=f"{title}: EAP-IG edge scores, top 30 senders x receivers")
    exact.save(out / f"smollm2_{name}_exact_subset")
    if scores_dir is not None:  # every edge's EAP-IG score (1.6 MB of edge names: not kept in docs/)
        ig.save(Path(scores_dir) / f"smollm2_{name}_eap_ig")
    res["seconds"] = round(time.perf_counter() - t0, 1)
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--tasks", default="ioi,capitals")
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--top", type=int, default=100)
    p.add_argument("--spread", type=int, default=100)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--out", default="docs/figures/circuits")
    p.add_argument("--scores-dir", default=None, help="also save every edge's EAP-IG score there")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lm = interp.attach(interp.zoo.load("smollm2"))
    parts = C.Parts(lm)
    budgets = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5)
    allres = {"model": "smollm2", "edges": parts.graph.n_edges, "tasks": []}
    for name in args.tasks.split(","):
        allres["tasks"].append(one_task(parts, lm.tokenizer, name, args.n, args.top, args.spread, args.steps, out,
                                        budgets, args.scores_dir))
        (out / "smollm2_summary.json").write_text(json.dumps(allres, indent=1))
        print(json.dumps(allres["tasks"][-1], indent=1), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
