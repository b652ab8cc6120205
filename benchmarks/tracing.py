"""Causal tracing on SmolLM2: interp's `trace` against the per-cell plain-hook loop a user would write.

ROME's setting: the subject's embeddings get Gaussian noise (3 x the embedding std), 10 noise draws
held in one batch, and one clean state is restored per cell: single hidden states (resid_post of
every layer x token) and windows of 10 MLP / attention outputs centred on each layer x token,
so 3 x 30 layers x T tokens cells. The plain loop runs one forward (batch 10) per cell with two
torch hooks: one replacing the embedding output by the same corrupted embeddings interp used
(captured from interp's corrupted run, so both sides see identical noise), one writing the clean
state at the cell's position into each restored module's output. Both sides agree to 1e-5.

    .venv/bin/python benchmarks/tracing.py [--repeats 1] [--layers 30] [--kinds hidden,mlp,attn]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402

PROMPT, SUBJECT, TARGET = "The Eiffel Tower is located in the city of", "Eiffel Tower", " Paris"
SITE = {"hidden": "resid_post", "mlp": "mlp.out", "attn": "attn.out"}


def _replace_slot(out, slot: int, fn):
    if isinstance(out, tuple):
        return (*out[:slot], fn(out[slot]), *out[slot + 1:])
    return fn(out)


def plain_loop(lm, noisy: torch.Tensor, kinds, layers, window: int):
    """One forward per cell; values [n_kinds * len(layers) * T] of p(target) minus p_corrupted."""
    from interventions.patching import layer_window

    model, L = lm.model, lm.n_layers
    ids = lm.adapter.prepare([PROMPT] * noisy.shape[0]).kwargs["input_ids"]
    T = ids.shape[1]
    tid = lm.tokenizer.encode(TARGET, add_special_tokens=False)[0]
    names = {f"blocks.{l}.{SITE[k]}" for k in kinds for l in range(L)}
    clean = lm.run(PROMPT, capture=sorted(names)).cache
    embed = model.get_submodule(lm.site("embed").module)

    def run_cell(restore: list[str], p: int) -> float:
        handles = [embed.register_forward_hook(lambda m, a, out: noisy)]
        for name in restore:
            site = lm.site(name)

            def put(m, a, out, src=clean[name], slot=site.slot):
                def edit(x):
                    x = x.clone()
                    x[:, p] = src[0, p]
                    return x
                return _replace_slot(out, slot, edit)
            handles.append(model.get_submodule(site.module).register_forward_hook(put))
        try:
            logits = model(input_ids=ids).logits[:, -1].float()
        finally:
            for h in handles:
                h.remove()
        return float(logits.softmax(-1)[:, tid].mean())

    with torch.no_grad():
        values = []
        for k in kinds:
            for l in layers:
                win = [l] if k == "hidden" else layer_window(l, window, L)
                for p in range(T):
                    values.append(run_cell([f"blocks.{j}.{SITE[k]}" for j in win], p))
    return torch.tensor(values)


def interp_trace(lm, kinds, layers):
    from interventions.tracing import trace

    t = trace(lm, PROMPT, SUBJECT, TARGET, kinds=kinds, layers=layers, samples=10, progress=False)
    return torch.cat([t[k].values.reshape(-1) for k in kinds]) + t.p_corrupted, t


def corrupted_embed(lm, tr):
    """The corrupted embeddings of interp's base run (same seed and std as the trace)."""
    from interp import Noise, at

    subj = tr.subject_positions
    op = Noise("embed", std=tr["hidden"].attrs["noise_std"], seed=tr["hidden"].attrs["seed"], where=at(pos=subj))
    return lm.run([PROMPT] * tr["hidden"].attrs["samples"], ops=[op], capture="blocks.0.resid_pre").cache[
        "blocks.0.resid_pre"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=1, help="runs of each side (median reported)")
    ap.add_argument("--layers", type=int, default=30, help="trace the first N layers (default all 30)")
    ap.add_argument("--kinds", default="hidden,mlp,attn")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    torch.set_grad_enabled(False)

    import interp

    lm = interp.attach(interp.zoo.load("smollm2"))
    kinds, layers = args.kinds.split(","), list(range(args.layers))
    times_i, times_p = [], []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        ours, tr = interp_trace(lm, kinds, layers)
        times_i.append(time.perf_counter() - t0)
        noisy = corrupted_embed(lm, tr)
        t0 = time.perf_counter()
        theirs = plain_loop(lm, noisy, kinds, layers, window=10)
        times_p.append(time.perf_counter() - t0)
    err = float((ours - theirs).abs().max())
    ti, tp = statistics.median(times_i), statistics.median(times_p)
    print(f"SmolLM2 causal tracing, {len(kinds)} kinds x {len(layers)} layers x {tr['hidden'].shape[1]} tokens, "
          f"10 samples, torch {torch.__version__}, CPU threads {torch.get_num_threads()}")
    print(f"  per-cell plain-hook loop {tp:7.1f} s (runs {', '.join(f'{x:.1f}' for x in times_p)})")
    print(f"  interp trace             {ti:7.1f} s (runs {', '.join(f'{x:.1f}' for x in times_i)}; "
          f"{tr.stats.get('forward_equivalents', float('nan')):.1f} forward equivalents)")
    print(f"  interp is {tp / ti:.1f}x faster; max |diff| {err:.1e}")
    if err > 1e-5:
        print(f"MISMATCH: the plain loop and interp differ by {err:.2e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
