"""Shared helpers: strided/poisoned tensor factories and tolerance checks."""

from __future__ import annotations

import os

import torch

#: Where the kernel tests run: "cpu" (default; Triton's interpreter) or "cuda" (compiled kernels on a
#: GPU). Set INTERP_TEST_DEVICE=cuda for the second; conftest then leaves TRITON_INTERPRET unset.
DEVICE = torch.device(os.environ.get("INTERP_TEST_DEVICE", "cpu"))

SENTINEL = -777.0  # written into the gaps of strided views: must never change

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
LAYOUTS = ("contig", "transpose01", "step", "pad", "featperm")


def make(shape, dtype, layout, gen, scale=1.0):
    """A tensor of logical ``shape`` with the given memory layout, random values, inside a base
    buffer whose other elements hold SENTINEL. Returns (base, view)."""
    shape = tuple(shape)
    nd = len(shape)
    if layout == "contig":
        base = torch.full(shape, SENTINEL, dtype=dtype)
        view = base
    elif layout == "transpose01":
        bshape = (shape[1], shape[0]) + shape[2:]
        base = torch.full(bshape, SENTINEL, dtype=dtype)
        view = base.transpose(0, 1)
    elif layout == "step":  # every other element of the last dim
        bshape = shape[:-1] + (2 * shape[-1],)
        base = torch.full(bshape, SENTINEL, dtype=dtype)
        view = base[..., ::2]
    elif layout == "pad":  # a slice out of a larger buffer in every dim
        bshape = tuple(s + 1 + (i % 2) for i, s in enumerate(shape))
        base = torch.full(bshape, SENTINEL, dtype=dtype)
        view = base[tuple(slice(1, 1 + s) for s in shape)]
    elif layout == "featperm":  # 3-D: features outermost in memory; 4-D+: trailing dims reversed
        perm = [nd - 1] + list(range(nd - 1)) if nd == 3 else [0, 1] + list(reversed(range(2, nd)))
        bshape = tuple(shape[p] for p in perm)
        base = torch.full(bshape, SENTINEL, dtype=dtype)
        view = base.permute(*[perm.index(i) for i in range(nd)])
    else:
        raise ValueError(layout)
    assert view.shape == shape
    view.copy_((torch.randn(shape, generator=gen) * scale).to(dtype))
    if DEVICE.type != "cpu":  # the base is contiguous, so the view's strides carry over unchanged
        base = base.to(DEVICE)
        view = torch.as_strided(base, view.shape, view.stride(), view.storage_offset())
    return base, view


def dev(x):
    """x on the test device (tensors; anything else unchanged)."""
    return x.to(DEVICE) if isinstance(x, torch.Tensor) else x


def gaps_unchanged(base, view):
    """Every element of base outside view still holds SENTINEL."""
    mask = torch.ones(base.shape, dtype=torch.bool, device=base.device)
    vm = torch.as_strided(mask, view.shape, view.stride(), view.storage_offset() - base.storage_offset())
    vm.fill_(False)
    return bool((base[mask] == SENTINEL).all())


def tol(dtype):
    return 1e-6 if dtype == torch.float32 else 1e-2


def assert_close(got, want, dtype, what="", tolerance=None):
    """Relative error (max abs diff over max |want|) below the dtype's tolerance (or `tolerance`)."""
    g = got.double()
    w = want.double()
    assert torch.isfinite(g).all() == torch.isfinite(w).all(), what
    scale = max(w.abs().max().item(), 1e-30) if w.numel() else 1.0
    err = (g - w).abs().max().item() / scale if w.numel() else 0.0
    t = tolerance or tol(dtype)
    assert err < t, f"{what}: relative error {err:.3g} >= {t} ({dtype})"
