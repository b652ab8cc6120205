"""Directions: the maths, the safetensors round trip, and their ops acting through the engine."""
import json

import pytest
import torch

import interp
from interp.direction import znormalize
from probes import Direction, collect, from_dataset, lda, mean_difference


def test_mean_difference_and_lda_against_their_formulas():
    g = torch.Generator().manual_seed(0)
    n, d = 4000, 10
    y = torch.arange(n) % 2
    true = torch.zeros(d)
    true[0] = 1.0
    # strong noise along e1 + e0 mixed: the mean difference is pulled off the discriminant, LDA is not
    noise = torch.randn(n, d, generator=g)
    noise[:, 1] *= 6
    noise[:, 0] += noise[:, 1]
    X = noise + 1.0 * y[:, None] * true
    md = mean_difference(X, y.tolist(), 1, 0)
    assert torch.allclose(md.vector, X[y == 1].mean(0) - X[y == 0].mean(0), atol=1e-5)
    # the Bayes-optimal discriminant is Sigma^-1 (mu1 - mu0); LDA must point there
    cov = torch.eye(d)
    cov[1, 1] = 36
    cov[0, 0] = 37
    cov[0, 1] = cov[1, 0] = 36
    want = torch.linalg.solve(cov, true)
    ld = lda(X, y.tolist(), 1, 0, shrinkage=0.0)
    assert ld.cosine(Direction(want, "", "x")) > 0.95
    assert md.cosine(Direction(want, "", "x")) < 0.85                 # 0.71 in expectation


def test_direction_safetensors_round_trip(tmp_path):
    d = Direction(torch.randn(7), "blocks.3.resid_post", "lda", {"label": "country", "n": 12}, mu=torch.randn(7))
    back = Direction.load(d.save(tmp_path / "dir"))
    assert torch.equal(back.vector, d.vector) and torch.equal(back.mu, d.mu)
    assert (back.site, back.method, back.meta) == (d.site, d.method, d.meta)
    with pytest.raises(ValueError, match="zero or not finite"):
        Direction(torch.zeros(3), "s", "m")


def test_steering_along_the_v_direction_sets_v(toy):
    """Adding mean(V=1) - mean(V=0) at the write site turns every V=0 input into V=1: y = (1 + q) mod 3."""
    m, lm = toy
    X, lab = m.dataset()
    ds = collect(lm, list(X), "blocks.2.resid_post", labels=lab, positions={"last": -1}, progress=False)
    dvec = from_dataset(ds, "blocks.2.resid_post", "last", "V", 1, 0)
    assert dvec.site == "blocks.2.resid_post" and dvec.meta["label"] == "V"
    zero = torch.tensor(lab["V"]) == 0
    out = lm.run(X[zero], ops=[dvec.add(1.0, where=interp.at(pos=-1))])
    want = (1 + torch.tensor(lab["q"])[zero]) % 3
    assert torch.equal(out.logits[:, -1, :3].argmax(-1), want)
    unchanged = lm.run(X[zero], ops=[dvec.add(0.0, where=interp.at(pos=-1))])
    assert torch.equal(unchanged.logits, lm.run(X[zero]).logits)


def test_projection_op_removes_the_direction_through_the_engine(toy):
    m, lm = toy
    X, lab = m.dataset()
    site = "blocks.2.resid_post"
    ds = collect(lm, list(X), site, labels=lab, positions={"last": -1}, progress=False)
    dvec = from_dataset(ds, site, "last", "V", 1, 0, method="lda", shrinkage=0.5)
    clean = lm.run(X, capture=[site]).cache[site]
    edited = lm.run(X, ops=[dvec.project(where=interp.at(pos=-1))], capture=[site]).cache[site]
    u, mu = dvec.unit, dvec.mu
    want = clean[:, -1] - ((clean[:, -1] - mu) @ u)[:, None] * u
    assert torch.allclose(edited[:, -1], want, atol=1e-5)
    assert torch.allclose((edited[:, -1] - mu) @ u, torch.zeros(len(X)), atol=1e-5)
    assert torch.equal(edited[:, :-1], clean[:, :-1])


