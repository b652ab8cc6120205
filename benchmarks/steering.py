"""Generation speed on SmolLM2 with and without a steering op (goal: <= 5% overhead).

Greedy HF `generate` (KV cache) of N new tokens, three ways, interleaved run by run so that load on
a shared machine hits all of them alike: plain; interp (`SteeringVector.apply`, an active
norm-relative Add at every generated position, through `lm.applied`); a bare torch forward hook
doing the same addition (the least any implementation can do). Medians of --repeats runs.

    .venv/bin/python benchmarks/steering.py --tokens 32 --repeats 5
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--layer", type=int, default=8)
    ap.add_argument("--alpha", type=float, default=0.3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.set_grad_enabled(False)

    import interp
    from interp.zoo import load
    from interventions.steering import SteeringVector

    model = load("smollm2")
    lm = interp.attach(model)
    tok = model.tokenizer
    enc = tok("I think this movie is", return_tensors="pt")
    P = enc["input_ids"].shape[1]
    v = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    sv = SteeringVector(v, f"blocks.{args.layer}.resid_post", model="smollm2")
    kw = dict(max_new_tokens=args.tokens, min_new_tokens=args.tokens, do_sample=False, pad_token_id=tok.eos_token_id)

    def plain():
        return model.generate(**enc, **kw)

    def steered():
        with sv.apply(lm, args.alpha, pos="generated"):
            return model.generate(**enc, **kw)

    def raw_hook():  # the peer: one bare forward hook, norm-relative add on positions >= P
        block = model.model.layers[args.layer]
        seen = {"n": 0}

        def hook(mod, inp, out):
            h = out[0] if isinstance(out, tuple) else out
            start = max(P - seen["n"], 0)
            seen["n"] += h.shape[1]
            if start >= h.shape[1]:
                return None
            h = h.clone()
            sel = h[:, start:]
            h[:, start:] = sel + args.alpha * v * sel.norm(dim=-1, keepdim=True) / v.norm()
            return (h, *out[1:]) if isinstance(out, tuple) else h

        handle = block.register_forward_hook(hook)
        try:
            return model.generate(**enc, **kw)
        finally:
            handle.remove()

    ways = {"plain HF generate": plain, "interp steering (apply)": steered, "bare torch hook": raw_hook}
    out = {name: f() for name, f in ways.items()}  # warm-up, and the outputs to compare
    assert torch.equal(out["interp steering (apply)"], out["bare torch hook"]), "interp and the bare hook disagree"
    wall = {name: [] for name in ways}
    cpu = {name: [] for name in ways}  # process CPU time: less sensitive to other jobs on a shared machine
    for _ in range(args.repeats):
        for name, f in ways.items():
            t, c = time.perf_counter(), time.process_time()
            f()
            wall[name].append(time.perf_counter() - t)
            cpu[name].append(time.process_time() - c)
    print(f"SmolLM2 greedy generate, {args.tokens} new tokens after {P} prompt tokens, 1 thread, "
          f"median of {args.repeats} (interleaved)")
    for label, times in (("wall", wall), ("cpu", cpu)):
        base = statistics.median(times["plain HF generate"])
        for name, ts in times.items():
            med = statistics.median(ts)
            print(f"  {label:4s} {name:26s} {args.tokens / med:7.2f} tok/s   {med:6.3f} s   x{med / base:.3f} of plain "
                  f"(min {min(ts):.3f}, max {max(ts):.3f})")
        over = statistics.median(times["interp steering (apply)"]) / base - 1
        print(f"  {label:4s} interp steering overhead vs plain: {100 * over:+.1f}% (goal <= 5%)")


if __name__ == "__main__":
    main()
