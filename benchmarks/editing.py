"""One ROME edit on SmolLM2 on CPU once key statistics are cached, and the engine's cost in the value loop.

1. Wall time of `edit(lm, [fact], "rome", [6])` with cached statistics and context templates: value
   optimisation (forward + backward through the engine, Replace op at the MLP output) and the closed-form
   solve (keys, C^-1, rank-one update), medians of --runs.
2. One value-optimisation step (forward + backward of the same batch) through the engine vs a bare torch
   forward hook on the MLP doing the same addition, interleaved run by run, medians and their ratio.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/editing.py --runs 3 --steps 5
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch


def _step_engine(lm, batch, op):
    out = lm.run(batch, ops=[op], grad=True).logits
    out[:, -1].float().logsumexp(-1).sum().backward()


def _step_torch(model, batch, mlp, onehot, delta):
    h = mlp.register_forward_hook(lambda m, i, o: o + onehot[..., None] * delta)
    try:
        out = model(**batch, use_cache=False).logits
        out[:, -1].float().logsumexp(-1).sum().backward()
    finally:
        h.remove()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--steps", type=int, default=5, help="value steps timed per side in part 2")
    ap.add_argument("--layer", type=int, default=6)
    args = ap.parse_args()
    torch.set_num_threads(1)

    import interp
    from interp import Replace
    from interventions.editing import Fact, ValueConfig, down_proj, edit, key_stats, prefixes
    from interventions.editing.solver import _pad_id, _value_batch, batch_ids, frozen

    lm = interp.attach(interp.zoo.load("smollm2"))
    t = time.perf_counter()
    stats = key_stats(lm, [down_proj(lm, args.layer)], progress=False)
    t_stats = time.perf_counter() - t
    if not stats[args.layer].record.get("cached"):
        print("(statistics were not cached: this run computed them; run again for the cached timing)")
    context = prefixes(lm, n=1)
    fact = Fact("The {} is located in the city of", "Eiffel Tower", " Rome")
    edits = []
    for _ in range(args.runs):
        t = time.perf_counter()
        e = edit(lm, [fact], "rome", [args.layer], stats=stats, context=context, value_cfg=ValueConfig(steps=15),
                 progress=False)
        edits.append({"total": time.perf_counter() - t, **e.info["seconds"],
                      "value_steps": e.info["values"][0]["steps"]})
    seqs, owner, sub, _, _ = _value_batch(lm.tokenizer, [fact], context, "{} is a")
    batch = batch_ids(seqs, _pad_id(lm.tokenizer))
    onehot = torch.zeros(batch["input_ids"].shape)
    onehot[torch.arange(len(sub)), torch.tensor(sub)] = 1.0
    delta = torch.zeros(lm.model.config.hidden_size, requires_grad=True)
    op = Replace(f"blocks.{args.layer}.mlp.out", fn=lambda s: s + onehot[..., None] * delta)
    mlp = lm.model.model.layers[args.layer].mlp
    eng, plain = [], []
    with frozen(lm.model):
        for _ in range(args.steps):
            t = time.perf_counter()
            _step_engine(lm, batch, op)
            eng.append(time.perf_counter() - t)
            t = time.perf_counter()
            _step_torch(lm.model, batch, mlp, onehot, delta)
            plain.append(time.perf_counter() - t)
    med = {k: statistics.median(r[k] for r in edits) for k in edits[0]}
    out = {"rome_edit_seconds_median": med, "runs": edits, "stats_load_seconds": t_stats,
           "value_step_engine_s": statistics.median(eng), "value_step_torch_hook_s": statistics.median(plain),
           "engine_over_torch": statistics.median(eng) / statistics.median(plain),
           "batch": list(batch["input_ids"].shape), "load_average": os.getloadavg(), "threads": 1}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
