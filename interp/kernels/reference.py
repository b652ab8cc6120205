"""Torch reference implementations of the fused patching kernels.

These functions define the semantics; ``interp.kernels.triton`` must agree with them. They run on
any device. Inputs are assumed validated by the dispatch layer (``interp.kernels``): index tensors
are int64 on the tensor's device and in range, alpha/std are fp32 tensors of shape [K].

Semantics shared by all ops
---------------------------
* All ops work in place on their first argument and return it.
* Arithmetic is done in fp32 (fp64 for fp64 tensors) and stored in the tensor's dtype.
* ``row_patch`` / ``head_patch`` / ``project`` treat the index set as a set of *destinations*:
  every read happens before any write, and when a destination is listed more than once the
  *last* entry wins (for ``project`` all duplicates are the same operation, so it is applied once).
* ``add_scaled`` and ``noise`` accumulate: a position listed several times receives the updates of
  all its entries, applied one after the other in index order (like a python loop over K), in
  fp32, and is rounded to the tensor's dtype once at the end.
"""

from __future__ import annotations

import torch

# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def entries(a, K: int, ref: torch.Tensor) -> torch.Tensor:
    """A per-entry value (a python float for every entry, or a tensor [K]) as the tensor [K] these functions take."""
    if isinstance(a, torch.Tensor):
        return a
    return torch.full((K,), float(a), dtype=compute_dtype(ref.dtype), device=ref.device)


def position_keys(idx: torch.Tensor, shape) -> torch.Tensor:
    """Linear key of each index row over the logical ``shape`` (the first idx.shape[1] dims)."""
    key = torch.zeros(idx.shape[0], dtype=torch.int64, device=idx.device)
    for j in range(idx.shape[1]):
        key = key * int(shape[j]) + idx[:, j]
    return key


def last_occurrence_mask(keys: torch.Tensor) -> torch.Tensor:
    """Bool mask [K]: True for the last entry of each distinct key (no host sync)."""
    K = keys.shape[0]
    if K == 0:
        return torch.zeros(0, dtype=torch.bool, device=keys.device)
    sk, perm = torch.sort(keys, stable=True)
    last = torch.ones(K, dtype=torch.bool, device=keys.device)
    last[:-1] = sk[1:] != sk[:-1]
    keep = torch.empty_like(last)
    keep[perm] = last
    return keep


def occurrence_rank(keys: torch.Tensor) -> torch.Tensor:
    """int64 [K]: 0 for the first entry of a key, 1 for its second entry, ... (index order)."""
    K = keys.shape[0]
    if K == 0:
        return torch.zeros(0, dtype=torch.int64, device=keys.device)
    sk, perm = torch.sort(keys, stable=True)
    ar = torch.arange(K, device=keys.device)
    start = torch.ones(K, dtype=torch.bool, device=keys.device)
    start[1:] = sk[1:] != sk[:-1]
    first = torch.where(start, ar, torch.zeros_like(ar)).cummax(0).values
    rank = torch.empty_like(ar)
    rank[perm] = ar - first
    return rank


# --------------------------------------------------------------------------------------------
# row patch / blend
# --------------------------------------------------------------------------------------------


def row_patch(dst, src, dst_idx, src_idx, alpha=None):
    K, m = dst_idx.shape
    if K == 0:
        return dst
    # read every source (and destination) before writing anything
    s = src[tuple(src_idx.unbind(1))]  # [K, *F], a copy
    keep = last_occurrence_mask(position_keys(dst_idx, dst.shape))
    if alpha is None:
        val = s
    else:
        cd = compute_dtype(dst.dtype)
        d = dst[tuple(dst_idx.unbind(1))]
        a = alpha.to(cd).reshape((K,) + (1,) * (s.dim() - 1))
        val = ((1 - a) * d.to(cd) + a * s.to(cd)).to(dst.dtype)
    di = dst_idx[keep]
    dst[tuple(di.unbind(1))] = val[keep]
    return dst


def head_patch(dst, src, dst_idx, src_idx, alpha=None):
    return row_patch(dst, src, dst_idx, src_idx, alpha)


# --------------------------------------------------------------------------------------------
# add with optional norm-relative scaling
# --------------------------------------------------------------------------------------------


def _add_rows(xr, vv, a, norm, renorm):
    """xr, vv: [E, F] in compute dtype; a: [E] -> updated rows (compute dtype)."""
    a = a[:, None]
    nx = None
    if norm == "relative" or renorm:
        nx = torch.sqrt((xr * xr).sum(-1, keepdim=True))
    if norm == "relative":
        nv = torch.sqrt((vv * vv).sum(-1, keepdim=True))
        scale = torch.where(nv > 0, nx / torch.where(nv > 0, nv, torch.ones_like(nv)), torch.zeros_like(nv))
        y = xr + a * vv * scale
    else:
        y = xr + a * vv
    if renorm:
        ny = torch.sqrt((y * y).sum(-1, keepdim=True))
        ok = ny > 0
        y = torch.where(ok, y * (nx / torch.where(ok, ny, torch.ones_like(ny))), y)
    return y


