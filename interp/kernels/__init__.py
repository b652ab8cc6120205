"""Fused patching kernels: row patch/blend, head patch, norm-relative add, low-rank projection and
seeded noise, each applied in place at many (row, position[, head]) sites in one call.

Dispatch: the Triton kernels (``interp.kernels.triton``) for CUDA tensors, the torch reference
(``interp.kernels.reference``) elsewhere. The environment variable ``INTERP_KERNELS`` forces one:

* ``auto`` (default): Triton on CUDA tensors of dtype fp16/bf16/fp32, the reference otherwise;
* ``torch``: always the reference;
* ``triton``: always Triton. On CPU tensors this needs Triton's interpreter, i.e.
  ``TRITON_INTERPRET=1`` set before ``interp.kernels.triton`` (and triton) is imported.

Triton is imported lazily, on the first call that needs it. Inputs are validated here, before any
write, so a bad call raises :class:`KernelError` (a ``ValueError``; out-of-range indices raise
:class:`KernelIndexError`, also an ``IndexError``) and never writes out of bounds. Validating index
ranges reads the indices once (one host sync on CUDA); ``check=False`` skips that read for callers
that built the indices themselves: the Triton kernels then skip out-of-range entries (nothing is
written out of bounds, and nothing is reported), the reference raises torch's own index error.
Empty index sets are no-ops.

See ``interp/kernels/reference.py`` for the exact semantics (duplicates, rounding).
"""

from __future__ import annotations

import numbers
import os

import torch

from . import reference as _ref

__all__ = [
    "row_patch",
    "head_patch",
    "add_scaled",
    "project",
    "noise",
    "backend",
    "KernelError",
    "KernelIndexError",
    "KernelBackendError",
]

ENV_VAR = "INTERP_KERNELS"
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
FLOAT_DTYPES = TRITON_DTYPES + (torch.float64,)
MAX_TRITON_RANK = 64


class KernelError(ValueError):
    """A kernel was called with bad inputs (nothing was written)."""


class KernelIndexError(KernelError, IndexError):
    """An index is out of range for the tensor it indexes (nothing was written)."""


class KernelBackendError(RuntimeError):
    """The requested kernel backend cannot run here."""


# --------------------------------------------------------------------------------------------
# backend selection
# --------------------------------------------------------------------------------------------


def _mode() -> str:
    mode = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if mode not in ("auto", "torch", "triton"):
        raise KernelError(f"{ENV_VAR}={mode!r} is not a valid choice; expected one of 'auto', 'torch', 'triton'")
    return mode


def _triton_importable() -> bool:
    try:
        import importlib.util

        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):
        return False


def backend(t: torch.Tensor) -> str:
    """'triton' or 'torch': the implementation dispatch uses for ops on tensor ``t``."""
    mode = _mode()
    if mode == "torch":
        return "torch"
    if mode == "triton":
        return "triton"
    if t.is_cuda and t.dtype in TRITON_DTYPES and _triton_importable():
        return "triton"
    return "torch"


def _triton(t: torch.Tensor):
    """The Triton module, after checking it can run on ``t``'s device and dtype."""
    try:
        from . import triton as tk
    except ImportError as e:  # pragma: no cover - triton is a test dependency
        raise KernelBackendError(
            f"the triton kernel backend was requested ({ENV_VAR}={os.environ.get(ENV_VAR, 'auto')}) but triton "
            f"cannot be imported ({e}); install triton or set {ENV_VAR}=torch"
        ) from e
    if t.device.type != "cuda" and not tk.INTERPRETED:
        raise KernelBackendError(
            f"{ENV_VAR}=triton on a {t.device.type} tensor needs Triton's interpreter, but it is not active: set "
            "the environment variable TRITON_INTERPRET=1 before triton (and interp.kernels.triton) is imported, "
            f"or use {ENV_VAR}=auto/torch to run the torch reference on {t.device.type}"
        )
    if t.dtype not in TRITON_DTYPES:
        raise KernelError(
            f"the triton kernels support float16, bfloat16 and float32 tensors, got {t.dtype}; "
            f"use {ENV_VAR}=auto or torch for {t.dtype}"
        )
    return tk


# --------------------------------------------------------------------------------------------
# validation helpers
# --------------------------------------------------------------------------------------------


def _tensor(name: str, t, *, floating=True) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise KernelError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if floating and t.dtype not in FLOAT_DTYPES:
        raise KernelError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
    return t


