"""Triton kernels for the fused patching ops (see ``interp.kernels`` for the public API).

The functions here take inputs already validated by the dispatch layer (int64 indices, matching
dtypes/devices, per-entry alpha/std as a python float or an fp32 tensor [K]). They are importable on
machines without a GPU; to *run* them on CPU tensors set ``TRITON_INTERPRET=1`` before this module is
imported.

Each op is two launches and no other device work: the kernels read the (row, pos[, head]) index
tensor themselves (any strides) and turn it into element offsets, so any strided view works without
copies; feature dims are coalesced to at most two (size, stride) pairs. Duplicates are resolved
without a host sync: a mark kernel records, per destination, the last entry (atomic max of
``epoch << 32 | k`` in a reusable buffer) and the first; then exactly one program owns each
destination (the last entry for patch/project, the first for add/noise, which applies the
destination's entries in index order), so no two programs ever write the same element. Entries
whose indices are out of range are skipped (the dispatch layer reports them unless check=False).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from . import reference as _ref

# --------------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------------

#: first-entry marks store (epoch << 32) | (FIRST_CODE - k), so atomic_max keeps the smallest k
_FIRST = 0x7FFFFFFF
FIRST_CODE = tl.constexpr(_FIRST)


@triton.jit
def _index_row(idx_ptr, k, si0, si1, D0, D1, D2, S0, S1, S2, m, M3: tl.constexpr, KEYS: tl.constexpr,
               key_ptr):
    """(element offset, destination key, in-range flag) of index row(s) k of an int64 [K, 2|3] index."""
    base = idx_ptr + k * si0
    i0 = tl.load(base, mask=m, other=0)
    i1 = tl.load(base + si1, mask=m, other=0)
    ok = m & (i0 >= 0) & (i0 < D0) & (i1 >= 0) & (i1 < D1)
    off = i0 * S0 + i1 * S1
    key = i0 * D1 + i1
    if M3:
        i2 = tl.load(base + 2 * si1, mask=m, other=0)
        ok = ok & (i2 >= 0) & (i2 < D2)
        off = off + i2 * S2
        key = key * D2 + i2
    if KEYS:  # key space too large for the mark buffer: dense keys computed on the host side
        key = tl.load(key_ptr + k, mask=m, other=0)
    return off, tl.where(ok, key, 0), ok


@triton.jit
def _entry_value(ptr, j, scalar, TENSOR: tl.constexpr):
    """Entry j's alpha / std: from the fp32 tensor at ptr, or the one scalar for every entry."""
    if TENSOR:
        return tl.load(ptr + j)
    return scalar


@triton.jit
def _mark_kernel(idx_ptr, key_ptr, last_ptr, first_ptr, K, code, si0, si1, D0, D1, D2,
                 M3: tl.constexpr, KEYS: tl.constexpr, FIRST: tl.constexpr, BLOCK: tl.constexpr):
    """last[key] <- max over entries of (code | k); with FIRST also first[key] <- the smallest k."""
    k = (tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)).to(tl.int64)
    m = k < K
    _, key, ok = _index_row(idx_ptr, k, si0, si1, D0, D1, D2, 0, 0, 0, m, M3, KEYS, key_ptr)
    tl.atomic_max(last_ptr + key, code + k, mask=ok)
    if FIRST:
        tl.atomic_max(first_ptr + key, code + (FIRST_CODE - k), mask=ok)