def _sequential(x, idx, update, unique=False):
    """Apply ``update(rows_fp32, sel)`` for entries in index order; a position listed several
    times gets its entries one after the other (in fp32), and is rounded to x's dtype once.
    unique=True: the caller knows the positions are distinct, so the duplicate check (a host read of
    the largest occurrence rank, a graph break under torch.compile) is skipped."""
    cd = compute_dtype(x.dtype)
    rank = None
    if not unique:
        keys = position_keys(idx, x.shape)
        rank = occurrence_rank(keys)
    if rank is None or int(rank.max().item()) == 0:  # no duplicates: one vectorized step
        r, p = idx[:, 0], idx[:, 1]
        x[r, p] = update(x[r, p].to(cd), torch.arange(idx.shape[0], device=idx.device)).to(x.dtype)
        return x
    uk, inv = torch.unique(keys, return_inverse=True)
    first = torch.zeros(uk.shape[0], dtype=torch.int64, device=idx.device)
    first[inv] = torch.arange(idx.shape[0], device=idx.device)  # any entry of each position
    r, p = idx[first, 0], idx[first, 1]
    W = x[r, p].to(cd)
    for rr in range(int(rank.max().item()) + 1):
        sel = torch.nonzero(rank == rr).flatten()
        W[inv[sel]] = update(W[inv[sel]], sel)
    x[r, p] = W.to(x.dtype)
    return x


def add_scaled(x, v, idx, alpha, norm=None, renorm=False, unique=False):
    """x: [N, T, F]; v: [F] or [K, F]; idx: [K, 2]; alpha: fp32 [K]."""
    K = idx.shape[0]
    if K == 0:
        return x
    cd = compute_dtype(x.dtype)
    vfull = v.expand(K, v.shape[-1]) if v.dim() == 1 else v

    def update(rows, sel):
        a = alpha[sel].to(cd)
        y = _add_rows(rows, vfull[sel].to(cd), a, norm, renorm)
        return torch.where((a != 0)[:, None], y, rows)  # alpha == 0: bitwise unchanged

    return _sequential(x, idx, update, unique)


# --------------------------------------------------------------------------------------------
# low-rank projection (LEACE apply)
# --------------------------------------------------------------------------------------------


def _project_rows(xr, L, R, mu):
    cd = compute_dtype(xr.dtype)
    xf = xr.to(cd)
    c = (xf - mu.to(cd) if mu is not None else xf) @ R.to(cd).T
    return (xf - c @ L.to(cd).T).to(xr.dtype)


def project(x, L, R, mu=None, idx=None):
    if idx is None:
        if x.numel() == 0:
            return x
        F = x.shape[-1]
        flat = x.reshape(-1, F)  # a view when possible, else a copy
        y = _project_rows(flat, L, R, mu)
        x.copy_(y.reshape(x.shape))
        return x
    K = idx.shape[0]
    if K == 0:
        return x
    keep = last_occurrence_mask(position_keys(idx, x.shape))
    ii = idx[keep]
    r, p = ii[:, 0], ii[:, 1]
    x[r, p] = _project_rows(x[r, p], L, R, mu)
    return x


# --------------------------------------------------------------------------------------------
# seeded noise: Philox4x32-10 + Box-Muller, bit-compatible with triton.language.randn
# --------------------------------------------------------------------------------------------

_M32 = 0xFFFFFFFF
PHILOX_KEY_A = 0x9E3779B9
PHILOX_KEY_B = 0xBB67AE85
PHILOX_ROUND_A = 0xD2511F53
PHILOX_ROUND_B = 0xCD9E8D57


def _mulhilo32(a: int, b: torch.Tensor):
    """(hi, lo) 32-bit halves of a * b for a constant a < 2**32 and int64 b in [0, 2**32).

    The int64 product wraps modulo 2**64 exactly like the unsigned one, so its bit pattern is the
    full 64-bit product: an arithmetic shift plus a mask gives the high word."""
    prod = b * a
    return (prod >> 32) & _M32, prod & _M32


def philox4x32(c0, c1, c2, c3, k0, k1, n_rounds: int = 10):
    """Philox4x32 on int64 tensors holding uint32 values (broadcasting); same as triton's."""
    for _ in range(n_rounds):
        hb, lb = _mulhilo32(PHILOX_ROUND_B, c2)
        ha, la = _mulhilo32(PHILOX_ROUND_A, c0)
        c0, c1, c2, c3 = hb ^ c1 ^ k0, lb, ha ^ c3 ^ k1, la
        k0 = (k0 + PHILOX_KEY_A) & _M32
        k1 = (k1 + PHILOX_KEY_B) & _M32
    return c0, c1, c2, c3


