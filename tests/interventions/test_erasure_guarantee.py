"""LEACE's guarantee on a residual stream with a dominant direction (an attention sink: top eigenvalue ~1e7):
a fresh probe trained on erased held-out features is at chance, the cross-covariance is gone, and an eraser
that does not remove it (a cutoff relative to the top eigenvalue) is an error naming the site, never a
silent no-op. Non-finite inputs are refused."""
import math

import pytest
import torch

from interventions.erasure import LeaceEraser, LeaceFitter
from interventions.erasure.leace import ErasureGuaranteeError, ErasureInputError

torch.set_num_threads(1)


def sink_stream(n: int, d: int = 48, seed: int = 0, shift: float = 1.5, sink_sd: float = 3000.0):
    """Features with a correlated bulk (eigenvalues ~0.3-3), one sink direction of variance sink_sd^2 ~ 1e7,
    and a concept z that shifts the bulk by `shift` along a fixed direction."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=torch.Generator().manual_seed(99), dtype=torch.float64) / math.sqrt(d)
    mix = mix + torch.eye(d, dtype=torch.float64)
    u_sink = torch.nn.functional.normalize(torch.randn(d, generator=torch.Generator().manual_seed(7),
                                                       dtype=torch.float64), dim=0)
    delta = torch.nn.functional.normalize(torch.randn(d, generator=torch.Generator().manual_seed(8),
                                                      dtype=torch.float64), dim=0) * shift
    z = torch.randint(0, 2, (n,), generator=g)
    x = torch.randn(n, d, generator=g, dtype=torch.float64) @ mix
    x = x + torch.randn(n, 1, generator=g, dtype=torch.float64) * sink_sd * u_sink + z[:, None] * delta
    return x, z


def probe_accuracy(x_train, z_train, x_test, z_test, iters: int = 200) -> float:
    """A fresh logistic-regression probe (features whitened with the training covariance, LBFGS), accuracy on
    held-out data. Whitening makes it blind to the scale of the sink, so it finds a small shift beside it."""
    mu = x_train.mean(0)
    evals, V = torch.linalg.eigh(torch.cov(x_train.T))
    keep = evals > 1e-9 * evals.max()
    white = V[:, keep] / evals[keep].sqrt()
    a, b = (x_train - mu) @ white, (x_test - mu) @ white
    w = torch.zeros(a.shape[1], dtype=torch.float64, requires_grad=True)
    c = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, c], max_iter=iters, line_search_fn="strong_wolfe")
    y = z_train.double()

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(a @ w + c, y) + 1e-4 * (w * w).sum()
        loss.backward()
        return loss
    opt.step(closure)
    with torch.no_grad():
        return float((((b @ w + c) > 0).long() == z_test).double().mean())


def test_dominant_direction_is_erased_fresh_probe_at_chance():
    x, z = sink_stream(8000)
    fit_x, fit_z, test_x, test_z = x[:4000], z[:4000], x[4000:], z[4000:]
    top = float(torch.linalg.eigvalsh(torch.cov(fit_x.T)).max())
    assert top > 5e6  # the sink dominates the spectrum
    before = probe_accuracy(test_x[:2000], test_z[:2000], test_x[2000:], test_z[2000:])
    assert before > 0.7
    er = LeaceEraser.fit(fit_x, fit_z)
    assert er.rank == 1
    erased = er(test_x)
    after = probe_accuracy(erased[:2000], test_z[:2000], erased[2000:], test_z[2000:])
    assert abs(after - 0.5) < 0.04, (before, after)
    # in sample the class-conditional means are equal: the cross-covariance is gone
    ex = er(fit_x)
    cross = ((ex - ex.mean(0)) * (fit_z.double() - fit_z.double().mean())[:, None]).mean(0)
    assert float(cross.norm()) < 1e-8 * float(fit_x.std(0).norm())
    # the edit is rank one (one direction of change) and small beside the features themselves
    sv = torch.linalg.svdvals(ex - fit_x)
    assert float(sv[1]) < 1e-9 * float(sv[0])
    assert float((ex - fit_x).norm(dim=1).mean()) < 0.05 * float(fit_x.norm(dim=1).mean())


def test_a_cutoff_relative_to_the_top_eigenvalue_is_an_error_naming_the_site():
    x, z = sink_stream(4000)
    fitter = LeaceFitter(x.shape[1], 1, tol=1e-6, site="blocks.20.resid_post").update(x, z)  # the old cutoff
    with pytest.raises(ErasureGuaranteeError, match=r"blocks\.20\.resid_post.*cross-covariance"):
        _ = fitter.eraser


def test_guarantee_checked_on_every_fit_including_low_rank_and_multiclass():
    g = torch.Generator().manual_seed(3)
    base = torch.randn(600, 6, generator=g, dtype=torch.float64)
    x = torch.cat([base, base @ torch.randn(6, 10, generator=g, dtype=torch.float64)], 1)  # rank 6 of 16
    z = torch.randint(0, 4, (600,), generator=g)
    x = x + torch.nn.functional.one_hot(z, 4).double() @ torch.randn(4, 16, generator=g, dtype=torch.float64)
    fitter = LeaceFitter(16, 4, n_classes=4).update(x, z)
    er = fitter.eraser
    after, before = fitter.residual(er)
    assert before > 0.1 and after < 1e-9 * before


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_features_or_labels_are_refused(bad):
    x, z = sink_stream(100)
    x[5, 3] = bad
    with pytest.raises(ErasureInputError, match=r"at 'site\.x'.*NaN / inf"):
        LeaceFitter(48, 1, site="site.x").update(x, z)
    zf = z.double()[:, None].clone()
    zf[2, 0] = bad
    with pytest.raises(ErasureInputError, match="labels z"):
        LeaceFitter(48, 1).update(sink_stream(100)[0], zf)
    with pytest.raises(ErasureInputError, match="tol"):
        LeaceFitter(48, 1, tol=bad)


def _in_sample_logistic_loss(x, z, iters: int = 300) -> float:
    """The smallest mean logistic loss any linear probe reaches on (x, z) itself (whitened features, LBFGS)."""
    mu = x.mean(0)
    evals, V = torch.linalg.eigh(torch.cov(x.T))
    keep = evals > 1e-10 * evals.max()
    a = (x - mu) @ (V[:, keep] / evals[keep].sqrt())
    w = torch.zeros(a.shape[1], dtype=torch.float64, requires_grad=True)
    c = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, c], max_iter=iters, line_search_fn="strong_wolfe")
    y = z.double()

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(a @ w + c, y)
        loss.backward()
        return loss
    opt.step(closure)
    with torch.no_grad():
        return float(torch.nn.functional.binary_cross_entropy_with_logits(a @ w + c, y))


@pytest.mark.slow
def test_smollm2_all_token_fit_at_a_late_residual_stream_removes_the_concept():
    """SmolLM2 blocks.20.resid_post, every token of every prompt (the first token is an attention sink with a
    huge norm): after erasure no linear probe beats the constant predictor in sample (the guarantee), while
    before the concept (which of two topics the prompt is about) is linearly readable."""
    import interp
    from interp.errors import OfflineModelError
    from interp.zoo import load

    try:
        model = load("smollm2")
    except OfflineModelError as e:
        pytest.skip(str(e))
    lm = interp.attach(model)
    animals = ["The cat sat on the warm mat", "A dog ran across the field", "The horse ate fresh hay",
               "Birds sang in the old tree", "The cow grazed near the barn", "A fox hid in the bushes",
               "The sheep followed the shepherd", "Two rabbits dug a small hole", "The owl hunted at night",
               "A goat climbed the steep rock", "The duck swam across the pond", "A wolf howled at the moon"]
    machines = ["The car drove down the highway", "A train left the busy station", "The plane landed at noon",
                "Trucks carried steel to the port", "The bus stopped at the corner", "A bike leaned on the wall",
                "The ship sailed into the harbor", "Two engines roared at the track", "The tractor plowed the land",
                "A rocket launched into orbit", "The van parked near the shop", "A crane lifted the heavy beam"]
    xs, zs = [], []
    with torch.no_grad():
        for label, prompts in ((0, animals), (1, machines)):
            for p in prompts:
                act = lm.run(p, capture=["blocks.20.resid_post"]).cache["blocks.20.resid_post"][0].double()
                xs.append(act)
                zs.append(torch.full((act.shape[0],), label))
    x, z = torch.cat(xs), torch.cat(zs)
    top = torch.linalg.eigvalsh(torch.cov(x.T))
    assert float(top[-1]) > 1e3 * float(top[-2])  # one dominant direction: the first token's sink
    h = float(torch.distributions.Bernoulli(probs=z.double().mean()).entropy())
    before = _in_sample_logistic_loss(x, z)
    er = LeaceEraser.fit(x, z)
    after = _in_sample_logistic_loss(er(x), z)
    assert before < 0.5 * h  # readable before
    assert after > h - 1e-3, (before, after, h)  # the constant predictor's loss: nothing left to read
