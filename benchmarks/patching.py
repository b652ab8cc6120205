"""Residual-stream patching sweep: TransformerLens vs nnsight vs interp, on the same weights.

GPT-2-small shape (12 layers, d_model 768, vocab 50257), random weights (seeded), 20 tokens, one
CPU thread. Every (layer, position) of `resid_pre` is patched from the clean run into the
corrupted run and the logit difference at the last position is recorded.

  TransformerLens : transformer_lens.patching.get_act_patch_resid_pre on a TransformerBridge
  nnsight         : one `model.trace` per (layer, position) cell
  interp          : interventions.patching.patch_sweep (run_grid: layer + position prefix reuse,
                    last-position logits, exact skip of cells whose clean and corrupted values are equal;
                    its metric is interp.metrics.logit_diff, which declares the two vocabulary columns it
                    reads, so the head computes 2 logits per cell instead of 50257)

Two prompt pairs: "minimal" (the corrupted prompt differs from the clean one in 2 of 20 tokens,
as in IOI-style patching) and "random" (every token differs; no cell can be skipped).
Prints each time (median of --repeats runs), the ratios, and checks that the sweeps agree to 1e-4.

    .venv/bin/python benchmarks/patching.py [--repeats 3] [--peer-repeats 1] [--pairs minimal,random]
    python benchmarks/patching.py --device cuda --skip tl [--tokens 64]     # on a GPU (fp32, TF32 off)
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import os  # noqa: E402

os.environ.setdefault("TQDM_DISABLE", "1")  # the peers' progress bars would flood the table

import torch  # noqa: E402

N_LAYERS, D_MODEL, N_TOKENS, VOCAB = 12, 768, 20, 50257


def build_model():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=N_LAYERS, n_embd=D_MODEL, n_head=12, vocab_size=VOCAB, n_positions=max(64, N_TOKENS))
    return GPT2LMHeadModel(cfg).eval()


def prompts(kind: str):
    g = torch.Generator().manual_seed(1)  # N_TOKENS may be changed by --tokens
    clean = torch.randint(0, VOCAB, (1, N_TOKENS), generator=g)
    if kind == "minimal":
        corrupted = clean.clone()
        corrupted[0, [4, 9]] = torch.randint(0, VOCAB, (2,), generator=g)
    elif kind == "random":
        corrupted = torch.randint(0, VOCAB, (1, N_TOKENS), generator=g)
    else:
        raise ValueError(f"unknown prompt pair {kind!r}: choose 'minimal' or 'random'")
    return clean, corrupted


TARGET, FOIL = 11, 22


def logit_diff(logits):
    last = logits[:, -1].float()
    return last[:, TARGET] - last[:, FOIL]


def timed(fn, repeats: int):
    times, out = [], None
    sync = torch.cuda.synchronize if torch.cuda.is_initialized() else (lambda: None)
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        out = fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times, out


def tl_sweep(bridge, clean, corrupted):
    from transformer_lens.patching import get_act_patch_resid_pre

    def run():
        with torch.no_grad():
            _, cache = bridge.run_with_cache(clean)
            return get_act_patch_resid_pre(bridge, corrupted, cache, lambda lg: logit_diff(lg).mean())
    return run


def nnsight_sweep(nn_model, clean, corrupted):
    def run():
        with torch.no_grad():
            saved = []
            with nn_model.trace(clean):
                for l in range(N_LAYERS):
                    saved.append(nn_model.transformer.h[l].input.save())
            out = torch.zeros(N_LAYERS, N_TOKENS)
            for l in range(N_LAYERS):
                src = saved[l]
                for p in range(N_TOKENS):
                    with nn_model.trace(corrupted):
                        nn_model.transformer.h[l].input[:, p] = src[:, p]
                        val = logit_diff(nn_model.lm_head.output).save()
                    out[l, p] = float(val.mean())
            return out
    return run


def interp_sweep(lm, clean, corrupted):
    from interp.metrics import logit_diff as column_logit_diff
    from interventions.patching import patch_sweep

    metric = column_logit_diff(TARGET, FOIL)  # the same function as logit_diff, declaring the 2 columns it reads

    def run():
        res = patch_sweep(lm, clean, corrupted, "resid_pre", metric=metric, normalize=False, progress=False)
        return res
    return run


def main(argv=None) -> int:
    global N_TOKENS
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3, help="runs of interp's sweep (median reported)")
    ap.add_argument("--peer-repeats", type=int, default=1, help="runs of each peer's sweep (median reported)")
    ap.add_argument("--pairs", default="minimal,random", help="prompt pairs: minimal, random or both")
    ap.add_argument("--skip", default="", help="comma list of peers to skip: tl, nnsight")
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    ap.add_argument("--tokens", type=int, default=N_TOKENS, help=f"prompt length (default {N_TOKENS})")
    args = ap.parse_args(argv)
    N_TOKENS = args.tokens
    torch.set_num_threads(1)
    torch.set_grad_enabled(False)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 on both sides, so the sweeps agree to 1e-4

    import interp

    hf = build_model().to(device)
    lm = interp.attach(hf)
    skip = set(filter(None, args.skip.split(",")))
    bridge = nn_model = None
    if "tl" not in skip:
        from transformer_lens.model_bridge.sources._bridge_builder import build_bridge_from_module

        bridge = build_bridge_from_module(copy.deepcopy(hf), "GPT2LMHeadModel", hf_config=hf.config)
    if "nnsight" not in skip:
        from nnsight import NNsight

        nn_model = NNsight(copy.deepcopy(hf))
    where = (torch.cuda.get_device_name(device) if device.type == "cuda"
             else f"CPU, threads {torch.get_num_threads()}")
    print(f"GPT-2-small shape, random weights: {N_LAYERS} layers, d_model {D_MODEL}, {N_TOKENS} tokens, "
          f"torch {torch.__version__}, {where}")
    rows = []
    for pair in args.pairs.split(","):
        clean, corrupted = (p.to(device) for p in prompts(pair))
        # interp runs are interleaved with the peers' (before, between, after), so a change in machine
        # load during the long peer runs affects both sides; ratios use interp's runs around each peer
        sweep = interp_sweep(lm, clean, corrupted)
        t_i, all_i, res = timed(sweep, args.repeats)
        ours = res.values.cpu()
        line = {"pair": pair, "interp_runs": list(all_i), "stats": res.attrs["grid"]}
        st = line["stats"]
        print(f"\n[{pair} pair] interp: {t_i:.2f} s (runs {', '.join(f'{x:.2f}' for x in all_i)}; "
              f"{st['forward_equivalents']:.1f} forward equivalents for {st['rows']} cells, "
              f"{st.get('skipped_cells', 0)} cells skipped as exact no-ops)", flush=True)
        for name, make, obj in (("tl", tl_sweep, bridge), ("nnsight", nnsight_sweep, nn_model)):
            if obj is None:
                continue
            t, all_t, theirs = timed(make(obj, clean, corrupted), args.peer_repeats)
            after, _, _ = timed(sweep, args.repeats)
            line["interp_runs"].append(after)
            near = statistics.median([t_i, after])
            theirs = theirs.reshape(ours.shape).float().cpu()
            err = float((theirs - ours).abs().max())
            line[name], line[name + "_runs"], line[name + "_err"] = t, all_t, err
            if err > 1e-4:
                print(f"MISMATCH: {name} and interp differ by {err:.2e} on the {pair} pair", file=sys.stderr)
                return 1
            print(f"  {name:8s} {t:7.2f} s (runs {', '.join(f'{x:.2f}' for x in all_t)})   interp around it "
                  f"{t_i:.2f} / {after:.2f} s   interp is {t / near:5.1f}x faster   max |diff| {err:.1e}", flush=True)
            t_i = after
        rows.append(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
