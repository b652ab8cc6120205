"""Probes against their definitions: the closed-form ridge solve, exact leave-one-out, control tasks, splits."""
import pytest
import torch

from probes import linear as L


def planted(n=120, d=20, c=3, signal=1.5, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % c
    mu = torch.randn(c, d, generator=g)
    return torch.randn(n, d, generator=g) + signal * mu[y], y


def test_ridge_matches_primal_normal_equations():
    X, y = planted(n=50, d=8)
    p = L.fit_ridge(X, y, lam=0.3)
    Z = (X.double() - X.double().mean(0)) / X.double().std(0, unbiased=False)
    Y = torch.nn.functional.one_hot(y).double()
    W = torch.linalg.solve(Z.T @ Z + 50 * 0.3 * torch.eye(8, dtype=torch.double), Z.T @ (Y - Y.mean(0)))
    assert torch.allclose(p.W, W, atol=1e-9)
    assert torch.allclose(p.logits(X), Z @ W + Y.mean(0), atol=1e-8)


def test_closed_form_leave_one_out_equals_refitting_without_each_example():
    X, y = planted(n=30, d=6, signal=0.6)
    lam = 0.05
    fast = L.ridge_loo_predictions(X, y, lam)
    Z = (X.double() - X.double().mean(0)) / X.double().std(0, unbiased=False)
    Y = torch.nn.functional.one_hot(y).double()
    Yc = Y - Y.mean(0)
    for i in range(30):
        keep = torch.arange(30) != i
        W = torch.linalg.solve(Z[keep].T @ Z[keep] + 30 * lam * torch.eye(6, dtype=torch.double), Z[keep].T @ Yc[keep])
        assert torch.allclose(fast[i], Z[i] @ W + Y.mean(0), atol=1e-8)


@pytest.mark.parametrize("kind", ["ridge", "logistic"])
def test_heldout_accuracy_finds_planted_signal_and_not_noise(kind):
    X, y = planted()
    assert L.evaluate(X, y, kind=kind)["accuracy"] > 0.95
    noise = torch.randn(X.shape, generator=torch.Generator().manual_seed(5))
    r = L.evaluate(noise, y, kind=kind)
    assert abs(r["accuracy"] - 1 / 3) < 0.15


def test_control_task_is_constant_per_type_and_follows_the_label_distribution():
    y = torch.tensor([0] * 300 + [1] * 100)
    types = [i % 200 for i in range(400)]
    yc = L.control_labels(y, types, seed=1)
    for t in range(200):
        assert len({int(v) for v, tt in zip(yc, types) if tt == t}) == 1
    assert 0.6 < float((yc == 0).double().mean()) < 0.9          # ~75% like the task


def test_selectivity_is_high_when_types_carry_no_label_information():
    X, y = planted(n=160)
    r = L.evaluate(X, y, types=list(range(160)))                 # every example its own type: nothing to memorise
    assert r["control"] < 0.5 and r["selectivity"] > 0.5


def test_group_folds_never_share_a_group():
    groups = [f"g{i % 13}" for i in range(91)]
    for tr, te in L.group_kfold(groups, k=4):
        assert not {groups[i] for i in tr} & {groups[i] for i in te}
        assert len(tr) + len(te) == 91


def test_bad_inputs_say_what_to_do():
    X, y = planted(n=20)
    with pytest.raises(ValueError, match="one label per row"):
        L.fit(X, y[:5])
    with pytest.raises(ValueError, match="flatten"):
        L.fit(X[:, None], y)
    with pytest.raises(ValueError, match="unknown probe kind"):
        L.fit(X, y, kind="svm")
    with pytest.raises(ValueError, match="too few"):
        L.kfold(5, k=4)
