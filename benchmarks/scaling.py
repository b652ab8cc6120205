"""A patch sweep in 1 process and split over N processes (torchrun, gloo on CPU), on the same machine.

Model: SmolLM2-135M (30 layers) from the zoo, or --tiny (a 4-layer random Llama). Sweep:
interventions.patching.patch_sweep over every (layer, position) of `resid_pre`, clean "The Eiffel
Tower is located in the city of" -> corrupted "The Colosseum is located in the city of", logit
difference ' Paris' - ' Rome'. Each process uses one thread. Times are medians of --repeats sweeps
after one warm-up sweep (model loading and process start-up are not included; they are printed
separately). Also measured: the fixed part every rank repeats (base run, replay checks, planning),
by running the sweep with every chunk left to another rank. The N-process result is checked to be
equal bit for bit to the 1-process result.

    .venv/bin/python benchmarks/scaling.py [--nproc 2] [--repeats 3] [--tiny] [--chunk-rows K]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402

CLEAN = "The Eiffel Tower is located in the city of"
CORRUPT = "The Colosseum is located in the city of"


def load(tiny: bool):
    import interp

    if not tiny:
        return interp.attach(interp.zoo.load("smollm2"))
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(num_hidden_layers=4, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=49152, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg).eval()
    from transformers import AutoTokenizer

    from interp.zoo import smollm2

    # the tokenizer files sit beside the cached SmolLM2 weights (run once without --tiny first)
    model.tokenizer = AutoTokenizer.from_pretrained(str(smollm2.cache_dir()))
    return interp.attach(model)


def sweep(lm, chunk_rows, **kw):
    from interp.metrics import logit_diff, token_id
    from interventions.patching import patch_sweep

    metric = logit_diff(token_id(lm.tokenizer, " Paris"), token_id(lm.tokenizer, " Rome"))
    if chunk_rows:
        kw["chunk_rows"] = chunk_rows
    return patch_sweep(lm, CLEAN, CORRUPT, "resid_pre", metric=metric, progress=False, **kw)


class _Nothing:
    """A chunk hook that leaves every chunk to another rank: what remains is the per-rank fixed part."""

    def before(self, rows):
        return None

    def after(self, rows, values):
        pass


def fixed_part(lm, chunk_rows) -> float:
    """CPU seconds of the sweep with every chunk left to another rank."""
    eng = lm.engine
    orig = eng.run_grid

    def hooked(*a, **k):
        return orig(*a, chunk_hook=_Nothing(), **k)
    eng.run_grid = hooked
    try:
        c = time.process_time()
        sweep(lm, chunk_rows, distributed=False)
        return time.process_time() - c
    finally:
        eng.run_grid = orig


def worker(args) -> None:
    """One rank under torchrun."""
    import interp.distributed as D

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    rank, world = D.init()
    lm = load(args.tiny)
    loaded = time.perf_counter() - t0
    sweep(lm, args.chunk_rows)  # warm-up (replay validation is cached per engine)
    times, cpus = [], []
    for _ in range(args.repeats):
        D._dist().barrier()
        t, c = time.perf_counter(), time.process_time()
        res = sweep(lm, args.chunk_rows)
        c = time.process_time() - c
        D._dist().barrier()
        times.append(time.perf_counter() - t)
        per_rank = [None] * world
        D._dist().all_gather_object(per_rank, c)
        cpus.append(per_rank)
    if rank == 0:
        res.save(Path(args.out) / "result")
        (Path(args.out) / "times.json").write_text(json.dumps(
            {"times": times, "cpu": cpus, "load_s": loaded, "stats": res.attrs["grid"]}, default=str))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--chunk-rows", type=int, default=None)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)

    from interp import Result

    torch.set_num_threads(1)
    t = time.perf_counter()
    lm = load(args.tiny)
    load_s = time.perf_counter() - t
    ref = sweep(lm, args.chunk_rows, distributed=False)
    one, one_cpu = [], []
    for _ in range(args.repeats):
        t, c = time.perf_counter(), time.process_time()
        sweep(lm, args.chunk_rows, distributed=False)
        one.append(time.perf_counter() - t)
        one_cpu.append(time.process_time() - c)
    fixed = statistics.median(fixed_part(lm, args.chunk_rows) for _ in range(args.repeats))
    # what splitting by hand would give: halves of the layers, or of the positions, as separate sweeps
    half, T = lm.n_layers // 2, ref.values.shape[1]
    by_layer = torch.cat([sweep(lm, args.chunk_rows, distributed=False, layers=range(half)).values,
                          sweep(lm, args.chunk_rows, distributed=False, layers=range(half, lm.n_layers)).values])
    by_pos = torch.cat([sweep(lm, args.chunk_rows, distributed=False, positions=range(T // 2)).values,
                        sweep(lm, args.chunk_rows, distributed=False, positions=range(T // 2, T)).values], 1)
    by_hand = {"layers": by_layer, "positions": by_pos}
    g = ref.attrs["grid"]

    out = tempfile.mkdtemp(prefix="interp-scaling-")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(args.nproc),
           __file__, "--worker", "--out", out, "--repeats", str(args.repeats)]
    cmd += ["--tiny"] * args.tiny + (["--chunk-rows", str(args.chunk_rows)] if args.chunk_rows else [])
    t = time.perf_counter()
    run = subprocess.run(cmd, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True)
    launch_s = time.perf_counter() - t
    if run.returncode:
        sys.exit(f"torchrun failed:\n{run.stdout[-2000:]}\n{run.stderr[-4000:]}")
    info = json.loads((Path(out) / "times.json").read_text())
    many = info["times"]
    same = torch.equal(Result.load(Path(out) / "result").values, ref.values)

    t1, tn = statistics.median(one), statistics.median(many)
    c1 = statistics.median(one_cpu)
    crit = statistics.median(max(r) for r in info["cpu"])
    n = args.nproc
    print(
        f"model: {'tiny 4-layer Llama' if args.tiny else 'SmolLM2-135M'}; sweep: resid_pre, "
        f"{ref.values.numel()} cells, {g['rows'] - g['skipped_cells']} rows run, {g['skipped_cells']} cells skipped "
        f"(equal values); chunk_rows={args.chunk_rows or 'default'}; "
        f"threads per process: 1; cpus: {os.cpu_count()}; load avg: {os.getloadavg()[0]:.1f}"
    )
    print(f"wall  1 process : {t1:7.2f} s  (median of {args.repeats}; {', '.join(f'{x:.2f}' for x in one)})")
    print(f"wall  {n} processes: {tn:7.2f} s  (median of {args.repeats}; {', '.join(f'{x:.2f}' for x in many)})"
          f"   wall speed-up {t1 / tn:.2f}x (this machine's {os.cpu_count()} cores are shared)")
    print(f"CPU   1 process : {c1:7.2f} s  (median; {', '.join(f'{x:.2f}' for x in one_cpu)})")
    print(
        f"CPU   {n} processes: per rank "
        f"{', '.join('[' + ', '.join(f'{x:.2f}' for x in r) + ']' for r in info['cpu'])} s; "
        f"critical path (slowest rank, median) {crit:.2f} s"
    )
    print(f"speed-up with a core per process (CPU time / critical path): {c1 / crit:.2f}x; fixed part per rank "
          f"(base run, checks, plan): {fixed:.2f} CPU s = {fixed / c1:.0%} of 1 process")
    print(f"bit-for-bit equal to 1 process: {same}")
    for what, v in by_hand.items():
        print(
            f"split by hand into two sweeps over halves of the {what}: {int((v != ref.values).sum())} of "
            f"{ref.values.numel()} cells differ from the one-sweep result "
            f"(max |diff| {float((v - ref.values).abs().max()):.2e})"
        )
    print(f"model load: {load_s:.1f} s here; torchrun launch incl. load and all sweeps: {launch_s:.1f} s")
    for k in (2, 4, 8, 16):
        print(f"projection, {k:2d} workers with a device each (Amdahl, measured fixed part): "
              f"{c1 / (fixed + (c1 - fixed) / k):.2f}x")


if __name__ == "__main__":
    main()
