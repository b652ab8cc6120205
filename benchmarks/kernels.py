"""Benchmark the fused patching kernels against the unfused torch sequences they replace.

    python benchmarks/kernels.py                 # CUDA if available (Triton kernels), else CPU (reference)
    python benchmarks/kernels.py --sizes small   # one size only; --dtype float32 to change the dtype
    python benchmarks/kernels.py --project-sweep # CUDA: time the projection kernel's launch configurations

Per op and size it prints: time of the public op (``interp.kernels.<op>``, input validation
included), time of the backend call alone (no validation, no host sync; CUDA only), achieved GB/s
(minimum bytes the op must move / time), that as % of the measured copy bandwidth
(``dst.copy_(src)`` of the same number of bytes), the unfused torch sequence's time and the
speed-up over it. On CPU the ops run the torch reference, which the table says.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

import interp.kernels as K  # noqa: E402

SIZES = {
    "tiny": (2, 8, 64, 8),  # smoke test only
    # name: (N, T, F, K)  -- x is [N, T, F]; K = number of (row, pos) sites edited
    "small": (8, 128, 1024, 512),
    "medium": (32, 256, 2048, 4096),
    "large": (64, 512, 4096, 16384),
}


def timer(dev):
    if dev.type == "cuda":
        def t(fn, reps):
            fn()
            torch.cuda.synchronize()
            times = []
            for _ in range(reps):
                s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                s.record()
                fn()
                e.record()
                torch.cuda.synchronize()
                times.append(s.elapsed_time(e) / 1e3)
            return statistics.median(times)
    else:
        def t(fn, reps):
            fn()
            times = []
            for _ in range(reps):
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
            return statistics.median(times)
    return t


def copy_bandwidth(nbytes, dev, tm, reps):
    n = max(nbytes // 2, 1)  # bytes read + written = 2 * buffer size
    a = torch.empty(n, dtype=torch.uint8, device=dev)
    b = torch.empty(n, dtype=torch.uint8, device=dev)
    b.fill_(1)
    t = tm(lambda: a.copy_(b), reps)
    return 2 * n / t


def cases(N, T, F, Kn, dtype, dev, gen):
    """Yield (op name, bytes moved, fused fn, backend-only fn or None, unfused fn)."""
    es = torch.tensor([], dtype=dtype).element_size()
    x = torch.randn(N, T, F, device=dev, dtype=dtype, generator=gen)
    src = torch.randn(N, T, F, device=dev, dtype=dtype, generator=gen)
    perm = torch.randperm(N * T, device=dev, generator=gen)[:Kn]
    idx = torch.stack([perm // T, perm % T], 1)
    sperm = torch.randperm(N * T, device=dev, generator=gen)[:Kn]
    sidx = torch.stack([sperm // T, sperm % T], 1)
    r, p = idx[:, 0], idx[:, 1]
    sr, sp = sidx[:, 0], sidx[:, 1]
    alpha = torch.rand(Kn, device=dev, generator=gen)
    a_col = alpha.to(dtype)[:, None]
    v = torch.randn(F, device=dev, dtype=dtype, generator=gen)
    std = torch.full((Kn,), 0.1, device=dev)
    seeds = torch.arange(Kn, device=dev, dtype=torch.int64)
    tk = None
    if K.backend(x) == "triton":
        from interp.kernels import triton as tk
    row = Kn * F * es

    def unfused_patch():
        x[r, p] = src[sr, sp]

    yield ("patch", 2 * row, lambda: K.row_patch(x, src, idx, sidx),
           (lambda: tk.row_patch(x, src, idx, sidx, None)) if tk else None, unfused_patch)

    def unfused_blend():
        x[r, p] = (1 - a_col) * x[r, p] + a_col * src[sr, sp]

    yield ("blend", 3 * row, lambda: K.row_patch(x, src, idx, sidx, alpha),
           (lambda: tk.row_patch(x, src, idx, sidx, alpha)) if tk else None, unfused_blend)

    def unfused_add():
        x[r, p] = x[r, p] + a_col * v

    yield ("add", 2 * row, lambda: K.add_scaled(x, v, idx, alpha),
           (lambda: tk.add_scaled(x, v, idx, alpha, None, False)) if tk else None, unfused_add)

    def unfused_add_rel():
        h = x[r, p]
        x[r, p] = h + a_col * v * (h.norm(dim=-1, keepdim=True) / v.norm())

    yield ("add relative", 2 * row, lambda: K.add_scaled(x, v, idx, alpha, norm="relative"),
           (lambda: tk.add_scaled(x, v, idx, alpha, "relative", False)) if tk else None, unfused_add_rel)

    def unfused_noise():  # gather, randn, add, index_put
        h = x[r, p]
        x[r, p] = h + 0.1 * torch.randn(h.shape, device=dev, dtype=dtype)

    yield ("noise+patch", 2 * row, lambda: K.noise(x, idx, std, seeds),
           (lambda: tk.noise(x, idx, std, seeds)) if tk else None, unfused_noise)

    for rank in (16, 64):
        L = torch.randn(F, rank, device=dev, dtype=dtype, generator=gen) / F**0.5
        R = torch.randn(rank, F, device=dev, dtype=dtype, generator=gen) / F**0.5
        mu = torch.randn(F, device=dev, dtype=dtype, generator=gen)

        def unfused_project(L=L, R=R, mu=mu):  # sub, two matmuls, sub
            x.sub_(((x - mu) @ R.T) @ L.T)

        yield (f"project k={rank}", 2 * x.numel() * es, (lambda L=L, R=R, mu=mu: K.project(x, L, R, mu)),
               (lambda L=L, R=R, mu=mu: tk.project(x, L, R, mu, None)) if tk else None, unfused_project)


def check_against_reference(dev, dtype):
    """On CUDA: each Triton op against the torch reference on a small case (max relative error)."""
    gen = torch.Generator(device=dev).manual_seed(1)
    N, T, F, Kn = 4, 16, 96, 24
    x = torch.randn(N, T, F, device=dev, dtype=dtype, generator=gen)
    src = torch.randn(N, T, F, device=dev, dtype=dtype, generator=gen)
    idx = torch.stack([torch.randint(0, N, (Kn,), device=dev, generator=gen),
                       torch.randint(0, T, (Kn,), device=dev, generator=gen)], 1)
    alpha = torch.rand(Kn, device=dev, generator=gen)
    v = torch.randn(F, device=dev, dtype=dtype, generator=gen)
    L = torch.randn(F, 8, device=dev, generator=gen) / F**0.5
    R = torch.randn(8, F, device=dev, generator=gen) / F**0.5
    seeds = torch.arange(Kn, device=dev) * 7919
    ops = {
        "patch": lambda y: K.row_patch(y, src, idx, idx.flip(0)),
        "blend": lambda y: K.row_patch(y, src, idx, idx.flip(0), alpha),
        "add relative+renorm": lambda y: K.add_scaled(y, v, idx, alpha, norm="relative", renorm=True),
        "noise": lambda y: K.noise(y, idx, 0.5, seeds),
        "project": lambda y: K.project(y, L, R, None, idx),
    }
    old = os.environ.get("INTERP_KERNELS")
    worst = 0.0
    try:
        for name, fn in ops.items():
            out = {}
            for be in ("triton", "torch"):
                os.environ["INTERP_KERNELS"] = be
                out[be] = fn(x.clone()).double()
            err = ((out["triton"] - out["torch"]).abs().max() / out["torch"].abs().max()).item()
            worst = max(worst, err)
            print(f"check {name:<20} triton vs reference: max rel err {err:.2e}")
    finally:
        if old is None:
            os.environ.pop("INTERP_KERNELS", None)
        else:
            os.environ["INTERP_KERNELS"] = old
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    print(f"check: {'OK' if worst < tol else 'FAILED'} (tolerance {tol:g})\n")


def project_sweep(dev, tm, reps):
    """Time interp.kernels.triton.project over launch configurations (large size, k = 16 and 64), with each
    configuration's error against the torch reference; the unfused sequence's time for comparison."""
    from interp.kernels import reference as ref
    from interp.kernels import triton as tk

    N, T, F, _ = SIZES["large"]
    gen = torch.Generator(device=dev).manual_seed(0)
    print(
        f"projection sweep, x [{N}, {T}, {F}], every row; ms = median of {reps}; "
        "err = max |op - reference| / max |reference|"
    )
    print(
        f"{'dtype':<9} {'k':>3} {'BLOCK_M':>7} {'BLOCK_F':>7} {'warps':>5} {'half dot':>8} {'ms':>8} {'err':>9} "
        f"{'unfused ms':>10}"
    )
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        x0 = torch.randn(N, T, F, device=dev, dtype=dtype, generator=gen)
        for rank in (16, 64):
            L = torch.randn(F, rank, device=dev, generator=gen) / F**0.5
            R = torch.randn(rank, F, device=dev, generator=gen) / F**0.5
            mu = torch.randn(F, device=dev, generator=gen)
            want = ref.project(x0.clone(), L, R, mu).double()
            Lh, Rh, muh = L.to(dtype), R.to(dtype), mu.to(dtype)
            x = x0.clone()
            t_u = tm(lambda x=x, muh=muh, Rh=Rh, Lh=Lh: x.sub_(((x - muh) @ Rh.T) @ Lh.T), reps)
            halves = (False, True) if dtype != torch.float32 else (False,)
            for bm, bf, nw in ((16, 64, 4), (16, 128, 4), (32, 64, 4), (32, 128, 4), (64, 64, 8), (64, 128, 8)):
                for half in halves:
                    tk.PROJECT_CONFIG.update(BLOCK_M=bm, BLOCK_F=bf, num_warps=nw, HALF_DOT=half)
                    try:
                        got = tk.project(x0.clone(), L, R, mu).double()
                        err = ((got - want).abs().max() / want.abs().max()).item()
                        t = tm(lambda x=x, L=L, R=R, mu=mu: tk.project(x, L, R, mu), reps)
                        print(f"{str(dtype)[6:]:<9} {rank:>3} {bm:>7} {bf:>7} {nw:>5} {str(half):>8} {t * 1e3:8.3f} "
                              f"{err:9.2e} {t_u * 1e3:10.3f}", flush=True)
                    except Exception as e:  # noqa: BLE001 - a configuration that does not compile is reported
                        print(f"{str(dtype)[6:]:<9} {rank:>3} {bm:>7} {bf:>7} {nw:>5} {str(half):>8} failed: "
                              f"{type(e).__name__}: {str(e)[:120]}", flush=True)
                    finally:
                        tk.PROJECT_CONFIG.clear()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default=None, help="comma list of " + ",".join(SIZES))
    ap.add_argument("--dtype", default=None, help="float16 (CUDA default), bfloat16, float32 (CPU default)")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--project-sweep", action="store_true", help="CUDA: time the projection kernel's configurations")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    cuda = torch.cuda.is_available()
    dev = torch.device("cuda" if cuda else "cpu")
    dtype = getattr(torch, args.dtype or ("float16" if cuda else "float32"))
    sizes = (args.sizes or ("small,medium,large" if cuda else "small,medium")).split(",")
    reps = args.reps or (50 if cuda else 5)
    tm = timer(dev)
    if args.project_sweep:
        if not cuda:
            raise SystemExit("--project-sweep times the Triton kernel on a GPU; no CUDA device here")
        return project_sweep(dev, tm, args.reps or 20)
    probe = torch.empty(1, device=dev, dtype=dtype)
    be = K.backend(probe)
    if cuda:
        print(f"device: {torch.cuda.get_device_name(dev)} (CUDA), backend: {be}, dtype: {dtype}")
    else:
        what = ("the Triton kernels in Triton's CPU INTERPRETER (timings say nothing about GPU speed)"
                if be == "triton" else "the torch REFERENCE, not the Triton kernels")
        print(f"device: CPU ({torch.get_num_threads()} threads) -- no CUDA device: the ops run {what} "
              f"(backend: {be}); dtype: {dtype}")
    print(f"torch {torch.__version__}; median of {reps} reps; GB/s = minimum bytes moved / op time\n")
    if be == "triton":
        check_against_reference(dev, dtype)
    gen = torch.Generator(device=dev).manual_seed(0)
    hdr = (f"{'op':<14} {'size (N,T,F,K)':<24} {'op ms':>9} {'GB/s':>8} {'% copy':>7} {'kernel ms':>10} "
           f"{'k % copy':>8} {'unfused ms':>11} {'speed-up':>9}")
    print(hdr)
    print("-" * len(hdr))
    for name in sizes:
        N, T, F, Kn = SIZES[name]
        bw_cache = {}
        for op, nbytes, fused, kernel_only, unfused in cases(N, T, F, Kn, dtype, dev, gen):
            if nbytes not in bw_cache:
                bw_cache[nbytes] = copy_bandwidth(nbytes, dev, tm, reps)
            bw = bw_cache[nbytes]
            t_f = tm(fused, reps)
            t_k = tm(kernel_only, reps) if kernel_only else None
            t_u = tm(unfused, reps)
            kms = f"{t_k * 1e3:10.3f}" if t_k else f"{'-':>10}"
            kpc = f"{100 * nbytes / t_k / bw:7.1f}%" if t_k else f"{'-':>8}"
            print(f"{op:<14} {str((N, T, F, Kn)):<24} {t_f * 1e3:9.3f} {nbytes / t_f / 1e9:8.1f} "
                  f"{100 * nbytes / t_f / bw:6.1f}% {kms} {kpc} {t_u * 1e3:11.3f} {t_u / t_f:8.2f}x")
        print("copy bandwidth (dst.copy_(src), same bytes): " + ", ".join(
            f"{nb / 1e6:.0f} MB -> {bw / 1e9:.1f} GB/s" for nb, bw in sorted(bw_cache.items())))
        print()
    print("op ms: public interp.kernels op (validation incl.); kernel ms: backend call alone (CUDA only); "
          "speed-up: unfused / op")


if __name__ == "__main__":
    main()
