"""The torch reference (the default on CPU) against naive python loops: what each op means."""

from __future__ import annotations

import math

import pytest
import torch

import interp.kernels as K
from interp.kernels import reference as ref


@pytest.fixture(autouse=True)
def _torch_backend(monkeypatch):
    monkeypatch.setenv("INTERP_KERNELS", "torch")


def naive_patch(dst, src, di, si, alpha):
    d0, s0 = dst.clone(), src.clone()  # every read before any write
    for k in range(di.shape[0]):
        dk, sk = tuple(di[k].tolist()), tuple(si[k].tolist())
        if alpha is None:
            dst[dk] = s0[sk]
        else:
            a = float(alpha[k])
            dst[dk] = ((1 - a) * d0[dk].float() + a * s0[sk].float()).to(dst.dtype)
    return dst


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m", [2, 3])
@pytest.mark.parametrize("with_alpha", [False, True])
def test_row_patch_is_the_loop(dtype, m, with_alpha):
    g = torch.Generator().manual_seed(0)
    dst = torch.randn(3, 4, 2, 5, generator=g).to(dtype)
    src = torch.randn(2, 5, 2, 5, generator=g).to(dtype)
    di = torch.tensor([[0, 1, 0], [2, 3, 1], [0, 1, 0], [1, 0, 1], [0, 1, 0]])[:, :m]  # (0,1) x3: last wins
    si = torch.tensor([[1, 4, 0], [0, 0, 1], [1, 2, 1], [0, 3, 0], [0, 0, 0]])[:, :m]
    alpha = torch.tensor([0.5, 0.25, 1.0, 0.0, 0.75]) if with_alpha else None
    want = naive_patch(dst.clone(), src, di, si, alpha)
    got = K.row_patch(dst.clone(), src, di, si, alpha)
    assert torch.equal(got, want)


def test_row_patch_copy_is_bitwise_and_last_wins():
    dst = torch.zeros(2, 3, 4)
    src = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(2, 3, 4) + 0.1
    K.row_patch(dst, src, torch.tensor([[1, 2], [1, 2]]), torch.tensor([[0, 0], [1, 1]]))
    assert torch.equal(dst[1, 2], src[1, 1])
    assert dst.sum() == src[1, 1].sum()


def test_blend_reads_destination_before_any_write():
    """Duplicates: the last entry's blend uses the original destination, not an earlier entry's."""
    dst = torch.ones(1, 1, 3)
    src = torch.stack([torch.full((1, 3), 3.0), torch.full((1, 3), 5.0)])
    K.row_patch(dst, src, torch.tensor([[0, 0], [0, 0]]), torch.tensor([[0, 0], [1, 0]]), torch.tensor([0.5, 0.5]))
    assert torch.equal(dst, torch.full((1, 1, 3), 3.0))  # 0.5 * 1 + 0.5 * 5


def test_head_patch_touches_only_the_head():
    g = torch.Generator().manual_seed(1)
    dst = torch.randn(2, 3, 4, 8, generator=g)
    src = torch.randn(2, 3, 4, 8, generator=g)
    out = K.head_patch(dst.clone(), src, torch.tensor([[1, 2, 3]]), torch.tensor([[0, 1, 2]]))
    want = dst.clone()
    want[1, 2, 3] = src[0, 1, 2]
    assert torch.equal(out, want)


def naive_add(x, v, idx, alpha, norm, renorm):
    x = x.clone()
    w = {}
    for k in range(idx.shape[0]):
        r, p = idx[k].tolist()
        h = w.get((r, p), x[r, p].double())
        a = float(alpha[k])
        vk = (v if v.dim() == 1 else v[k]).double()
        if a == 0:
            w[(r, p)] = h
            continue
        n0 = h.norm()
        if norm == "relative":
            y = h + a * vk * (n0 / vk.norm() if vk.norm() > 0 else 0.0)
        else:
            y = h + a * vk
        if renorm and y.norm() > 0:
            y = y * n0 / y.norm()
        w[(r, p)] = y
    for (r, p), y in w.items():
        x[r, p] = y.to(x.dtype)
    return x