def _same_device(name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor):
    if t.device != ref.device:
        raise KernelError(f"device mismatch: {name} is on {t.device} but {ref_name} is on {ref.device}; "
                          f"expected both on {ref.device}")


def _index(name: str, idx, ref_name: str, ref: torch.Tensor, widths) -> torch.Tensor:
    if not isinstance(idx, torch.Tensor):
        raise KernelError(f"{name} must be an int64 torch.Tensor of shape [K, m], got {type(idx).__name__}")
    if idx.dtype == torch.bool or idx.is_floating_point() or idx.is_complex():
        raise KernelError(f"{name} must be an integer (int64) tensor, got {idx.dtype}")
    _same_device(name, idx, ref_name, ref)
    if idx.dim() != 2 or idx.shape[1] not in widths:
        want = " or ".join(f"[K, {w}]" for w in widths)
        raise KernelError(f"{name} must have shape {want}, got {list(idx.shape)}")
    return idx.to(torch.int64)


def _check_ranges(checks):
    """checks: list of (idx_name, idx [K, m], tensor_name, shape). Each index's per-column min and max in
    one reduction, read back together: one host sync when all are fine."""
    checks = [c for c in checks if c[1].shape[0] > 0]
    if not checks:
        return
    ext = torch.cat([torch.stack(torch.aminmax(idx, dim=0)).reshape(-1) for _, idx, _, _ in checks]).tolist()
    at = 0
    axes = ("row", "pos", "head")
    for iname, idx, tname, shape in checks:
        m = idx.shape[1]
        lo, hi = ext[at:at + m], ext[at + m:at + 2 * m]
        at += 2 * m
        if all(lo[j] >= 0 and hi[j] < int(shape[j]) for j in range(m)):
            continue
        bounds = torch.tensor([int(s) for s in shape[:m]], dtype=torch.int64, device=idx.device)
        bad = ((idx < 0) | (idx >= bounds)).any(1)
        k = int(torch.nonzero(bad)[0, 0].item())
        entry = tuple(int(v) for v in idx[k].tolist())
        limits = ", ".join(f"0 <= {axes[j]} < {int(shape[j])}" for j in range(m))
        raise KernelIndexError(
            f"{iname}[{k}] = {entry} is out of range for {tname} of shape {list(shape)} "
            f"(expected {limits}; {int(bad.sum().item())} of {idx.shape[0]} entries out of range)"
        )


def _per_entry(name: str, a, K: int, ref: torch.Tensor) -> float | torch.Tensor:
    """A python number (kept as a float: the kernels take it as a scalar) or a tensor of shape [] / [K]
    (-> compute-dtype tensor [K] on ref's device)."""
    cd = _ref.compute_dtype(ref.dtype)
    if isinstance(a, bool):
        raise KernelError(f"{name} must be a float or a float tensor of shape [K], got a bool")
    if isinstance(a, numbers.Real):
        return float(a)
    if not isinstance(a, torch.Tensor):
        raise KernelError(f"{name} must be a float or a float tensor of shape [{K}], got {type(a).__name__}")
    _same_device(name, a, "the tensor it applies to", ref)
    if a.dim() == 0:
        return a.to(cd).expand(K).contiguous()
    if a.dim() != 1 or a.shape[0] != K:
        raise KernelError(f"{name} must be a float or a tensor of shape [{K}] (one value per index entry), "
                          f"got shape {list(a.shape)}")
    return a.to(cd)


# --------------------------------------------------------------------------------------------
# ops
# --------------------------------------------------------------------------------------------


def _validate_patch(dst, src, dst_idx, src_idx, alpha, widths, check):
    _tensor("dst", dst)
    _tensor("src", src)
    _same_device("src", src, "dst", dst)
    if src.dtype != dst.dtype:
        raise KernelError(f"dtype mismatch: dst is {dst.dtype} but src is {src.dtype}; "
                          "expected src.dtype == dst.dtype (cast src first)")
    dst_idx = _index("dst_idx", dst_idx, "dst", dst, widths)
    src_idx = _index("src_idx", src_idx, "dst", dst, widths)
    if dst_idx.shape != src_idx.shape:
        raise KernelError(
            f"dst_idx and src_idx must have the same shape [K, m], got {list(dst_idx.shape)} and {list(src_idx.shape)}"
        )
    K, m = dst_idx.shape
    for name, t in (("dst", dst), ("src", src)):
        if t.dim() < m:
            raise KernelError(f"{name} must have at least {m} dims to be indexed by [K, {m}] indices, "
                              f"got shape {list(t.shape)}")
    if dst.shape[m:] != src.shape[m:]:
        raise KernelError(
            f"feature-size mismatch: dst features {list(dst.shape[m:])} (dims after the first {m}) differ "
            f"from src features {list(src.shape[m:])}"
        )
    if alpha is not None:
        alpha = _per_entry("alpha", alpha, K, dst)
    if check:
        _check_ranges([("dst_idx", dst_idx, "dst", dst.shape), ("src_idx", src_idx, "src", src.shape)])
    return dst_idx, src_idx, alpha