@triton.jit
def _row_patch_kernel(
    dst_ptr, src_ptr, didx_ptr, sidx_ptr, key_ptr, last_ptr, alpha_ptr, alpha, code,
    dsi0, dsi1, D0, D1, D2, DS0, DS1, DS2,
    ssi0, ssi1, E0, E1, E2, ES0, ES1, ES2,
    F, F2, sd1, sd2, ss1, ss2,
    M3: tl.constexpr, KEYS: tl.constexpr, SRC_ROWS: tl.constexpr, ALPHA: tl.constexpr,
    TWO_D: tl.constexpr, BLOCK: tl.constexpr,
):
    k = tl.program_id(0).to(tl.int64)
    fb = tl.program_id(1)
    d0, key, ok = _index_row(didx_ptr, k, dsi0, dsi1, D0, D1, D2, DS0, DS1, DS2, k >= 0, M3, KEYS, key_ptr)
    if SRC_ROWS:  # the sources were gathered into contiguous rows (src aliases dst)
        s0 = k * ES0
    else:
        s0, _, sok = _index_row(sidx_ptr, k, ssi0, ssi1, E0, E1, E2, ES0, ES1, ES2, k >= 0, M3, False, key_ptr)
        ok = ok & sok
    # the last entry of each destination writes it (set by _mark_kernel); the others do nothing
    if tl.load(last_ptr + key, mask=ok, other=-1) == code + k:
        f = (fb * BLOCK + tl.arange(0, BLOCK)).to(tl.int64)
        mask = f < F
        if TWO_D:
            f1 = f // F2
            f2 = f - f1 * F2
            doff = f1 * sd1 + f2 * sd2
            soff = f1 * ss1 + f2 * ss2
        else:
            doff = f * sd1
            soff = f * ss1
        s = tl.load(src_ptr + s0 + soff, mask=mask)
        if ALPHA > 0:  # 1: one alpha for every entry, 2: one per entry
            a = _entry_value(alpha_ptr, k, alpha, ALPHA == 2)
            d = tl.load(dst_ptr + d0 + doff, mask=mask)
            out = (1 - a) * d.to(tl.float32) + a * s.to(tl.float32)
            tl.store(dst_ptr + d0 + doff, out.to(dst_ptr.dtype.element_ty), mask=mask)
        else:
            tl.store(dst_ptr + d0 + doff, s, mask=mask)


