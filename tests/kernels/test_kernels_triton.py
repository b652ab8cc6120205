"""Triton kernels (run by Triton's CPU interpreter) against the torch reference.

Random shapes, dtypes, memory layouts (transposed, stepped, padded, permuted feature dims),
duplicated and empty index sets. Tensors live inside sentinel-filled buffers and start with random
values, so an element the kernel fails to write, writes twice or writes out of place shows up as a
difference from the reference or a changed sentinel.
"""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytest.importorskip("triton")

from kernel_helpers import DEVICE, DTYPES, LAYOUTS, assert_close, dev, gaps_unchanged, make  # noqa: E402

import interp.kernels as K  # noqa: E402
from interp.kernels import reference as ref  # noqa: E402

SETTINGS = settings(
    max_examples=int(os.environ.get("INTERP_KERNEL_EXAMPLES", "50")),
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


def _tk():
    from interp.kernels import triton as tk

    if DEVICE.type == "cpu":
        assert tk.INTERPRETED, "interp.kernels.triton was imported before TRITON_INTERPRET=1 was set"
    else:
        assert not tk.INTERPRETED, f"INTERP_TEST_DEVICE={DEVICE} runs compiled kernels: unset TRITON_INTERPRET"
    return tk


def run_both(monkeypatch, fn, tensors, *args, **kw):
    """Run fn under both backends on copies of ``tensors`` (list of (base, view)); returns the
    base buffers after triton and after torch. Tensor arguments move to the test device."""
    args = [dev(a) for a in args]
    kw = {k: dev(v) for k, v in kw.items()}
    outs = {}
    for name in ("triton", "torch"):
        monkeypatch.setenv("INTERP_KERNELS", name)
        copies = []
        for base, view in tensors:
            b = base.clone()
            v = torch.as_strided(b, view.shape, view.stride(), view.storage_offset())
            copies.append((b, v))
        ret = fn(*[v for _, v in copies], *args, **kw)
        assert ret is copies[0][1] or ret.data_ptr() == copies[0][1].data_ptr()
        outs[name] = copies
    return outs


def _idx(draw, K_, dims, dup):
    """[K, m] index over dims; dup -> draw from a tiny range so entries repeat."""
    cols = []
    for d in dims:
        hi = min(d, 2) if dup else d
        cols.append(torch.tensor(draw(st.lists(st.integers(0, hi - 1), min_size=K_, max_size=K_)), dtype=torch.int64))
    if K_ == 0:
        return torch.zeros((0, len(dims)), dtype=torch.int64)
    return torch.stack(cols, 1)


dtypes = st.sampled_from(DTYPES)
layouts = st.sampled_from(LAYOUTS)


@pytest.fixture(autouse=True)
def _interpreter():
    _tk()


@SETTINGS
@given(data=st.data())
def test_row_patch_matches_reference(monkeypatch, data):
    draw = data.draw
    dtype = draw(dtypes)
    m = draw(st.sampled_from([2, 3]))
    nfeat = draw(st.integers(1, 3)) if m == 2 else draw(st.integers(1, 2))
    feat = tuple(draw(st.integers(1, 6)) for _ in range(nfeat))
    N, T, M, S = (draw(st.integers(1, 4)) for _ in range(4))
    H = draw(st.integers(1, 3))
    dshape = (N, T, H)[:m] + feat
    sshape = (M, S, H)[:m] + feat
    Kn = draw(st.integers(0, 10))
    dup = draw(st.booleans())
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    dst = make(dshape, dtype, draw(layouts), g)
    src = make(sshape, dtype, draw(layouts), g)
    di = _idx(draw, Kn, dshape[:m], dup)
    si = _idx(draw, Kn, sshape[:m], False)
    alpha = None
    if draw(st.booleans()):
        alpha = torch.rand(Kn, generator=g) * 1.5 - 0.25
    out = run_both(monkeypatch, K.row_patch, [dst, src], di, si, alpha)
    (tb, tv), _ = out["triton"]
    (rb, rv), _ = out["torch"]
    assert gaps_unchanged(tb, tv)
    if alpha is None:
        assert torch.equal(tb, rb), "plain copy must be bitwise equal"
    else:
        assert_close(tv, rv, dtype, "row_patch blend")
        assert torch.equal(tb[tb == -777.0], rb[tb == -777.0])
    # the source is never written
    assert torch.equal(out["triton"][1][0], src[0])


@SETTINGS
@given(data=st.data())
def test_head_patch_matches_reference(monkeypatch, data):
    draw = data.draw
    dtype = draw(dtypes)
    N, T, H, Dh = (draw(st.integers(1, 4)) for _ in range(4))
    Kn = draw(st.integers(0, 8))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    dst = make((N, T, H, Dh), dtype, draw(layouts), g)
    src = make((N + 1, T, H, Dh), dtype, draw(layouts), g)
    di = _idx(draw, Kn, (N, T, H), draw(st.booleans()))
    si = _idx(draw, Kn, (N + 1, T, H), False)
    alpha = torch.rand(Kn, generator=g) if draw(st.booleans()) else None
    out = run_both(monkeypatch, K.head_patch, [dst, src], di, si, alpha)
    (tb, tv), _ = out["triton"]
    (rb, rv), _ = out["torch"]
    assert gaps_unchanged(tb, tv)
    if alpha is None:
        assert torch.equal(tb, rb)
    else:
        assert_close(tv, rv, dtype, "head_patch blend")


def test_row_patch_irregular_features_falls_back(monkeypatch):
    """Three non-mergeable feature dims: handled (by the reference) with identical results."""
    g = torch.Generator().manual_seed(1)
    dst = make((2, 3, 2, 3, 4), torch.float32, "featperm", g)
    src = make((2, 3, 2, 3, 4), torch.float32, "contig", g)
    di = torch.tensor([[0, 1], [1, 2]])
    si = torch.tensor([[1, 0], [0, 0]])
    out = run_both(monkeypatch, K.row_patch, [dst, src], di, si, torch.tensor([0.3, 1.0]))
    assert torch.equal(out["triton"][0][0], out["torch"][0][0])


@pytest.mark.parametrize("alpha", [None, torch.tensor([0.5, 0.5, 0.5])])
def test_row_patch_aliased_source(monkeypatch, alpha):
    """src is dst: all sources are read before any write (a swap of two rows works)."""
    g = torch.Generator().manual_seed(2)
    base, x = make((3, 4, 5), torch.float32, "contig", g)
    di = dev(torch.tensor([[0, 0], [0, 1], [2, 3]]))
    si = dev(torch.tensor([[0, 1], [0, 0], [0, 0]]))
    alpha = dev(alpha)
    res = {}
    for name in ("triton", "torch"):
        monkeypatch.setenv("INTERP_KERNELS", name)
        y = x.clone()
        res[name] = K.row_patch(y, y, di, si, alpha)
    assert torch.equal(res["triton"], res["torch"])
    if alpha is None:
        assert torch.equal(res["torch"][0, 0], x[0, 1]) and torch.equal(res["torch"][0, 1], x[0, 0])
        assert torch.equal(res["torch"][2, 3], x[0, 0])


@SETTINGS
@given(data=st.data())
def test_add_scaled_matches_reference(monkeypatch, data):
    draw = data.draw
    dtype = draw(dtypes)
    N, T = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    F = draw(st.integers(1, 40))
    Kn = draw(st.integers(0, 8))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    x = make((N, T, F), dtype, draw(layouts), g)
    per_entry = draw(st.booleans())
    v = torch.randn((Kn, F) if per_entry else (F,), generator=g).to(draw(st.sampled_from([dtype, torch.float32])))
    if draw(st.booleans()):
        v = v * 0  # zero vector: relative scale is defined as 0
    idx = _idx(draw, Kn, (N, T), draw(st.booleans()))
    alpha = draw(st.sampled_from(["tensor", 0.0, 0.7]))
    if alpha == "tensor":
        alpha = torch.randn(Kn, generator=g)
        alpha[::3] = 0.0
    norm = draw(st.sampled_from([None, "relative"]))
    renorm = draw(st.booleans())
    out = run_both(monkeypatch, K.add_scaled, [x], v, idx, alpha, norm=norm, renorm=renorm)
    (tb, tv), = out["triton"]
    (rb, rv), = out["torch"]
    assert gaps_unchanged(tb, tv)
    assert_close(tv, rv, dtype, f"add_scaled norm={norm} renorm={renorm}")
    # positions whose every entry has alpha == 0 (or that are not indexed) are bitwise unchanged
    a = alpha if isinstance(alpha, torch.Tensor) else torch.full((Kn,), float(alpha))
    touched = torch.zeros((N, T), dtype=torch.bool)
    for k in range(Kn):
        if a[k] != 0:
            touched[idx[k, 0], idx[k, 1]] = True
    touched = dev(touched)
    assert torch.equal(tv[~touched], x[1][~touched])


@SETTINGS
@given(data=st.data())
def test_noise_matches_reference(monkeypatch, data):
    draw = data.draw
    dtype = draw(dtypes)
    N, T = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    F = draw(st.integers(1, 70))
    Kn = draw(st.integers(0, 8))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    x = make((N, T, F), dtype, draw(layouts), g)
    idx = _idx(draw, Kn, (N, T), draw(st.booleans()))
    std = draw(st.sampled_from(["tensor", 0.5]))
    if std == "tensor":
        std = torch.rand(Kn, generator=g) * 2
        std[::4] = 0.0
    seeds = torch.tensor(draw(st.lists(st.integers(-(2**63), 2**63 - 1), min_size=Kn, max_size=Kn)), dtype=torch.int64)
    out = run_both(monkeypatch, K.noise, [x], idx, std, seeds)
    (tb, tv), = out["triton"]
    (rb, rv), = out["torch"]
    assert gaps_unchanged(tb, tv)
    assert_close(tv, rv, dtype, "noise")


def test_noise_philox_bits_identical():
    """The Philox words behind tl.randn and the torch reference are bitwise equal."""
    tk = _tk()
    seeds = torch.tensor([0, 1, -1, 12345, 2**32, 2**40 + 7, -(2**63), 2**63 - 1])
    a1, a2 = (a.cpu() for a in tk.philox_bits(dev(seeds), 300))
    b1, b2 = ref.philox_bits(seeds, 300)
    assert torch.equal(a1, b1) and torch.equal(a2, b2)


def test_noise_normals_agree_to_rounding(monkeypatch):
    """Box-Muller on the same bits: the normals differ only by the last-ulp rounding of log/cos."""
    x = dev(torch.zeros(1, 64, 257))
    idx = dev(torch.stack([torch.zeros(64, dtype=torch.int64), torch.arange(64)], 1))
    seeds = dev(torch.arange(64) * 7919 - 100)
    res = {}
    for name in ("triton", "torch"):
        monkeypatch.setenv("INTERP_KERNELS", name)
        res[name] = K.noise(x.clone(), idx, 1.0, seeds)
    d = (res["triton"] - res["torch"]).abs()
    assert d.max().item() <= 4e-6 * max(1.0, res["torch"].abs().max().item())
    assert (d == 0).float().mean().item() > 0.5  # most are bitwise equal


@SETTINGS
@given(data=st.data())
def test_project_matches_reference(monkeypatch, data):
    draw = data.draw
    dtype = draw(dtypes)
    N, T = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    F = draw(st.integers(1, 150))
    k = draw(st.integers(1, 64))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    x = make((N, T, F), dtype, draw(layouts), g)
    L = torch.randn(F, k, generator=g) / F**0.5
    R = torch.randn(k, F, generator=g) / F**0.5
    mu = torch.randn(F, generator=g) if draw(st.booleans()) else None
    idx = None
    if draw(st.booleans()):
        idx = _idx(draw, draw(st.integers(0, 8)), (N, T), draw(st.booleans()))
    out = run_both(monkeypatch, K.project, [x], L, R, mu, idx)
    (tb, tv), = out["triton"]
    (rb, rv), = out["torch"]
    assert gaps_unchanged(tb, tv)
    # on a GPU bfloat16 x takes the products in bfloat16 (fp32 accumulation): about 6e-3 at F = 4096
    assert_close(tv, rv, dtype, "project", tolerance=2e-2 if dtype == torch.bfloat16 else None)
    if idx is not None:
        touched = torch.zeros((N, T), dtype=torch.bool)
        touched[idx[:, 0], idx[:, 1]] = True
        touched = dev(touched)
        assert torch.equal(tv[~touched], x[1][~touched])


@pytest.mark.parametrize("shape", [(7, 33), (2, 3, 4, 20)])
def test_project_any_leading_dims(monkeypatch, shape):
    """idx=None projects every row of an [..., F] tensor, including non-mergeable leading dims."""
    g = torch.Generator().manual_seed(3)
    x = dev(torch.randn(shape, generator=g))
    if len(shape) == 4:
        x = x.permute(2, 0, 1, 3)  # leading dims not mergeable into one stride
    F = x.shape[-1]
    L, R, mu = (dev(torch.randn(*s, generator=g)) for s in ((F, 5), (5, F), (F,)))
    res = {}
    for name in ("triton", "torch"):
        monkeypatch.setenv("INTERP_KERNELS", name)
        res[name] = K.project(x.clone(), L, R, mu)
    assert_close(res["triton"], res["torch"], torch.float32, "project all rows")


def test_triton_backend_reported(monkeypatch):
    monkeypatch.setenv("INTERP_KERNELS", "triton")
    assert K.backend(torch.zeros(1)) == "triton"


@pytest.mark.parametrize("dtype", DTYPES)
def test_multi_block_features(monkeypatch, dtype):
    """Rows split over several feature blocks (small block caps) for patch, blend and noise."""
    tk = _tk()
    monkeypatch.setattr(tk, "PATCH_BLOCK", 16)
    monkeypatch.setattr(tk, "NOISE_BLOCK", 16)
    g = torch.Generator().manual_seed(7)
    dst = make((3, 4, 5, 11), dtype, "featperm", g)  # 55 features in two non-mergeable dims
    src = make((2, 4, 5, 11), dtype, "step", g)
    di = torch.tensor([[0, 1], [2, 3], [0, 1], [1, 0]])
    si = torch.tensor([[1, 2], [0, 0], [1, 3], [0, 1]])
    out = run_both(monkeypatch, K.row_patch, [dst, src], di, si)
    assert torch.equal(out["triton"][0][0], out["torch"][0][0])
    out = run_both(monkeypatch, K.row_patch, [dst, src], di, si, torch.tensor([0.2, 0.4, 0.6, 0.8]))
    assert_close(out["triton"][0][1], out["torch"][0][1], dtype, "multi-block blend")
    x = make((2, 3, 53), dtype, "pad", g)
    out = run_both(monkeypatch, K.noise, [x], torch.tensor([[0, 1], [1, 2], [0, 1]]), 0.5, torch.tensor([5, 6, 7]))
    assert gaps_unchanged(*out["triton"][0])
    assert_close(out["triton"][0][1], out["torch"][0][1], dtype, "multi-block noise")


def _dup_case(g):
    """x [3, 5, 7] and an index with repeated destinations (some listed three times)."""
    x = make((3, 5, 7), torch.float32, "pad", g)
    idx = torch.tensor([[0, 1], [2, 4], [0, 1], [1, 0], [2, 4], [0, 1], [1, 3]])
    return x, idx


@pytest.mark.parametrize("dense", [False, True])
def test_duplicates_with_marks_and_with_dense_keys(monkeypatch, dense):
    """Last-wins (patch, project) and in-order accumulation (add, noise) through the mark buffer, and
    through the dense keys used when the key space is larger than the buffer (MAX_MARK_KEYS)."""
    tk = _tk()
    if dense:
        monkeypatch.setattr(tk, "MAX_MARK_KEYS", 4)
    g = torch.Generator().manual_seed(11)
    x, idx = _dup_case(g)
    src = make((2, 5, 7), torch.float32, "contig", g)
    sidx = torch.tensor([[1, 0], [0, 1], [0, 2], [1, 4], [1, 1], [0, 3], [1, 2]])
    alpha = torch.tensor([0.3, 0.5, 0.7, 0.9, 0.2, 0.4, 0.6])
    out = run_both(monkeypatch, K.row_patch, [x, src], idx, sidx)
    assert torch.equal(out["triton"][0][0], out["torch"][0][0])
    out = run_both(monkeypatch, K.row_patch, [x, src], idx, sidx, alpha)  # a GPU fuses the blend (FMA): close
    assert_close(out["triton"][0][1], out["torch"][0][1], torch.float32, "blend with duplicates")
    out = run_both(monkeypatch, K.add_scaled, [x], torch.randn(7, 7, generator=g), idx, alpha, norm="relative")
    assert_close(out["triton"][0][1], out["torch"][0][1], torch.float32, "add with duplicates")
    out = run_both(monkeypatch, K.noise, [x], idx, 0.5, torch.arange(7) * 3 + 1)
    assert_close(out["triton"][0][1], out["torch"][0][1], torch.float32, "noise with duplicates")
    L, R = torch.randn(7, 2, generator=g), torch.randn(2, 7, generator=g)
    out = run_both(monkeypatch, K.project, [x], L, R, None, idx)
    assert_close(out["triton"][0][1], out["torch"][0][1], torch.float32, "project with duplicates")


def test_marks_of_earlier_calls_never_count(monkeypatch):
    """The mark buffer is reused without clearing: a later call whose entry for a destination has a
    smaller k than an earlier call's last entry still owns it (epochs), also across the epoch wrap."""
    tk = _tk()
    monkeypatch.setenv("INTERP_KERNELS", "triton")
    x = dev(torch.zeros(2, 3, 4))
    src = dev(torch.arange(24, dtype=torch.float32).reshape(2, 3, 4))
    many = dev(torch.tensor([[0, 0], [0, 0], [0, 0], [0, 0], [1, 2]]))
    K.row_patch(x, src, many, many)
    one = dev(torch.tensor([[0, 0]]))
    y = dev(torch.full((2, 3, 4), -1.0))
    K.row_patch(y, src, one, dev(torch.tensor([[1, 1]])))
    assert torch.equal(y[0, 0], src[1, 1]) and (y[1] == -1).all()
    marks = tk._marks_for(x.device, 6)
    marks.epoch = (1 << 31) - 2  # the next call wraps: the buffer is cleared and the epoch restarts
    for _ in range(2):
        z = dev(torch.zeros(2, 3, 4))
        K.row_patch(z, src, one, dev(torch.tensor([[1, 2]])))
        assert torch.equal(z[0, 0], src[1, 2])
    assert marks.epoch == 2


def test_unchecked_out_of_range_entries_are_skipped(monkeypatch):
    """check=False: no range check on the host; the kernels skip out-of-range entries and write nothing
    outside the tensor (the sentinel gaps stay), while the valid entries are applied."""
    monkeypatch.setenv("INTERP_KERNELS", "triton")
    g = torch.Generator().manual_seed(5)
    base, x = make((2, 3, 6), torch.float32, "pad", g)
    sbase, src = make((2, 3, 6), torch.float32, "contig", g)
    before = x.clone()
    di = dev(torch.tensor([[0, 1], [2, 0], [1, -1], [1, 2]]))
    si = dev(torch.tensor([[1, 1], [0, 0], [0, 0], [0, 7]]))
    K.row_patch(x, src, di, si, check=False)
    assert gaps_unchanged(base, x)
    assert torch.equal(x[0, 1], src[1, 1])       # the one valid entry
    assert torch.equal(x[1], before[1])           # [1, -1] and the source [0, 7] are out of range
    with pytest.raises(K.KernelIndexError):
        K.row_patch(x, src, di, si)
    K.add_scaled(x, dev(torch.ones(6)), dev(torch.tensor([[5, 0], [1, 1]])), 2.0, check=False)
    assert torch.equal(x[1, 1], before[1, 1] + 2.0)
    assert gaps_unchanged(base, x)