# ---- one Direction for probes and steering ------------------------------------------------------

def _old_file(path, fmt, tensors, header):
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata={"format": fmt, **header})
    return path


def test_steering_vectors_are_directions_and_files_cross_load(tmp_path):
    from interventions.steering import SteeringVector, from_activations

    g = torch.Generator().manual_seed(0)
    pos, neg = torch.randn(30, 6, generator=g) + 2 * torch.eye(6)[0], torch.randn(30, 6, generator=g)
    sv = from_activations(pos, neg, "blocks.2.resid_post", model="toy", meta={"layer": 2})
    assert isinstance(sv, Direction)
    md = mean_difference(torch.cat([pos, neg]), [1] * 30 + [0] * 30, 1, 0, site="blocks.2.resid_post")
    assert abs(sv.cosine(md) - 1) < 1e-6                          # the same extraction, two entry points
    back = Direction.load(sv.save(tmp_path / "sv"))               # a steering file read as a Direction
    assert type(back) is Direction and torch.equal(back.vector, sv.vector)
    assert (back.model, back.data_hash, back.meta["layer"]) == ("toy", sv.data_hash, 2)
    as_sv = SteeringVector.load(md.save(tmp_path / "md"))         # a probe direction read as a steering vector
    assert type(as_sv) is SteeringVector and torch.equal(as_sv.mu, md.mu) and as_sv.data_hash == md.data_hash
    op = as_sv.op(2.0, pos=-1)
    assert op.alpha == 2.0 and torch.equal(op.vector, md.vector)


def test_files_of_both_older_formats_load(tmp_path):
    from interventions.steering import SteeringVector

    v, mu = torch.randn(5), torch.randn(5)
    old_dir = _old_file(tmp_path / "d.safetensors", "interp.direction/1", {"vector": v, "mu": mu},
                        {"site": "s", "method": "lda", "meta": json.dumps({"label": "x"})})
    d = Direction.load(old_dir)
    assert torch.equal(d.vector, v) and torch.equal(d.mu, mu) and (d.method, d.meta) == ("lda", {"label": "x"})
    old_sv = _old_file(tmp_path / "v.safetensors", "interp.steering/1", {"vector": v},
                       {"site": "s", "method": "caa", "model": "m", "data_hash": "abc", "spatial": "",
                        "meta": "{}", "identity": json.dumps({"arch": "f00"}), "width": "5"})
    s = SteeringVector.load(old_sv)
    assert (s.method, s.model, s.data_hash, s.identity, s.spatial) == ("caa", "m", "abc", {"arch": "f00"}, None)


def test_one_epsilon_and_one_validation(tmp_path):
    from interventions import steering

    X = torch.randn(8, 4, generator=torch.Generator().manual_seed(1))
    X[0] = 3.0                                                     # a constant row: std 0, the epsilon decides
    assert torch.equal(steering.znormalize(X), znormalize(X))
    zd = mean_difference(X, [1, 0] * 4, 1, 0, zscore=True)
    want = znormalize(X)[0::2].mean(0) - znormalize(X)[1::2].mean(0)
    torch.testing.assert_close(zd.vector, want.float())
    for bad in (torch.zeros(3), torch.tensor([1.0, float("inf")]), torch.ones(2, 3)):
        with pytest.raises(ValueError):
            Direction(bad, "s", "m")
        with pytest.raises(ValueError):
            steering.SteeringVector(bad, "s")
    assert steering.SteeringVector(torch.ones(2, 3), "s", spatial="keep").vector.shape == (2, 3)
    with pytest.raises(ValueError, match="not an interp direction"):
        interp.Result(torch.zeros(2), ("a",)).save(tmp_path / "r")
        Direction.load(tmp_path / "r.safetensors")
