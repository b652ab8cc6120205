"""`interp circuit`: find the circuit of a task in a language model.

    interp circuit --model smollm2 --task ioi --method eap-ig --steps 5 --out interp-out/circuit

scores every edge (EAP, EAP-IG over inputs or activations, or exact edge patching), builds circuits over
the MIB edge budgets (top-k or greedy), measures their faithfulness, and writes: the scores as an
interp Result, the faithfulness curve (Result + PNG), the circuit at --budget as a graph PNG and as a
MIB-format JSON file, an edge-score heatmap and a summary JSON.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

METHODS = ("eap", "eap-ig", "eap-ig-act", "exact")


def register(sub) -> None:
    p = sub.add_parser("circuit", help="edge attribution / exact edge patching, circuits and faithfulness curves")
    p.add_argument("--model", default="smollm2", help="zoo name, local folder or hub name (default: %(default)s)")
    p.add_argument("--task", default="ioi", choices=("ioi", "capitals", "greater_than", "agreement"),
                   help="templated prompt-pair task (default: %(default)s)")
    p.add_argument("--n", type=int, default=8, help="prompt pairs (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the task's templates (default: %(default)s)")
    p.add_argument("--method", default="eap-ig", choices=METHODS, help="edge scores (default: %(default)s)")
    p.add_argument("--steps", type=int, default=5, help="EAP-IG steps (default: %(default)s)")
    p.add_argument("--select", default="top-k", choices=("top-k", "greedy"),
                   help="circuit selection (default: %(default)s)")
    p.add_argument("--ablation", default="patching", choices=("patching", "mean"),
                   help="what edges outside a circuit carry: the corrupted run's outputs, or their mean over "
                        "the corrupted prompts (default: %(default)s)")
    p.add_argument("--budget", type=float, default=0.01, help="edge fraction of the circuit drawn and saved "
                   "(default: %(default)s)")
    p.add_argument("--out", default="interp-out/circuit", help="output folder (default: %(default)s)")
    p.set_defaults(func=run)


def run(args) -> int:
    import torch

    import interp
    from interventions import circuits as C
    from recipes.models import load

    if not 0 < args.budget <= 1:
        raise C.CircuitArgumentError(f"--budget {args.budget}: give a fraction of the edges in (0, 1], e.g. 0.01")
    t0 = time.perf_counter()
    model = load(args.model)
    lm = model if isinstance(model, interp.Instrumented) else interp.attach(model)
    if lm.tokenizer is None:
        raise ValueError(f"{args.model!r} has no tokenizer; circuit tasks are built from text prompts")
    task = C.fitting(C.TASKS[args.task](n=max(4 * args.n, 16), seed=args.seed), lm.tokenizer, n=args.n)
    metric = task.metric()
    parts = C.Parts(lm)
    g = parts.graph
    if args.method == "exact":
        scores = C.edge_patching(parts, task.clean, task.corrupted, metric)
    else:
        with torch.enable_grad():
            scores = C.eap(parts, task.clean, task.corrupted, metric, method=args.method, steps=args.steps)
    reference = task.corrupted if args.ablation == "mean" else None
    curve = C.faithfulness(parts, task.clean, task.corrupted, metric, scores, select=args.select,
                           ablation=args.ablation, reference=reference)
    keep = C.greedy(g, scores, round(args.budget * g.n_edges)) if args.select == "greedy" else \
        C.top_k(scores, round(args.budget * g.n_edges))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = f"{args.model} {args.task} ({len(task)} pairs), {args.method}" + \
        (f" {args.steps} steps" if args.method.startswith("eap-ig") else "")
    scores.attrs["title"] = name
    scores.save(out / "scores")
    curve.save(out / "faithfulness")
    C.plot_faithfulness({args.method: curve}, out / "faithfulness.png",
                        f"{name}; metric {metric.name}; {args.select}, {args.ablation} ablation")
    C.plot_circuit(g, scores, keep, out / "circuit.png", f"{name}; {args.select} {args.budget:.1%} of edges")
    C.score_matrix(g, scores).plot(out / "scores.png", title=f"{name}: top senders x receivers")
    C.save_circuit(out / "circuit.json", g, scores, keep, cfg={"model": args.model, "task": args.task})
    top = sorted(zip(scores.coords["edge"], scores.values.tolist()), key=lambda t: -abs(t[1]))[:20]
    summary = {"model": args.model, "task": args.task, "pairs": len(task), "method": args.method,
               "metric": metric.name, "edges": g.n_edges, "CPR": curve.attrs["CPR"], "CMD": curve.attrs["CMD"],
               "m_full": curve.attrs["m_full"], "m_empty": curve.attrs["m_empty"],
               "faithfulness": dict(zip(map(str, curve.coord("budget")), curve.values.tolist())),
               "top_edges": top, "seconds": round(time.perf_counter() - t0, 1)}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"interp circuit: {g.n_edges} edges scored with {args.method}; CPR {curve.attrs['CPR']:.3f}, "
          f"CMD {curve.attrs['CMD']:.3f}; wrote {out}/ (scores, faithfulness, circuit.png/json, summary.json)")
    return 0