@triton.jit
def _add_scaled_kernel(
    x_ptr, v_ptr, idx_ptr, key_ptr, last_ptr, first_ptr, alpha_ptr, alpha, code,
    si0, si1, D0, D1, S0, S1, F, sx, sv0, sv1,
    KEYS: tl.constexpr, ALPHA_T: tl.constexpr, RELATIVE: tl.constexpr, RENORM: tl.constexpr,
    BLOCK: tl.constexpr,
):
    k = tl.program_id(0).to(tl.int64)
    x0, key, ok = _index_row(idx_ptr, k, si0, si1, D0, D1, 1, S0, S1, 0, k >= 0, False, KEYS, key_ptr)
    # the first entry of each position applies all of its entries, in index order
    if tl.load(first_ptr + key, mask=ok, other=-1) == code + (FIRST_CODE - k):
        kl = tl.load(last_ptr + key) - code
        f = tl.arange(0, BLOCK).to(tl.int64)
        mask = f < F
        xf = tl.load(x_ptr + x0 + f * sx, mask=mask, other=0.0).to(tl.float32)
        for j in range(k, kl + 1):
            _, kj, okj = _index_row(idx_ptr, j, si0, si1, D0, D1, 1, S0, S1, 0, j >= 0, False, KEYS, key_ptr)
            if okj & (kj == key):
                a = _entry_value(alpha_ptr, j, alpha, ALPHA_T)
                v = tl.load(v_ptr + j * sv0 + f * sv1, mask=mask, other=0.0).to(tl.float32)
                if RELATIVE or RENORM:
                    nx = tl.sqrt_rn(tl.sum(xf * xf, axis=0))
                if RELATIVE:
                    nv = tl.sqrt_rn(tl.sum(v * v, axis=0))
                    scale = tl.where(nv > 0, nx / tl.where(nv > 0, nv, 1.0), 0.0)
                    y = xf + a * v * scale
                else:
                    y = xf + a * v
                if RENORM:
                    ny = tl.sqrt_rn(tl.sum(y * y, axis=0))
                    y = tl.where(ny > 0, y * (nx / tl.where(ny > 0, ny, 1.0)), y)
                xf = tl.where(a != 0, y, xf)  # alpha == 0: bitwise unchanged
        tl.store(x_ptr + x0 + f * sx, xf.to(x_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _noise_kernel(
    x_ptr, idx_ptr, key_ptr, last_ptr, first_ptr, std_ptr, std, seed_ptr, code,
    si0, si1, D0, D1, S0, S1, F, sx,
    KEYS: tl.constexpr, STD_T: tl.constexpr, BLOCK: tl.constexpr,
):
    k = tl.program_id(0).to(tl.int64)
    fb = tl.program_id(1)
    x0, key, ok = _index_row(idx_ptr, k, si0, si1, D0, D1, 1, S0, S1, 0, k >= 0, False, KEYS, key_ptr)
    if tl.load(first_ptr + key, mask=ok, other=-1) == code + (FIRST_CODE - k):
        kl = tl.load(last_ptr + key) - code
        f = fb * BLOCK + tl.arange(0, BLOCK)  # int32 counters: z(seed, f) == tl.randn(seed, f)
        mask = f < F
        ptrs = x_ptr + x0 + f.to(tl.int64) * sx
        xf = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
        for j in range(k, kl + 1):
            _, kj, okj = _index_row(idx_ptr, j, si0, si1, D0, D1, 1, S0, S1, 0, j >= 0, False, KEYS, key_ptr)
            if okj & (kj == key):
                s = _entry_value(std_ptr, j, std, STD_T)
                z = tl.randn(tl.load(seed_ptr + j), f)
                xf = tl.where(s != 0, xf + s * z, xf)
        tl.store(ptrs, xf.to(x_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _philox_bits_kernel(out_ptr, seed_ptr, F, BLOCK: tl.constexpr):
    """Test helper: the two Philox words behind tl.randn(seed, f), as int32 [K, 2, F]."""
    k = tl.program_id(0)
    f = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = f < F
    seed = tl.load(seed_ptr + k)
    i1, i2, _, _ = tl.randint4x(seed, f)
    tl.store(out_ptr + k * 2 * F + f, i1.to(tl.int32, bitcast=True), mask=mask)
    tl.store(out_ptr + k * 2 * F + F + f, i2.to(tl.int32, bitcast=True), mask=mask)


@triton.jit
def _project_kernel(
    x_ptr, idx_ptr, key_ptr, last_ptr, row_off_ptr, L_ptr, R_ptr, mu_ptr, code,
    si0, si1, D0, D1, S0, S1,
    M, F, RK, sx, srow,
    HAS_MU: tl.constexpr, ROWS: tl.constexpr, KEYS: tl.constexpr, HALF_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """ROWS: 0 = the (row, pos) entries of idx (each destination once), 1 = every row at stride srow,
    2 = every row at the offsets in row_off. HALF_DOT: the two products take (x - mu), R, c and L in
    x's 16-bit dtype (tensor cores, fp32 accumulation) instead of fp32 (exact IEEE products)."""
    pid = tl.program_id(0)
    rows = (pid * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    rmask = rows < M
    if ROWS == 0:
        roff, key, ok = _index_row(idx_ptr, rows, si0, si1, D0, D1, 1, S0, S1, 0, rmask, False, KEYS, key_ptr)
        rmask = ok & (tl.load(last_ptr + key, mask=ok, other=-1) == code + rows)
    elif ROWS == 1:
        roff = rows * srow
    else:
        roff = tl.load(row_off_ptr + rows, mask=rmask, other=0)
    kk = tl.arange(0, BLOCK_K)
    kmask = kk < RK
    # pass 1: c = (x - mu) @ R.T   [BLOCK_M, BLOCK_K] in fp32
    c = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)
    for f0 in range(0, F, BLOCK_F):
        f = f0 + tl.arange(0, BLOCK_F)
        fmask = f < F
        xm = rmask[:, None] & fmask[None, :]
        xt = tl.load(x_ptr + roff[:, None] + f[None, :].to(tl.int64) * sx, mask=xm, other=0.0).to(tl.float32)
        if HAS_MU:
            mu = tl.load(mu_ptr + f, mask=fmask, other=0.0)
            xt = tl.where(xm, xt - mu[None, :], 0.0)
        rt = tl.load(R_ptr + kk[None, :] * F + f[:, None], mask=fmask[:, None] & kmask[None, :], other=0.0)
        if HALF_DOT:
            c += tl.dot(xt.to(x_ptr.dtype.element_ty), rt.to(x_ptr.dtype.element_ty))
        else:
            c += tl.dot(xt, rt, input_precision="ieee")
    # pass 2: x -= c @ L.T
    for f0 in range(0, F, BLOCK_F):
        f = f0 + tl.arange(0, BLOCK_F)
        fmask = f < F
        xm = rmask[:, None] & fmask[None, :]
        ptrs = x_ptr + roff[:, None] + f[None, :].to(tl.int64) * sx
        xt = tl.load(ptrs, mask=xm, other=0.0).to(tl.float32)
        lt = tl.load(L_ptr + f[None, :] * RK + kk[:, None], mask=kmask[:, None] & fmask[None, :], other=0.0)
        if HALF_DOT:
            y = xt - tl.dot(c.to(x_ptr.dtype.element_ty), lt.to(x_ptr.dtype.element_ty))
        else:
            y = xt - tl.dot(c, lt, input_precision="ieee")
        tl.store(ptrs, y.to(x_ptr.dtype.element_ty), mask=xm)


def _is_interpreted() -> bool:
    try:
        from triton.runtime.interpreter import InterpretedFunction

        return isinstance(_row_patch_kernel, InterpretedFunction)
    except ImportError:  # pragma: no cover
        return os.environ.get("TRITON_INTERPRET", "0") == "1"


#: True when this module's kernels run in Triton's interpreter (TRITON_INTERPRET=1 at import).
INTERPRETED = _is_interpreted()

#: Rows longer than this are handled by the reference in add_scaled (whole row in one block).
MAX_ROW_BLOCK = 32768
#: Feature-block caps for the patch and noise kernels (longer rows use several programs).
PATCH_BLOCK = 4096
NOISE_BLOCK = 2048
#: Overrides of the projection kernel's launch configuration (BLOCK_M, BLOCK_F, num_warps, HALF_DOT);
#: benchmarks/kernels.py --project-sweep measures the choices.
PROJECT_CONFIG: dict = {}

# --------------------------------------------------------------------------------------------
# host-side helpers
# --------------------------------------------------------------------------------------------


def _overlap(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def _coalesce(sizes, *stride_lists):
    """Merge feature dims that are contiguous w.r.t. each other in every tensor -> [(size, strides)]."""
    out = []
    for i, s in enumerate(sizes):
        if s == 1:
            continue
        sts = [int(st[i]) for st in stride_lists]
        if out and all(po == s * c for po, c in zip(out[-1][1], sts)):
            out[-1] = (out[-1][0] * s, sts)
        else:
            out.append((int(s), sts))
    return out


def _warps(block: int) -> int:
    return max(1, min(16, block // 256))


#: Destinations are marked in a per-(device, stream) int64 buffer indexed by the linear position key;
#: key spaces larger than this use dense keys computed with a sort (a few more launches).
MAX_MARK_KEYS = 1 << 22
_MARKS: dict = {}


class _Marks:
    """Reusable int64 [2, S] mark buffer (last entry, first entry per destination key).

    Each call gets a new epoch and writes (epoch << 32) | k with atomic_max, so marks of earlier
    calls are always smaller and the buffer never needs clearing: one launch marks, the op's own
    kernel reads. Calls on one stream run in order, so a buffer per stream is never shared by two
    calls at once."""

    def __init__(self, device, size):
        self.buf = torch.zeros((2, size), dtype=torch.int64, device=device)
        self.epoch = 0

    def next_code(self) -> int:
        self.epoch += 1
        if self.epoch >= (1 << 31) - 1:  # before the code would overflow int64: clear and restart
            self.buf.zero_()
            self.epoch = 1
        return self.epoch << 32


def _marks_for(device, size) -> _Marks:
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (str(device), stream)
    m = _MARKS.get(key)
    if m is None or m.buf.shape[1] < size:
        grown = min(2 * m.buf.shape[1], MAX_MARK_KEYS) if m else 0  # grow geometrically, up to the cap
        m = _MARKS[key] = _Marks(device, max(size, 1024, grown))
    return m


def _dense_keys(idx: torch.Tensor, sizes) -> torch.Tensor:
    """Keys in [0, K) that are equal exactly where the positions are (for huge key spaces)."""
    keys = _ref.position_keys(idx, sizes)
    sk, perm = torch.sort(keys)
    start = torch.ones_like(sk)
    start[1:] = (sk[1:] != sk[:-1]).to(sk.dtype)
    dense = torch.empty_like(keys)
    dense[perm] = torch.cumsum(start, 0) - 1
    return dense


def _mark(idx: torch.Tensor, sizes, first: bool):
    """Launch the mark kernel for a [K, m] index over the first m dims of `sizes`.

    Returns (mark buffer, code, dense keys or None, index-geometry args (si0, si1, D0, D1, D2))."""
    K, m = idx.shape
    D = [int(sizes[j]) for j in range(m)] + [1] * (3 - m)
    space = D[0] * D[1] * D[2]
    keys = None
    if space > MAX_MARK_KEYS:
        keys = _dense_keys(idx, sizes)
        space = K
    marks = _marks_for(idx.device, space)
    code = marks.next_code()
    geo = (idx.stride(0), idx.stride(1), *D)
    BLOCK = 1024 if K >= 1024 else max(16, triton.next_power_of_2(K))
    last, firsts = marks.buf[0], marks.buf[1]
    _mark_kernel[(triton.cdiv(K, BLOCK),)](
        idx, keys if keys is not None else idx, last, firsts, K, code, *geo,
        M3=m == 3, KEYS=keys is not None, FIRST=first, BLOCK=BLOCK, num_warps=4,
    )
    return marks, code, keys, geo


def _scalar_or_tensor(a, dummy):
    """A per-entry value: (tensor pointer, scalar, is-tensor) for the kernels."""
    if isinstance(a, torch.Tensor):
        return a.to(torch.float32).contiguous(), 0.0, True
    return dummy, float(a), False


# --------------------------------------------------------------------------------------------
# ops
# --------------------------------------------------------------------------------------------


def row_patch(dst, src, dst_idx, src_idx, alpha=None):
    K, m = dst_idx.shape
    orig_src = src
    src_rows = _overlap(dst, src)
    if src_rows:
        # read every source before writing: gather them into a fresh buffer first
        src = src[tuple(src_idx.unbind(1))].contiguous()  # [K, *F]
        src_fstrides = src.stride()[1:]
    else:
        src_fstrides = src.stride()[m:]
    dims = _coalesce(dst.shape[m:], dst.stride()[m:], src_fstrides)
    if len(dims) > 2:  # feature layout too irregular for the kernel: the reference (same semantics)
        return _ref.row_patch(dst, orig_src, dst_idx, src_idx, None if alpha is None else _ref.entries(alpha, K, dst))
    if len(dims) == 0:
        F, F2, sd1, sd2, ss1, ss2, two_d = 1, 1, 0, 0, 0, 0, False
    elif len(dims) == 1:
        (F, (sd1, ss1)), F2, sd2, ss2, two_d = dims[0], 1, 0, 0, False
    else:
        (F1, (sd1, ss1)), (F2, (sd2, ss2)) = dims
        F, two_d = F1 * F2, True
    marks, code, keys, (dsi0, dsi1, D0, D1, D2) = _mark(dst_idx, dst.shape, first=False)
    DS = [int(dst.stride(j)) for j in range(m)] + [0] * (3 - m)
    if src_rows:
        ssi0 = ssi1 = 0
        E, ES = [1, 1, 1], [int(src.stride(0)), 0, 0]
    else:
        ssi0, ssi1 = src_idx.stride(0), src_idx.stride(1)
        E = [int(src.shape[j]) for j in range(m)] + [1] * (3 - m)
        ES = [int(src.stride(j)) for j in range(m)] + [0] * (3 - m)
    a_ptr, a_val, a_t = _scalar_or_tensor(1.0 if alpha is None else alpha, dst_idx)
    BLOCK = min(triton.next_power_of_2(F), PATCH_BLOCK)
    grid = (K, triton.cdiv(F, BLOCK))
    _row_patch_kernel[grid](
        dst, src, dst_idx, src_idx, keys if keys is not None else dst_idx, marks.buf[0], a_ptr, a_val, code,
        dsi0, dsi1, D0, D1, D2, *DS,
        ssi0, ssi1, *E, *ES,
        F, F2, sd1, sd2, ss1, ss2,
        M3=m == 3, KEYS=keys is not None, SRC_ROWS=src_rows, ALPHA=0 if alpha is None else (2 if a_t else 1),
        TWO_D=two_d, BLOCK=BLOCK, num_warps=_warps(BLOCK),
    )
    return dst


def add_scaled(x, v, idx, alpha, norm=None, renorm=False):
    K = idx.shape[0]
    F = x.shape[2]
    if F > MAX_ROW_BLOCK:
        return _ref.add_scaled(x, v, idx, _ref.entries(alpha, K, x), norm, renorm)
    if v.dtype != x.dtype and v.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        v = v.to(torch.float32)
    marks, code, keys, (si0, si1, D0, D1, _) = _mark(idx, x.shape, first=True)
    if v.dim() == 1:
        sv0, sv1 = 0, v.stride(0)
    else:
        sv0, sv1 = v.stride(0), v.stride(1)
    a_ptr, a_val, a_t = _scalar_or_tensor(alpha, v)
    BLOCK = triton.next_power_of_2(F)
    _add_scaled_kernel[(K,)](
        x, v, idx, keys if keys is not None else idx, marks.buf[0], marks.buf[1], a_ptr, a_val, code,
        si0, si1, D0, D1, x.stride(0), x.stride(1), F, x.stride(2), sv0, sv1,
        KEYS=keys is not None, ALPHA_T=a_t, RELATIVE=norm == "relative", RENORM=bool(renorm),
        BLOCK=BLOCK, num_warps=_warps(BLOCK),
    )
    return x


def noise(x, idx, std, seeds):
    K = idx.shape[0]
    F = x.shape[2]
    marks, code, keys, (si0, si1, D0, D1, _) = _mark(idx, x.shape, first=True)
    s_ptr, s_val, s_t = _scalar_or_tensor(std, seeds)
    BLOCK = min(triton.next_power_of_2(F), NOISE_BLOCK)
    grid = (K, triton.cdiv(F, BLOCK))
    _noise_kernel[grid](
        x, idx, keys if keys is not None else idx, marks.buf[0], marks.buf[1], s_ptr, s_val,
        seeds.to(torch.int64).contiguous(), code,
        si0, si1, D0, D1, x.stride(0), x.stride(1), F, x.stride(2),
        KEYS=keys is not None, STD_T=s_t, BLOCK=BLOCK, num_warps=_warps(BLOCK),
    )
    return x


def philox_bits(seeds: torch.Tensor, F: int):
    """(i1, i2) uint32 words (as int64 [K, F]) that tl.randn(seed, f) uses; for tests."""
    K = seeds.shape[0]
    out = torch.empty((K, 2, F), dtype=torch.int32, device=seeds.device)
    BLOCK = min(triton.next_power_of_2(max(F, 1)), 1024)
    _philox_bits_kernel[(K, triton.cdiv(F, BLOCK))](out, seeds.to(torch.int64).contiguous(), F, BLOCK=BLOCK)
    o = out.to(torch.int64) & 0xFFFFFFFF
    return o[:, 0], o[:, 1]


def project(x, L, R, mu=None, idx=None):
    F = x.shape[-1]
    RK = L.shape[1]
    Lc = L.to(device=x.device, dtype=torch.float32).contiguous()
    Rc = R.to(device=x.device, dtype=torch.float32).contiguous()
    muc = mu.to(torch.float32).contiguous() if mu is not None else Lc
    srow, row_off, keys, code, last = 0, Lc, None, 0, Lc
    si0 = si1 = D0 = D1 = S0 = S1 = 0
    if idx is not None:
        marks, code, keys, (si0, si1, D0, D1, _) = _mark(idx, x.shape, first=False)
        last = marks.buf[0]
        S0, S1 = x.stride(0), x.stride(1)
        M, rows_mode = idx.shape[0], 0
    else:
        lead = _coalesce(x.shape[:-1], x.stride()[:-1])
        M = 1
        for s in x.shape[:-1]:
            M *= int(s)
        if len(lead) <= 1:
            rows_mode = 1
            srow = lead[0][1][0] if lead else 0
        else:
            rows_mode = 2
            row_off = torch.zeros((), dtype=torch.int64, device=x.device)
            for s, st in zip(x.shape[:-1], x.stride()[:-1]):
                row_off = row_off[..., None] + torch.arange(s, device=x.device, dtype=torch.int64) * st
            row_off = row_off.reshape(-1).contiguous()
    BLOCK_K = max(16, triton.next_power_of_2(RK))
    # measured on an H200 (benchmarks/kernels.py --project-sweep, docs/PERFORMANCE.md): 32 x 128 tiles, and
    # 16-bit products for 16-bit x, were the fastest for k = 16 and 64 in every dtype
    cfg = dict(BLOCK_M=32, BLOCK_F=128, num_warps=4, HALF_DOT=True)
    cfg.update(PROJECT_CONFIG)
    # Triton's CPU interpreter evaluates bfloat16 dots wrongly (values off by 1e8), so there bf16 stays fp32
    half = bool(cfg.pop("HALF_DOT")) and (x.dtype == torch.float16 or (x.dtype == torch.bfloat16 and not INTERPRETED))
    grid = (triton.cdiv(M, cfg["BLOCK_M"]),)
    _project_kernel[grid](
        x, idx if idx is not None else Lc, keys if keys is not None else Lc, last, row_off, Lc, Rc, muc, code,
        si0, si1, D0, D1, S0, S1,
        M, F, RK, x.stride(-1), srow,
        HAS_MU=mu is not None, ROWS=rows_mode, KEYS=keys is not None, HALF_DOT=half, BLOCK_K=BLOCK_K, **cfg,
    )
    return x