@pytest.mark.parametrize("norm", [None, "relative"])
@pytest.mark.parametrize("renorm", [False, True])
@pytest.mark.parametrize("per_entry", [False, True])
def test_add_scaled_is_the_loop(norm, renorm, per_entry):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 4, 16, generator=g)
    idx = torch.tensor([[0, 0], [1, 3], [0, 0], [2, 1], [0, 0]])  # (0,0) three times: all applied in order
    v = torch.randn(5, 16, generator=g) if per_entry else torch.randn(16, generator=g)
    alpha = torch.tensor([0.5, -1.0, 2.0, 0.0, 0.3])
    want = naive_add(x, v, idx, alpha, norm, renorm)
    got = K.add_scaled(x.clone(), v, idx, alpha, norm=norm, renorm=renorm)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_add_relative_and_renorm_properties():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 2, 32, generator=g) * 7
    v = torch.randn(32, generator=g) * 0.01
    idx = torch.tensor([[0, 0]])
    y = K.add_scaled(x.clone(), v, idx, 1.0, norm="relative")
    # the added vector has the norm of the original row
    torch.testing.assert_close((y[0, 0] - x[0, 0]).norm(), x[0, 0].norm(), rtol=1e-5, atol=0)
    z = K.add_scaled(x.clone(), v, idx, 3.0, norm="relative", renorm=True)
    torch.testing.assert_close(z[0, 0].norm(), x[0, 0].norm(), rtol=1e-5, atol=0)
    assert torch.equal(z[0, 1], x[0, 1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_add_alpha_zero_is_bitwise_noop(dtype):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 3, 10, generator=g).to(dtype)
    idx = torch.tensor([[0, 1], [1, 2], [0, 1]])
    for kw in ({}, {"norm": "relative"}, {"renorm": True}, {"norm": "relative", "renorm": True}):
        assert torch.equal(K.add_scaled(x.clone(), torch.randn(10, generator=g), idx, 0.0, **kw), x)
        assert torch.equal(K.add_scaled(x.clone(), torch.randn(10, generator=g), idx, torch.zeros(3), **kw), x)


@pytest.mark.parametrize("with_mu", [False, True])
def test_project_formula(with_mu):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 5, 12, generator=g)
    L, R = torch.randn(12, 3, generator=g), torch.randn(3, 12, generator=g)
    mu = torch.randn(12, generator=g) if with_mu else None
    xd = x.double()
    c = (xd - (mu.double() if with_mu else 0)) @ R.double().T
    want = (xd - c @ L.double().T).float()
    got = K.project(x.clone(), L, R, mu)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # only at idx; duplicates are projected once
    idx = torch.tensor([[0, 1], [1, 4], [0, 1]])
    got = K.project(x.clone(), L, R, mu, idx)
    exp = x.clone()
    exp[0, 1], exp[1, 4] = want[0, 1], want[1, 4]
    torch.testing.assert_close(got, exp, rtol=1e-5, atol=1e-5)


def test_project_leace_style_eraser_removes_the_direction():
    """An orthogonal projection eraser (L = R.T = u) makes every row orthogonal to u."""
    g = torch.Generator().manual_seed(6)
    u = torch.randn(16, 1, generator=g)
    u = u / u.norm()
    x = torch.randn(4, 3, 16, generator=g)
    y = K.project(x.clone(), u, u.T)
    assert (y @ u).abs().max() < 1e-5
    # idempotent
    torch.testing.assert_close(K.project(y.clone(), u, u.T), y, rtol=1e-6, atol=1e-6)


def test_philox_known_answers():
    """Philox4x32-10 known-answer vectors from Random123 (kat_vectors)."""
    def run(ctr, key):
        c = [torch.tensor([v], dtype=torch.int64) for v in ctr]
        k = [torch.tensor([v], dtype=torch.int64) for v in key]
        return [int(t.item()) for t in ref.philox4x32(*c, *k)]

    assert run([0, 0, 0, 0], [0, 0]) == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]
    m = 0xFFFFFFFF
    assert run([m, m, m, m], [m, m]) == [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]
    assert run([0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344], [0xA4093822, 0x299F31D0]) == [
        0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1]


