"""Triton kernels for the fused patching ops (see ``interp.kernels`` for the public API).

The functions here take inputs already validated by the dispatch layer (int64 indices in range,
matching dtypes/devices, fp32 per-entry alpha/std). They are importable on machines without a GPU;
to *run* them on CPU tensors set ``TRITON_INTERPRET=1`` before this module is imported.

Layout handling: every op turns its (row, pos[, head]) indices into int64 element offsets with a
few small torch ops, so any strided view works without copies; feature dims are coalesced to at
most two (size, stride) pairs. Duplicates are resolved without a host sync: a stable sort of the
position keys gives, for every distinct destination, one program that owns it (the last entry for
patch/project, the whole run of entries in index order for add/noise), so no two programs ever
write the same element.
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


@triton.jit
def _row_patch_kernel(
    dst_ptr, src_ptr, dst_off_ptr, src_off_ptr, keep_ptr, alpha_ptr,
    F, F2, sd1, sd2, ss1, ss2,
    HAS_ALPHA: tl.constexpr, TWO_D: tl.constexpr, BLOCK: tl.constexpr,
):
    k = tl.program_id(0)
    fb = tl.program_id(1)
    keep = tl.load(keep_ptr + k)
    if keep != 0:
        d0 = tl.load(dst_off_ptr + k)
        s0 = tl.load(src_off_ptr + k)
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
        if HAS_ALPHA:
            a = tl.load(alpha_ptr + k)
            d = tl.load(dst_ptr + d0 + doff, mask=mask)
            out = (1 - a) * d.to(tl.float32) + a * s.to(tl.float32)
            tl.store(dst_ptr + d0 + doff, out.to(dst_ptr.dtype.element_ty), mask=mask)
        else:
            tl.store(dst_ptr + d0 + doff, s, mask=mask)


@triton.jit
def _add_scaled_kernel(
    x_ptr, v_ptr, x_off_ptr, perm_ptr, run_ptr, alpha_ptr,
    F, sx, sv0, sv1,
    RELATIVE: tl.constexpr, RENORM: tl.constexpr, BLOCK: tl.constexpr,
):
    j = tl.program_id(0)
    n = tl.load(run_ptr + j)  # entries of this destination (0: not the first of its run)
    if n > 0:
        e0 = tl.load(perm_ptr + j)
        x0 = tl.load(x_off_ptr + e0)
        f = tl.arange(0, BLOCK).to(tl.int64)
        mask = f < F
        xf = tl.load(x_ptr + x0 + f * sx, mask=mask, other=0.0).to(tl.float32)
        for i in range(0, n):
            e = tl.load(perm_ptr + j + i)
            a = tl.load(alpha_ptr + e)
            v = tl.load(v_ptr + e * sv0 + f * sv1, mask=mask, other=0.0).to(tl.float32)
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
    x_ptr, x_off_ptr, perm_ptr, run_ptr, std_ptr, seed_ptr,
    F, sx,
    BLOCK: tl.constexpr,
):
    j = tl.program_id(0)
    fb = tl.program_id(1)
    n = tl.load(run_ptr + j)
    if n > 0:
        e0 = tl.load(perm_ptr + j)
        x0 = tl.load(x_off_ptr + e0)
        f = fb * BLOCK + tl.arange(0, BLOCK)  # int32 counters: z(seed, f) == tl.randn(seed, f)
        mask = f < F
        ptrs = x_ptr + x0 + f.to(tl.int64) * sx
        xf = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
        for i in range(0, n):
            e = tl.load(perm_ptr + j + i)
            s = tl.load(std_ptr + e)
            seed = tl.load(seed_ptr + e)
            z = tl.randn(seed, f)
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
    x_ptr, row_off_ptr, keep_ptr, L_ptr, R_ptr, mu_ptr,
    M, F, RK, sx, srow,
    HAS_MU: tl.constexpr, HAS_KEEP: tl.constexpr, DIRECT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < M
    if HAS_KEEP:
        rmask = rmask & (tl.load(keep_ptr + rows, mask=rmask, other=0) != 0)
    if DIRECT:
        roff = rows.to(tl.int64) * srow
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
        c += tl.dot(xt, rt, input_precision="ieee")
    # pass 2: x -= c @ L.T
    for f0 in range(0, F, BLOCK_F):
        f = f0 + tl.arange(0, BLOCK_F)
        fmask = f < F
        xm = rmask[:, None] & fmask[None, :]
        ptrs = x_ptr + roff[:, None] + f[None, :].to(tl.int64) * sx
        xt = tl.load(ptrs, mask=xm, other=0.0).to(tl.float32)
        lt = tl.load(L_ptr + f[None, :] * RK + kk[:, None], mask=kmask[:, None] & fmask[None, :], other=0.0)
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

# --------------------------------------------------------------------------------------------
# host-side helpers
# --------------------------------------------------------------------------------------------


def _overlap(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def _offsets(idx: torch.Tensor, strides) -> torch.Tensor:
    """int64 element offsets of index rows: sum_j idx[:, j] * strides[j]."""
    off = idx[:, 0] * int(strides[0])
    for j in range(1, idx.shape[1]):
        off = off + idx[:, j] * int(strides[j])
    return off.contiguous()


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


def _runs(keys: torch.Tensor):
    """For sequential-duplicate ops: (perm, run_len) over the stable sort of keys.

    perm[j] is the entry at sorted position j; run_len[j] is the number of entries with that key
    when j is the first of its run, else 0. No host sync."""
    K = keys.shape[0]
    sk, perm = torch.sort(keys, stable=True)
    ar = torch.arange(K, device=keys.device)
    start = torch.ones(K, dtype=torch.bool, device=keys.device)
    start[1:] = sk[1:] != sk[:-1]
    s = torch.where(start, ar, torch.full_like(ar, K))
    nxt = torch.cat([s[1:], s.new_full((1,), K)])
    next_start = torch.flip(torch.cummin(torch.flip(nxt, (0,)), 0).values, (0,))
    run = torch.where(start, next_start - ar, torch.zeros_like(ar))
    return perm.contiguous(), run.contiguous()


def _warps(block: int) -> int:
    return max(1, min(16, block // 256))


# --------------------------------------------------------------------------------------------
# ops
# --------------------------------------------------------------------------------------------


def row_patch(dst, src, dst_idx, src_idx, alpha=None):
    K, m = dst_idx.shape
    orig_src = src
    if _overlap(dst, src):
        # read every source before writing: gather them into a fresh buffer first
        src = src[tuple(src_idx.unbind(1))].contiguous()  # [K, *F]
        src_off = torch.arange(K, device=dst.device, dtype=torch.int64) * src.stride(0)
        src_fstrides = src.stride()[1:]
    else:
        src_off = _offsets(src_idx, src.stride())
        src_fstrides = src.stride()[m:]
    dims = _coalesce(dst.shape[m:], dst.stride()[m:], src_fstrides)
    if len(dims) > 2:  # feature layout too irregular for the kernel: the reference (same semantics)
        return _ref.row_patch(dst, orig_src, dst_idx, src_idx, alpha)
    if len(dims) == 0:
        F, F2, sd1, sd2, ss1, ss2, two_d = 1, 1, 0, 0, 0, 0, False
    elif len(dims) == 1:
        (F, (sd1, ss1)), F2, sd2, ss2, two_d = dims[0], 1, 0, 0, False
    else:
        (F1, (sd1, ss1)), (F2, (sd2, ss2)) = dims
        F, two_d = F1 * F2, True
    dst_off = _offsets(dst_idx, dst.stride())
    keep = _ref.last_occurrence_mask(_ref.position_keys(dst_idx, dst.shape)).to(torch.int8)
    a = alpha.to(torch.float32).contiguous() if alpha is not None else dst_off  # dummy pointer when None
    BLOCK = min(triton.next_power_of_2(F), PATCH_BLOCK)
    grid = (K, triton.cdiv(F, BLOCK))
    _row_patch_kernel[grid](
        dst, src, dst_off, src_off, keep, a,
        F, F2, sd1, sd2, ss1, ss2,
        HAS_ALPHA=alpha is not None, TWO_D=two_d, BLOCK=BLOCK, num_warps=_warps(BLOCK),
    )
    return dst


def add_scaled(x, v, idx, alpha, norm=None, renorm=False):
    K = idx.shape[0]
    F = x.shape[2]
    if F > MAX_ROW_BLOCK:
        return _ref.add_scaled(x, v, idx, alpha, norm, renorm)
    if v.dtype != x.dtype and v.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        v = v.to(torch.float32)
    x_off = _offsets(idx, x.stride())
    perm, run = _runs(_ref.position_keys(idx, x.shape))
    if v.dim() == 1:
        sv0, sv1 = 0, v.stride(0)
    else:
        sv0, sv1 = v.stride(0), v.stride(1)
    BLOCK = triton.next_power_of_2(F)
    _add_scaled_kernel[(K,)](
        x, v, x_off, perm, run, alpha.to(torch.float32).contiguous(),
        F, x.stride(2), sv0, sv1,
        RELATIVE=norm == "relative", RENORM=bool(renorm), BLOCK=BLOCK, num_warps=_warps(BLOCK),
    )
    return x


def noise(x, idx, std, seeds):
    K = idx.shape[0]
    F = x.shape[2]
    x_off = _offsets(idx, x.stride())
    perm, run = _runs(_ref.position_keys(idx, x.shape))
    BLOCK = min(triton.next_power_of_2(F), NOISE_BLOCK)
    grid = (K, triton.cdiv(F, BLOCK))
    _noise_kernel[grid](
        x, x_off, perm, run, std.to(torch.float32).contiguous(), seeds.to(torch.int64).contiguous(),
        F, x.stride(2), BLOCK=BLOCK, num_warps=_warps(BLOCK),
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
    keep = None
    direct, srow = False, 0
    if idx is not None:
        row_off = _offsets(idx, x.stride())
        keep = _ref.last_occurrence_mask(_ref.position_keys(idx, x.shape)).to(torch.int8)
        M = idx.shape[0]
    else:
        lead = _coalesce(x.shape[:-1], x.stride()[:-1])
        M = 1
        for s in x.shape[:-1]:
            M *= int(s)
        if len(lead) <= 1:
            direct = True
            srow = lead[0][1][0] if lead else 0
            row_off = Lc  # dummy
        else:
            row_off = torch.zeros((), dtype=torch.int64, device=x.device)
            for s, st in zip(x.shape[:-1], x.stride()[:-1]):
                row_off = row_off[..., None] + torch.arange(s, device=x.device, dtype=torch.int64) * st
            row_off = row_off.reshape(-1).contiguous()
    BLOCK_K = max(16, triton.next_power_of_2(RK))
    BLOCK_M = 32 if M >= 8192 else 16
    BLOCK_F = 64 if BLOCK_K > 32 else 128
    grid = (triton.cdiv(M, BLOCK_M),)
    _project_kernel[grid](
        x, row_off, keep if keep is not None else Lc, Lc, Rc, muc,
        M, F, RK, x.stride(-1), srow,
        HAS_MU=mu is not None, HAS_KEEP=keep is not None, DIRECT=direct,
        BLOCK_M=BLOCK_M, BLOCK_F=BLOCK_F, BLOCK_K=BLOCK_K, num_warps=4,
    )
    return x
