"""Attribution patching is exact where the metric is linear in the patched site, and is reported
beside exact patching with their correlation."""
from __future__ import annotations

import pytest
import torch

import interp
from interp.metrics import logit_diff
from interventions.attribution import attribution, compare, correlation
from interventions.patching import head_sweep, patch_sweep

T, L = 6, 3
METRIC = logit_diff(5, 9)



def linear_tail_gpt2(zero_last_mlp: bool = True):
    """A tiny GPT-2 whose logits are linear in the last block's MLP output and output (no final
    LayerNorm); with zero_last_mlp, whose last MLP outputs zero whatever its input, also linear in
    the last block's attention heads, attention output and resid_mid."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    m = GPT2LMHeadModel(GPT2Config(n_layer=L, n_embd=32, n_head=4, vocab_size=61, n_positions=16)).eval()
    m.transformer.ln_f = torch.nn.Identity()
    if not zero_last_mlp:
        return m
    with torch.no_grad():
        m.transformer.h[L - 1].mlp.c_proj.weight.zero_()
        m.transformer.h[L - 1].mlp.c_proj.bias.zero_()
    return m


@pytest.fixture(scope="module")
def lm():
    return interp.attach(linear_tail_gpt2())


@pytest.fixture(scope="module")
def lm_mlp():
    return interp.attach(linear_tail_gpt2(zero_last_mlp=False))


def pair():
    g = torch.Generator().manual_seed(2)
    clean = torch.randint(0, 61, (1, T), generator=g)
    return clean, torch.randint(0, 61, (1, T), generator=g)


@pytest.mark.parametrize("kind", ["resid_post", "mlp.out", "attn.out"])
def test_equals_exact_patching_where_the_metric_is_linear(lm, lm_mlp, kind):
    lm = lm_mlp if kind in ("resid_post", "mlp.out") else lm
    clean, corrupted = pair()
    exact = patch_sweep(lm, clean, corrupted, kind, METRIC, layers=[L - 1], progress=False)
    approx = attribution(lm, clean, corrupted, kind, METRIC, layers=[L - 1])
    assert approx.axes == exact.axes == ("layer", "pos") and approx.coords == exact.coords
    torch.testing.assert_close(approx.values, exact.values, atol=1e-4, rtol=1e-4)
    assert float(exact.values.abs().max()) > 0.05  # the comparison is not between two zeros


def test_heads_equal_exact_patching_where_linear(lm):
    clean, corrupted = pair()
    exact = head_sweep(lm, clean, corrupted, METRIC, by_position=True, layers=[L - 1], progress=False)
    approx = attribution(lm, clean, corrupted, "attn.z", METRIC, layers=[L - 1])
    assert approx.axes == ("layer", "head", "pos")
    torch.testing.assert_close(approx.values, exact.values, atol=1e-4, rtol=1e-4)
    per_head = attribution(lm, clean, corrupted, "attn.z", METRIC, layers=[L - 1], by_position=False)
    exact_heads = head_sweep(lm, clean, corrupted, METRIC, layers=[L - 1], progress=False)
    torch.testing.assert_close(per_head.values, exact_heads.values, atol=1e-4, rtol=1e-4)


def test_nonlinear_layers_are_an_estimate_reported_beside_exact(lm):
    clean, corrupted = pair()
    out = compare(lm, clean, corrupted, "resid_pre", METRIC, progress=False)
    assert set(out) == {"exact", "attribution", "correlation"}
    assert out["exact"].shape == out["attribution"].shape == (L, T)
    assert out["correlation"] == pytest.approx(correlation(out["exact"], out["attribution"]))
    assert -1.0 <= out["correlation"] <= 1.0
    # layer 0's last position (everything the last token has seen from itself) is far from linear,
    # so the estimate is not the exact value there
    assert not torch.allclose(out["attribution"].values, out["exact"].values, atol=1e-3)


def test_correlation_of_known_vectors():
    a = interp.Result(torch.tensor([1.0, 2.0, 3.0]), ("x",))
    assert correlation(a, interp.Result(torch.tensor([2.0, 4.0, 6.0]), ("x",))) == pytest.approx(1.0)
    assert correlation(a, interp.Result(torch.tensor([3.0, 2.0, 1.0]), ("x",))) == pytest.approx(-1.0)
    with pytest.raises(ValueError, match="different shapes"):
        correlation(a, interp.Result(torch.zeros(2), ("x",)))


def test_bad_kind(lm):
    clean, corrupted = pair()
    with pytest.raises(ValueError, match="unknown kind"):
        attribution(lm, clean, corrupted, "resid", METRIC)
