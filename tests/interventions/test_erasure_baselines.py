"""LEACE beside oracle LEACE, quadratic LEACE, INLP and RLACE, judged by fresh probes on held-out data."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import interp
from interventions.erasure import LeaceEraser
from interventions.erasure.baselines import (
    OracleLeace,
    QuadraticLeace,
    evaluate,
    heldout_probe,
    inlp,
    rlace,
    splits,
    wilson,
)


def linear_concept(n=1500, d=16, shift=1.5, seed=0):
    """z shifts the mean of x along one random direction (plus correlated noise)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randint(0, 2, (n,), generator=g)
    mix = torch.randn(d, d, generator=g) / d ** 0.5 + torch.eye(d)
    w = torch.randn(d, generator=g)
    x = torch.randn(n, d, generator=g, dtype=torch.float64) @ mix.double().T + shift * z[:, None].double() * w.double()
    return x, z


def variance_concept(n=2000, d=8, seed=0):
    """Same mean for both classes; class 1 has 3x the standard deviation along the first axis."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randint(0, 2, (n,), generator=g)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    x[:, 0] *= 1 + 2 * z.double()
    return x, z


def test_linear_concept_every_eraser_brings_a_fresh_probe_to_chance():
    x, z = linear_concept()
    r = evaluate(x, z, rlace_steps=300)
    assert r["none"]["accuracy"] > 0.8 and not r["none"]["chance_in_ci"]
    for m in ("leace", "oracle_leace", "quadratic_leace", "inlp", "rlace"):
        assert r[m]["chance_in_ci"], (m, r[m])
        assert r[m]["accuracy"] < 0.58, (m, r[m])
    assert r["leace"]["eraser_rank"] == 1 and r["rlace"]["eraser_rank"] == 1
    A, B, C = splits(len(x))
    assert not (set(A.tolist()) & set(B.tolist()) or set(B.tolist()) & set(C.tolist()))


def test_quadratic_leace_removes_what_a_quadratic_probe_reads_and_leace_does_not():
    x, z = variance_concept()
    lin = evaluate(x, z, methods=("none",))
    quad = evaluate(x, z, methods=("none", "leace", "quadratic_leace"), quadratic=True)
    assert lin["none"]["chance_in_ci"]                       # no linear information to begin with
    assert quad["none"]["accuracy"] > 0.7                    # but a quadratic probe reads the variance
    assert quad["leace"]["accuracy"] > 0.7                   # LEACE (linear) leaves it
    assert quad["quadratic_leace"]["chance_in_ci"], quad["quadratic_leace"]


def test_oracle_and_quadratic_equalise_class_statistics():
    x, z = linear_concept(n=600, d=6)
    xo = OracleLeace.fit(x, z)(x, z)
    torch.testing.assert_close(xo[z == 0].mean(0), xo[z == 1].mean(0), rtol=0, atol=1e-9)
    q = QuadraticLeace.fit(x, z)
    xq = q(x, z)
    torch.testing.assert_close(xq[z == 0].mean(0), xq[z == 1].mean(0), rtol=0, atol=1e-9)
    torch.testing.assert_close(torch.cov(xq[z == 0].T), torch.cov(xq[z == 1].T), rtol=0, atol=1e-6)


def test_inlp_and_rlace_are_orthogonal_projections():
    x, z = linear_concept(n=800)
    for er in (inlp(x, z, n_iter=3), rlace(x, z, rank=2, steps=100)):
        P = er.projection()
        torch.testing.assert_close(P @ P, P, rtol=0, atol=1e-9)
        torch.testing.assert_close(P, P.T, rtol=0, atol=1e-9)
    assert rlace(x, z, rank=2, steps=50).rank == 2


def test_below_chance_probe_warns():
    x, z = linear_concept(n=400)
    with pytest.warns(UserWarning, match="below chance"):
        r = heldout_probe(x, z, x, 1 - z)  # scored against flipped labels
    assert r["accuracy"] < r["ci95"][1] < r["chance_range"][0]
    lo, hi = wilson(50, 100)
    assert lo < 0.5 < hi and abs(hi - 0.5 - (0.5 - lo)) < 1e-12


def test_baseline_erasers_run_inside_a_model_through_project(gpt2_tokenizer):
    """INLP / RLACE erasers are LeaceEraser-shaped: the engine's Project op applies exactly er(x)."""
    sys.path.insert(0, str(Path(__file__).parent))
    from editing_models import tiny_gpt2

    lm = interp.attach(tiny_gpt2(gpt2_tokenizer))
    prompts = ["The cat sat on the mat", "A dog ran in the park", "The sun is bright today"]
    acts = torch.cat([lm.capture(p, "blocks.0.resid_post")["blocks.0.resid_post"][0] for p in prompts]).double()
    z = torch.tensor([i % 2 for i in range(len(acts))])
    for er in (inlp(acts, z, n_iter=2), rlace(acts, z, steps=30), LeaceEraser.fit(acts, z)):
        er = er.to(torch.float32)
        out = lm.run(prompts[0], ops=[er.op("blocks.0.resid_post")], capture=["blocks.0.resid_post"])
        base = lm.capture(prompts[0], "blocks.0.resid_post")["blocks.0.resid_post"]
        torch.testing.assert_close(out.cache["blocks.0.resid_post"], er(base), rtol=1e-5, atol=1e-5)
