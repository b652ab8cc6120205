"""Residual-stream patching sweep against the strongest way each peer can be used: batched.

`benchmarks/patching.py` compares interp with the per-cell loops the peers document (one forward per
(layer, position) cell). A researcher who cares about speed batches instead: one forward per layer
holding the T positions as T rows of the batch. This script runs those batched anchors and interp
side by side in one process, on the same weights, and checks that every sweep agrees to 1e-4:

  plain torch  : per layer, the corrupted prompt repeated T times, a forward pre-hook on block l
                 writing the clean resid_pre into row p at position p; the base model's last hidden
                 state only and the metric's two unembedding rows (the most a careful user can skip)
  TransformerLens : per layer, one `run_with_hooks` on the T-row batch with a hook on
                 `blocks.{l}.hook_resid_pre` (full logits, as TL computes them)
  nnsight      : per layer, one `trace` on the T-row batch, writing all T cells through one indexed
                 assignment to `transformer.h[l].input`
  interp       : interventions.patching.patch_sweep (run_grid with layer and position prefix reuse)

GPT-2-small shape (12 layers, d_model 768, vocab 50257), random weights (seeded), 20 tokens, one CPU
thread; "minimal" pair (2 of 20 tokens differ) and "random" pair (every token differs).

    .venv/bin/python benchmarks/patching_batched.py [--repeats 3] [--pairs random,minimal] [--skip tl,nnsight]
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402

import benchmarks.patching as per_cell  # noqa: E402  (same model, prompts, metric and timer)


def plain_batched(hf, clean, corrupted):
    """One forward per layer, T rows; last hidden state and two unembedding rows only."""
    L, T = hf.config.n_layer, clean.shape[1]
    blocks, base = hf.transformer.h, hf.transformer
    w = hf.lm_head.weight[[per_cell.TARGET, per_cell.FOIL]]
    rows = torch.arange(T)

    def run():
        with torch.no_grad():
            saved = {}
            handles = [blocks[l].register_forward_pre_hook(
                lambda m, a, kw, l=l: saved.__setitem__(l, a[0] if a else kw["hidden_states"]), with_kwargs=True)
                for l in range(L)]
            try:
                base(clean)
            finally:
                for h in handles:
                    h.remove()
            out = torch.zeros(L, T)
            batch = corrupted.expand(T, T).contiguous()
            for l in range(L):
                src = saved[l][0]

                def edit(m, a, kw, src=src):
                    x = (a[0] if a else kw["hidden_states"]).clone()
                    x[rows, rows] = src
                    if a:
                        return (x, *a[1:]), kw
                    return a, {**kw, "hidden_states": x}
                h = blocks[l].register_forward_pre_hook(edit, with_kwargs=True)
                try:
                    last = base(batch).last_hidden_state[:, -1]
                finally:
                    h.remove()
                two = last @ w.T
                out[l] = two[:, 0] - two[:, 1]
            return out
    return run


def tl_batched(bridge, clean, corrupted):
    L, T = bridge.cfg.n_layers, clean.shape[1]
    rows = torch.arange(T)

    def run():
        with torch.no_grad():
            _, cache = bridge.run_with_cache(clean)
            out = torch.zeros(L, T)
            batch = corrupted.expand(T, T).contiguous()
            for l in range(L):
                name = f"blocks.{l}.hook_resid_pre"
                src = cache[name][0]

                def hook(act, hook, src=src):
                    act[rows, rows] = src
                    return act
                logits = bridge.run_with_hooks(batch, fwd_hooks=[(name, hook)])
                out[l] = per_cell.logit_diff(logits)
            return out
    return run


def nnsight_batched(nn_model, clean, corrupted):
    L, T = len(nn_model.transformer.h), clean.shape[1]
    rows = torch.arange(T)

    def run():
        with torch.no_grad():
            saved = []
            with nn_model.trace(clean):
                for l in range(L):
                    saved.append(nn_model.transformer.h[l].input.save())
            out = torch.zeros(L, T)
            batch = corrupted.expand(T, T).contiguous()
            for l in range(L):
                src = saved[l][0]
                with nn_model.trace(batch):
                    nn_model.transformer.h[l].input[rows, rows] = src
                    val = per_cell.logit_diff(nn_model.lm_head.output).save()
                out[l] = val
            return out
    return run


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3, help="runs of every sweep (median reported)")
    ap.add_argument("--pairs", default="random,minimal", help="prompt pairs: random, minimal or both")
    ap.add_argument("--skip", default="", help="comma list of anchors to skip: plain, tl, nnsight")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    torch.set_grad_enabled(False)

    import interp

    hf = per_cell.build_model()
    lm = interp.attach(hf)
    skip = set(filter(None, args.skip.split(",")))
    anchors = {}
    if "plain" not in skip:
        anchors["plain"] = (plain_batched, hf)
    if "tl" not in skip:
        from transformer_lens.model_bridge.sources._bridge_builder import build_bridge_from_module

        anchors["tl"] = (tl_batched, build_bridge_from_module(copy.deepcopy(hf), "GPT2LMHeadModel",
                                                              hf_config=hf.config))
    if "nnsight" not in skip:
        from nnsight import NNsight

        anchors["nnsight"] = (nnsight_batched, NNsight(copy.deepcopy(hf)))
    print(f"GPT-2-small shape, random weights: {per_cell.N_LAYERS} layers, d_model {per_cell.D_MODEL}, "
          f"{per_cell.N_TOKENS} tokens, torch {torch.__version__}, CPU threads {torch.get_num_threads()}; "
          f"batched anchors (one forward per layer, T rows)")
    for pair in args.pairs.split(","):
        clean, corrupted = per_cell.prompts(pair)
        sweep = per_cell.interp_sweep(lm, clean, corrupted)
        t_i, runs_i, res = per_cell.timed(sweep, args.repeats)
        ours = res.values.cpu()
        st = res.attrs["grid"]
        print(f"\n[{pair} pair] interp: {t_i:.2f} s (runs {', '.join(f'{x:.2f}' for x in runs_i)}; "
              f"{st['forward_equivalents']:.1f} forward equivalents for {st['rows']} cells)", flush=True)
        for name, (make, obj) in anchors.items():
            t, runs, theirs = per_cell.timed(make(obj, clean, corrupted), args.repeats)
            after, _, _ = per_cell.timed(sweep, args.repeats)  # interleaved, so load changes hit both sides
            near = statistics.median([t_i, after])
            err = float((theirs.reshape(ours.shape).float() - ours).abs().max())
            if err > 1e-4:
                print(f"MISMATCH: {name} and interp differ by {err:.2e} on the {pair} pair", file=sys.stderr)
                return 1
            print(f"  {name:8s} {t:7.2f} s (runs {', '.join(f'{x:.2f}' for x in runs)})   interp around it "
                  f"{t_i:.2f} / {after:.2f} s   interp is {t / near:5.2f}x faster   max |diff| {err:.1e}", flush=True)
            t_i = after
    return 0


if __name__ == "__main__":
    sys.exit(main())
