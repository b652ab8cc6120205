"""unique=True (the caller knows the positions are distinct) gives the reference's exact result without
its duplicate check, and so without a graph break under torch.compile."""
from __future__ import annotations

import pytest
import torch

from interp import kernels as K


def _distinct_idx(g, N, T, k):
    flat = torch.randperm(N * T, generator=g)[:k]
    return torch.stack([flat // T, flat % T], 1)


@pytest.mark.parametrize("norm,renorm", [(None, False), ("relative", False), ("relative", True)])
def test_add_unique_equals_checked(norm, renorm):
    g = torch.Generator().manual_seed(0)
    for trial in range(20):
        x = torch.randn(3, 7, 16, generator=g)
        idx = _distinct_idx(g, 3, 7, 1 + trial % 21)
        alpha = torch.randn(idx.shape[0], generator=g)
        alpha[::3] = 0
        v = torch.randn(16, generator=g)
        a = K.add_scaled(x.clone(), v, idx, alpha, norm=norm, renorm=renorm)
        b = K.add_scaled(x.clone(), v, idx, alpha, norm=norm, renorm=renorm, unique=True)
        assert torch.equal(a, b)


def test_noise_unique_equals_checked():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 9, 32, generator=g)
    idx = _distinct_idx(g, 2, 9, 11)
    seeds = torch.randint(0, 1 << 40, (11,), generator=g)
    assert torch.equal(K.noise(x.clone(), idx, 0.5, seeds), K.noise(x.clone(), idx, 0.5, seeds, unique=True))


def test_unique_add_has_no_graph_break():
    import torch._dynamo as dynamo

    idx = torch.tensor([[0, 1], [1, 3], [0, 4]])
    v = torch.randn(8)

    def f(x):
        y = x * 2
        K.add_scaled(y, v, idx, 0.5, check=False, unique=True)
        return y + 1

    x = torch.randn(2, 5, 8)
    dynamo.reset()
    ex = dynamo.explain(f)(x)
    assert ex.graph_break_count == 0, ex.break_reasons
    dynamo.reset()
    ex_checked = dynamo.explain(lambda x: K.add_scaled(x * 2, v, idx, 0.5, check=False) + 1)(x)
    assert ex_checked.graph_break_count >= 1  # the old path reads the occurrence rank on the host
    want = x * 2
    want[idx[:, 0], idx[:, 1]] += 0.5 * v
    assert torch.allclose(torch.compile(f, backend="eager")(x), want + 1, atol=1e-6)
