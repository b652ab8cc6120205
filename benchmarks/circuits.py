"""Circuits benchmarks, peer and interp side by side in one process (torch.set_num_threads(1), medians).

1. Exact edge patching of every edge (interp: edges as run_grid rows starting at the receiver's layer)
   against a per-edge loop of full forwards with plain torch hooks; same values (max abs diff), ratio.
2. Edge attribution: EAP, EAP-IG with n steps batched into one pass, the same n steps one pass each
   (an interpkit-style per-step loop), and TransformerLens 4.3's edge attribution_patch (GPT-2 only: it
   refuses grouped-query attention), in units of one forward+backward of the model on the batch.

    PYTHONPATH=$PWD python benchmarks/circuits.py --model gpt2-shape   # random GPT-2 (reduced), all edges
    PYTHONPATH=$PWD python benchmarks/circuits.py --model smollm2 --edges 120
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import interp  # noqa: E402
from interventions import circuits as C  # noqa: E402
from tests.interventions.test_circuits import Ref  # noqa: E402  (the plain-hook reference of the tests)


def timed(fn, reps: int):
    ts, out = [], None
    for _ in range(reps):
        t = time.perf_counter()
        out = fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts), out


def loop_edges(model, graph, base, source, metric, edges):
    """The per-edge loop: for each edge one full forward with plain hooks at its receiver (last position's
    logits only, as interp computes them)."""
    ref = Ref(model)
    delta = ref.capture(source) - ref.capture(base)
    with torch.no_grad():
        m0 = metric(model(base, logits_to_keep=1).logits).float().mean()
        out = []
        for e in edges:
            with ref.add_at(graph.receivers[int(graph.dst[e])], delta[int(graph.src[e])]):
                out.append(metric(model(base, logits_to_keep=1).logits).float().mean() - m0)
    return torch.stack(out)


def gpt2_shape(layers: int, d: int, heads: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=layers, n_embd=d, n_head=heads, vocab_size=50257, n_positions=128,
                     attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0)
    return GPT2LMHeadModel(cfg).eval()


def bench_exact(lm, clean, corr, metric, edges, reps):
    parts = C.Parts(lm)
    g = parts.graph
    t_ours, ours = timed(lambda: C.edge_patching(parts, clean, corr, metric, edges=edges, progress=False), reps)
    t_loop, loop = timed(lambda: loop_edges(lm.model, g, corr, clean, metric, edges), max(1, reps - 1))
    return {"edges": len(edges), "of_edges": g.n_edges, "interp_s": t_ours, "loop_s": t_loop,
            "ratio": t_loop / t_ours, "max_abs_diff": float((ours.values - loop).abs().max()),
            "max_abs_effect": float(loop.abs().max()), "interp_forward_equivalents": ours.attrs["forward_equivalents"]}


def fwd_bwd(model, ids, metric):
    out = model(ids).logits
    metric(out).float().sum().backward()
    model.zero_grad(set_to_none=True)


def bench_attribution(lm, clean, corr, metric, steps, reps, tl_ok):
    parts = C.Parts(lm)
    model = lm.model
    t_fb, _ = timed(lambda: fwd_bwd(model, corr, metric), reps)
    rows = {"forward+backward_s": t_fb}
    for name, kw in (("eap", {"method": "eap"}), (f"eap-ig{steps} batched", {"method": "eap-ig", "steps": steps}),
                     (f"eap-ig{steps} per-step loop", {"method": "eap-ig", "steps": steps, "steps_per_pass": 1})):
        t, res = timed(lambda kw=kw: C.eap(parts, clean, corr, metric, **kw), reps)
        rows[name] = {"s": t, "forward_backward_equivalents": t / t_fb,
                      "passes": res.attrs["forward_backward_passes"]}
    if tl_ok:
        from transformer_lens.model_bridge.sources._bridge_builder import build_bridge_from_module
        from transformer_lens.tools.analysis.attribution_patching import EdgeAttributionConfig, attribution_patch

        bridge = build_bridge_from_module(copy.deepcopy(model), type(model).__name__, hf_config=model.config)
        cfg = EdgeAttributionConfig(granularity="edge")
        t, _ = timed(lambda: attribution_patch(bridge, clean, corr, lambda lg: metric(lg).float().sum(), cfg), reps)
        rows["transformer_lens edge attribution_patch (eap)"] = {"s": t, "forward_backward_equivalents": t / t_fb}
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="gpt2-shape", choices=("gpt2-shape", "smollm2"))
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--d", type=int, default=256)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--edges", type=int, default=0, help="0: every edge; n: n edges spread over the graph")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    if args.model == "smollm2":
        lm = interp.attach(interp.zoo.load("smollm2"))
        task = C.fitting(C.ioi(n=4 * args.batch), lm.tokenizer, n=args.batch)
        tok = lambda xs: lm.adapter.prepare(xs).kwargs["input_ids"]
        clean, corr, metric = tok(task.clean), tok(task.corrupted), task.metric()
    else:
        lm = interp.attach(gpt2_shape(args.layers, args.d, args.heads))
        g = torch.Generator().manual_seed(0)
        clean = torch.randint(0, 50257, (args.batch, 12), generator=g)
        corr = clean.clone()
        corr[:, 4] = torch.randint(0, 50257, (args.batch,), generator=g)
        metric = interp.metrics.logit_diff(11, 13)
    n = C.Parts(lm).graph.n_edges
    edges = list(range(n)) if not args.edges else torch.linspace(0, n - 1, args.edges).round().long().tolist()
    res = {"model": args.model, "batch": int(clean.shape[0]), "seq_len": int(clean.shape[1]),
           "exact": bench_exact(lm, clean, corr, metric, edges, args.reps),
           "attribution": bench_attribution(lm, clean, corr, metric, args.steps, args.reps,
                                            tl_ok=args.model == "gpt2-shape")}
    text = json.dumps(res, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