def test_noise_is_keyed_by_seed_and_feature():
    x = torch.zeros(2, 4, 32)
    idx = torch.tensor([[0, 0], [1, 3], [0, 2]])
    seeds = torch.tensor([11, 22, 11])
    a = K.noise(x.clone(), idx, 1.0, seeds)
    b = K.noise(x.clone(), idx, 1.0, seeds)
    assert torch.equal(a, b)  # deterministic
    assert torch.equal(a[0, 0], a[0, 2])  # same seed, same noise
    assert not torch.equal(a[0, 0], a[1, 3])
    perm = torch.tensor([2, 0, 1])
    c = K.noise(x.clone(), idx[perm], 1.0, seeds[perm])
    assert torch.equal(a, c)  # independent of K's order
    d = K.noise(x.clone(), idx[1:2], 1.0, seeds[1:2])
    assert torch.equal(d[1, 3], a[1, 3])  # independent of the other entries
    # z(seed, f) does not depend on F: a prefix of the features sees the same numbers
    e = K.noise(torch.zeros(1, 1, 8), torch.tensor([[0, 0]]), 1.0, torch.tensor([22]))
    assert torch.equal(e[0, 0], a[1, 3, :8])
    # std scales, per entry; std 0 is a bitwise no-op
    s = K.noise(x.clone(), idx, torch.tensor([2.0, 0.0, 0.5]), seeds)
    torch.testing.assert_close(s[0, 0], 2 * a[0, 0])
    assert torch.equal(s[1, 3], x[1, 3])
    # duplicates add both entries' noise
    dd = K.noise(x.clone(), torch.tensor([[0, 0], [0, 0]]), 1.0, torch.tensor([11, 22]))
    torch.testing.assert_close(dd[0, 0], a[0, 0] + a[1, 3])


def test_noise_statistics():
    """z is approximately N(0, 1): moments, 1-sigma mass and no correlation across seeds or features."""
    K_, F = 64, 4096
    z = ref.philox_randn(torch.arange(K_) * 1000003 + 17, F).double()
    n = z.numel()
    assert abs(z.mean().item()) < 5 / math.sqrt(n)
    assert abs(z.var().item() - 1) < 5 * math.sqrt(2 / n)
    assert abs((z.abs() < 1).double().mean().item() - 0.682689) < 0.005
    assert abs((z.abs() < 2).double().mean().item() - 0.954500) < 0.003
    assert abs((z**3).mean().item()) < 0.05  # skew
    assert abs((z**4).mean().item() - 3) < 0.1  # kurtosis
    c_seed = torch.corrcoef(z[:, :])  # rows: different seeds
    off = c_seed[~torch.eye(K_, dtype=torch.bool)]
    assert off.abs().max() < 6 / math.sqrt(F)
    c_feat = (z[:, 1:] * z[:, :-1]).mean().item()
    assert abs(c_feat) < 5 / math.sqrt(n)


def test_empty_index_sets_are_noops():
    x = torch.randn(2, 3, 4)
    e2 = torch.zeros(0, 2, dtype=torch.int64)
    for out in (
        K.row_patch(x.clone(), x, e2, e2),
        K.row_patch(x.clone(), x, e2, e2, torch.zeros(0)),
        K.add_scaled(x.clone(), torch.ones(4), e2, 1.0, norm="relative", renorm=True),
        K.noise(x.clone(), e2, 1.0, torch.zeros(0, dtype=torch.int64)),
        K.project(x.clone(), torch.ones(4, 1), torch.ones(1, 4), None, e2),
    ):
        assert torch.equal(out, x)


def test_ops_return_their_first_argument_and_work_in_place_on_views():
    base = torch.randn(3, 4, 6)
    view = base.transpose(0, 1)  # [4, 3, 6]
    src = torch.randn(1, 1, 6)
    out = K.row_patch(view, src, torch.tensor([[2, 1]]), torch.tensor([[0, 0]]))
    assert out is view
    assert torch.equal(base[1, 2], src[0, 0])


def test_philox_numpy_path_equals_torch_path():
    seeds = torch.tensor([0, 1, -1, 12345, 2**32, 2**40 + 7, -(2**63), 2**63 - 1])
    a = ref._philox_bits_numpy(seeds, 257)
    b = ref.philox_bits(seeds, 257)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