def row_patch(dst, src, dst_idx, src_idx, alpha=None, *, check=True):
    """In place: ``dst[dst_idx[k]] = (1 - alpha[k]) * dst[dst_idx[k]] + alpha[k] * src[src_idx[k]]``.

    dst: [N, T, *F]; src: [M, S, *F]; dst_idx, src_idx: int64 [K, m], m = 2 (row, pos) or 3
    (row, pos, head), indexing the first m dims; the remaining dims are the feature vector.
    alpha: None (an exact copy) or a float tensor [K] (or a float). The blend is computed in fp32
    and stored in dst's dtype. All reads happen before any write; for duplicated destinations the
    last entry wins. check=False skips the index range check (see the module doc). Returns dst.
    """
    dst_idx, src_idx, alpha = _validate_patch(dst, src, dst_idx, src_idx, alpha, (2, 3), check)
    K = dst_idx.shape[0]
    if K == 0 or dst.numel() == 0:
        return dst
    if backend(dst) == "triton":
        return _triton(dst).row_patch(dst, src, dst_idx, src_idx, alpha)
    return _ref.row_patch(dst, src, dst_idx, src_idx, None if alpha is None else _ref.entries(alpha, K, dst))


def head_patch(dst, src, dst_idx, src_idx, alpha=None, *, check=True):
    """Head-wise patch on [N, T, H, Dh] tensors with [K, 3] (row, pos, head) indices; see row_patch."""
    _tensor("dst", dst)
    _tensor("src", src)
    for name, t in (("dst", dst), ("src", src)):
        if t.dim() != 4:
            raise KernelError(f"head_patch expects {name} of shape [N, T, H, Dh], got shape {list(t.shape)}")
    dst_idx, src_idx, alpha = _validate_patch(dst, src, dst_idx, src_idx, alpha, (3,), check)
    K = dst_idx.shape[0]
    if K == 0 or dst.numel() == 0:
        return dst
    if backend(dst) == "triton":
        return _triton(dst).row_patch(dst, src, dst_idx, src_idx, alpha)
    return _ref.head_patch(dst, src, dst_idx, src_idx, None if alpha is None else _ref.entries(alpha, K, dst))


def _validate_rows(x, idx, name="x"):
    _tensor(name, x)
    if x.dim() != 3:
        raise KernelError(f"{name} must have shape [N, T, F], got shape {list(x.shape)}")
    idx = _index("idx", idx, name, x, (2,))
    return idx


def add_scaled(x, v, idx, alpha, norm=None, renorm=False, *, check=True, unique=False):
    """In place at each (row, pos) of idx: ``x += alpha * v`` (norm=None) or
    ``x += alpha * v * ||x|| / ||v||`` (norm="relative"); with renorm=True the row is then
    rescaled to its norm before the update. alpha == 0 leaves x bitwise unchanged.

    x: [N, T, F]; v: [F] or [K, F]; idx: int64 [K, 2]; alpha: float or tensor [K].
    Duplicated positions receive every entry's update, in index order. unique=True promises the
    positions are distinct: the reference then skips its duplicate check (no host read, no graph break
    under torch.compile); a wrong promise makes duplicates last-write-wins. Returns x.
    """
    idx = _validate_rows(x, idx)
    K = idx.shape[0]
    F = x.shape[2]
    _tensor("v", v)
    _same_device("v", v, "x", x)
    if not ((v.dim() == 1 and v.shape[0] == F) or (v.dim() == 2 and tuple(v.shape) == (K, F))):
        raise KernelError(f"v must have shape [F] = [{F}] or [K, F] = [{K}, {F}] to match x's features, "
                          f"got {list(v.shape)}")
    if norm not in (None, "relative"):
        raise KernelError(f"norm must be None or 'relative', got {norm!r}")
    if not isinstance(renorm, bool):
        raise KernelError(f"renorm must be a bool, got {type(renorm).__name__}")
    alpha = _per_entry("alpha", alpha, K, x)
    if check:
        _check_ranges([("idx", idx, "x", x.shape)])
    if K == 0 or x.numel() == 0:
        return x
    if backend(x) == "triton":
        return _triton(x).add_scaled(x, v, idx, alpha, norm, renorm)
    return _ref.add_scaled(x, v, idx, _ref.entries(alpha, K, x), norm, renorm, unique)