def philox_bits(seeds: torch.Tensor, F: int):
    """First two Philox outputs (uint32 values in int64) for counters f = 0..F-1: [K, F] each.

    Matches ``tl.randint4x(seed, f)`` with an int32 offset ``f``: counter (f, 0, 0, 0) and key
    (seed & 0xffffffff, seed >> 32 & 0xffffffff)."""
    dev = seeds.device
    s = seeds.to(torch.int64)
    k0 = (s & _M32)[:, None]
    k1 = ((s >> 32) & _M32)[:, None]
    f = torch.arange(F, dtype=torch.int64, device=dev)[None, :]
    zero = torch.zeros_like(f)
    c0, c1, _, _ = philox4x32(f, zero, zero, zero, k0, k1)
    return c0, c1


def _philox_bits_numpy(seeds: torch.Tensor, F: int):
    """philox_bits for CPU tensors in numpy uint64 (exact 64-bit products, no torch threading)."""
    import numpy as np

    m32 = np.uint64(_M32)
    s = seeds.to(torch.int64).numpy().view(np.uint64)
    k0 = (s & m32)[:, None]
    k1 = ((s >> np.uint64(32)) & m32)[:, None]
    c0 = np.broadcast_to(np.arange(F, dtype=np.uint64)[None, :], (s.shape[0], F))
    c1 = np.zeros_like(c0)
    c2 = np.zeros_like(c0)
    c3 = np.zeros_like(c0)
    A, B = np.uint64(PHILOX_ROUND_A), np.uint64(PHILOX_ROUND_B)
    KA, KB = np.uint64(PHILOX_KEY_A), np.uint64(PHILOX_KEY_B)
    sh = np.uint64(32)
    for _ in range(10):
        pb = B * c2
        pa = A * c0
        c0, c1, c2, c3 = (pb >> sh) ^ c1 ^ k0, pb & m32, (pa >> sh) ^ c3 ^ k1, pa & m32
        k0 = (k0 + KA) & m32
        k1 = (k1 + KB) & m32
    return torch.from_numpy(c0.astype(np.int64)), torch.from_numpy(c1.astype(np.int64))


def _philox_bits_fast(seeds: torch.Tensor, F: int):
    """philox_bits, in numpy on CPU (torch's int64 multiply is slow there)."""
    if seeds.device.type == "cpu":
        try:
            K = seeds.shape[0]
            step = max(1, (1 << 15) // max(F, 1))  # ~32k counters per chunk: stays in cache
            if K <= step:
                return _philox_bits_numpy(seeds, F)
            parts = [_philox_bits_numpy(seeds[i:i + step], F) for i in range(0, K, step)]
            return torch.cat([a for a, _ in parts]), torch.cat([b for _, b in parts])
        except ImportError:  # pragma: no cover - numpy is a dependency
            pass
    return philox_bits(seeds, F)


def _uint_to_uniform(x: torch.Tensor) -> torch.Tensor:
    x = torch.where(x >= 2**31, x - 2**32, x)  # bitcast to int32
    x = torch.where(x < 0, -x - 1, x)  # ~x
    return x.to(torch.float32) * torch.tensor(4.6566127342e-10, dtype=torch.float32, device=x.device)


def philox_randn(seeds: torch.Tensor, F: int) -> torch.Tensor:
    """Standard normal fp32 [K, F]; z[k, f] depends only on (seeds[k], f). Equals tl.randn(seed, f)."""
    i1, i2 = _philox_bits_fast(seeds, F)
    u1 = _uint_to_uniform(i1)
    u2 = _uint_to_uniform(i2)
    u1 = torch.maximum(u1, torch.tensor(1.0e-7, dtype=torch.float32, device=u1.device))
    th = torch.tensor(6.283185307179586, dtype=torch.float32, device=u2.device) * u2
    r = torch.sqrt(torch.tensor(-2.0, dtype=torch.float32, device=u1.device) * torch.log(u1))
    return r * torch.cos(th)


def noise(x, idx, std, seeds, unique=False):
    """x: [N, T, F]; idx: [K, 2]; std: fp32 [K]; seeds: int64 [K]."""
    K = idx.shape[0]
    if K == 0:
        return x
    cd = compute_dtype(x.dtype)
    z = philox_randn(seeds, x.shape[-1])

    def update(rows, sel):
        s = std[sel].to(cd)[:, None]
        return torch.where(s != 0, rows + s * z[sel].to(cd), rows)

    return _sequential(x, idx, update, unique)