def project(x, L, R, mu=None, idx=None, *, check=True):
    """In place: ``x <- x - ((x - mu) @ R.T) @ L.T`` on every row of x ([..., F]) or, with idx
    (int64 [K, 2]), only at those (row, pos) of a [N, T, F] x. L: [F, k]; R: [k, F]; mu: [F] or
    None. Computed in fp32; on the Triton path a float16/bfloat16 x takes the two products with 16-bit
    inputs and fp32 accumulation (tensor cores: 3-6x faster; relative error about 7e-4 for float16 and
    6e-3 for bfloat16 against the fp32 reference on an H200). Duplicated positions are projected once.
    Returns x."""
    _tensor("x", x)
    if x.dim() < 1:
        raise KernelError("x must have at least one dim (the features)")
    F = x.shape[-1]
    _tensor("L", L)
    _tensor("R", R)
    _same_device("L", L, "x", x)
    _same_device("R", R, "x", x)
    if L.dim() != 2 or L.shape[0] != F:
        raise KernelError(f"L must have shape [F, k] with F = {F} (x's features), got {list(L.shape)}")
    k = L.shape[1]
    if R.dim() != 2 or tuple(R.shape) != (k, F):
        raise KernelError(f"R must have shape [k, F] = [{k}, {F}] (k from L's shape {list(L.shape)}), "
                          f"got {list(R.shape)}")
    if mu is not None:
        _tensor("mu", mu)
        _same_device("mu", mu, "x", x)
        if mu.dim() != 1 or mu.shape[0] != F:
            raise KernelError(f"mu must have shape [F] = [{F}] or be None, got {list(mu.shape)}")
    if idx is not None:
        idx = _validate_rows(x, idx)
        if check:
            _check_ranges([("idx", idx, "x", x.shape)])
        if idx.shape[0] == 0:
            return x
    if x.numel() == 0 or k == 0:
        return x
    if backend(x) == "triton" and (k <= MAX_TRITON_RANK or _mode() == "triton"):
        return _triton(x).project(x, L, R, mu, idx)
    return _ref.project(x, L, R, mu, idx)


def noise(x, idx, std, seeds, *, check=True, unique=False):
    """In place: ``x[r, p, f] += std[k] * z(seeds[k], f)`` at each (r, p) = idx[k], where z is a
    standard normal from counter-based Philox4x32-10 keyed by (seed, f) (Box-Muller, the same
    stream as ``tl.randn(seed, f)``): deterministic, independent of K's order and of the other
    entries. x: [N, T, F]; idx: int64 [K, 2]; std: float or tensor [K]; seeds: int64 [K] (or an
    int, used for every entry). Duplicated positions receive every entry's noise; unique=True as in
    add_scaled. Returns x."""
    idx = _validate_rows(x, idx)
    K = idx.shape[0]
    std = _per_entry("std", std, K, x)
    if isinstance(seeds, bool):
        raise KernelError("seeds must be an int64 tensor of shape [K] or an int, got a bool")
    if isinstance(seeds, numbers.Integral):
        seeds = torch.full((K,), int(seeds), dtype=torch.int64, device=x.device)
    if not isinstance(seeds, torch.Tensor):
        raise KernelError(f"seeds must be an int64 tensor of shape [{K}] or an int, got {type(seeds).__name__}")
    if seeds.dtype == torch.bool or seeds.is_floating_point() or seeds.is_complex():
        raise KernelError(f"seeds must be an integer (int64) tensor, got {seeds.dtype}")
    _same_device("seeds", seeds, "x", x)
    if seeds.dim() != 1 or seeds.shape[0] != K:
        raise KernelError(f"seeds must have shape [K] = [{K}] (one seed per index entry), got {list(seeds.shape)}")
    seeds = seeds.to(torch.int64)
    if check:
        _check_ranges([("idx", idx, "x", x.shape)])
    if K == 0 or x.numel() == 0:
        return x
    if backend(x) == "triton":
        return _triton(x).noise(x, idx, std, seeds)
    return _ref.noise(x, idx, _ref.entries(std, K, x), seeds, unique)
