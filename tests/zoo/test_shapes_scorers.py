"""Data generator and the neural-network-free scorers, on renders with known answers."""
import numpy as np
import pytest
import torch

from interp.zoo import physics as P
from interp.zoo import scorers as Z
from interp.zoo import shapes as S


def test_vocabulary_sizes():
    assert len(S.COLOURS) >= 6 and len(S.SHAPES) >= 4 and len(S.TEXTURES) >= 2
    assert len(S.POSITIONS) >= 3 and len(S.SIZES) >= 2
    assert len(S.all_attributes()) == 6 * 4 * 3 * 2 * 2


def test_sample_is_deterministic_and_well_formed():
    a = S.sample(7, 5)
    b = S.sample(7, 5)
    assert np.array_equal(a[0], b[0]) and a[1] == b[1]
    assert a[0].shape == (5, 32, 32, 3) and a[0].dtype == np.float32
    assert a[0].min() >= 0 and a[0].max() <= 1
    for cap, att in zip(a[1], a[2]):
        assert S.parse_caption(cap) == att
    assert not np.array_equal(S.sample(8, 5)[0], a[0])


def test_captions_look_right_and_held_out_is_disjoint():
    att = S.Attributes("red", "circle", "left", "small", "striped")
    assert att.caption() == "a small red circle on the left, striped"
    assert (
        S.Attributes("blue", "cross", "center", "large", "solid").caption() == "a large blue cross in the center, solid"
    )
    held = set(S.held_out_attributes())
    train = set(S.train_attributes())
    assert held and not held & train and held | train == set(S.all_attributes())
    for key, values in S.ATTRIBUTES.items():  # every word still appears in training
        assert {getattr(a, key) for a in train} == set(values)
    assert {a.colour for a in held} == set(S.COLOURS) and {a.shape for a in held} == set(S.SHAPES)
    _, caps, atts = S.sample(0, 200)
    assert not set(atts) & held


@pytest.mark.parametrize("jitter", [(0.0, 0.0), (1.0, -1.0), (-1.0, 1.0)])
def test_every_attribute_scored_correctly_on_clean_renders(jitter):
    atts = S.all_attributes()
    imgs = np.stack([S.render(a, jitter=jitter) for a in atts])
    preds = Z.score(imgs)
    for a, p in zip(atts, preds):
        assert p == a.as_dict()


def test_scorers_accept_tensors_chw_and_minus_one_range():
    atts = [S.Attributes(c, s, "right", "large", "solid") for c in S.COLOURS for s in S.SHAPES]
    imgs = np.stack([S.render(a) for a in atts])
    t = S.to_tensor(imgs)  # (N, 3, H, W) in [-1, 1]
    assert Z.colour(t, value_range=(-1, 1)) == [a.colour for a in atts]
    assert Z.shape(t, value_range=(-1, 1)) == [a.shape for a in atts]
    one = Z.colour(t[0], value_range=(-1, 1))
    assert one == [atts[0].colour]


def test_scorers_robust_to_mild_noise():
    rng = np.random.default_rng(0)
    atts = S.all_attributes()[::5]
    imgs = np.stack([S.render(a) for a in atts])
    noisy = np.clip(imgs + rng.normal(0, 0.05, imgs.shape), 0, 1)
    acc = Z.accuracy(noisy, atts)
    assert acc["colour"] == 1.0 and acc["shape"] >= 0.9 and acc["position"] == 1.0


def test_hue_and_red_rate():
    imgs = np.stack([S.render(S.Attributes(c, "square", "center", "large", "solid")) for c in S.COLOURS])
    np.testing.assert_allclose(Z.hue(imgs), [S.HUES[c] for c in S.COLOURS], atol=1e-3)
    assert Z.red_rate(imgs) == pytest.approx(1 / 6)
    assert Z.red_rate(imgs[:1]) == 1.0 and Z.colour_rate(imgs, "blue") == pytest.approx(1 / 6)
    blank = np.zeros((2, 32, 32, 3), np.float32)
    assert Z.colour(blank) == ["none", "none"] and Z.shape(blank) == ["none", "none"]
    assert Z.red_rate(blank) == 0.0
    # an orange-ish hue (20 deg) still counts as red; 40 deg (closer to yellow) does not
    assert Z.hue_to_colour(20.0) == "red" and Z.hue_to_colour(40.0) == "yellow" and Z.hue_to_colour(350.0) == "red"


def test_pil_images_are_accepted():
    from PIL import Image

    img = S.render(S.Attributes("green", "triangle", "left", "large", "striped"))
    pil = Image.fromarray((img * 255).round().astype(np.uint8))
    assert Z.score([pil]) == [
        {"colour": "green", "shape": "triangle", "position": "left", "size": "large", "texture": "striped"}
    ]


@pytest.mark.parametrize("kappa", P.KAPPAS)
@pytest.mark.parametrize("velocity", [-0.2, 0.0, 0.1])
def test_kappa_fit_on_exact_solutions(kappa, velocity):
    traj = P.exact_blob_rollout(20, kappa, velocity, center=0.3)
    assert Z.fit_kappa(traj, P.DT) == pytest.approx(kappa, rel=0.01)


def test_exact_solution_conserves_mass_and_advects():
    u0 = P.gaussian_blob(0.5, 0.04)
    u1 = P.exact_evolve(u0, 0.5, 0.0, 0.2)
    assert u1.sum() == pytest.approx(u0.sum())
    m0, _ = Z.field_moments(u0)
    m1, _ = Z.field_moments(u1)
    assert (m1 - m0) % 1.0 == pytest.approx(0.1, abs=1e-3)
    # wraps around the periodic boundary
    u2 = P.exact_evolve(u0, 1.0, 0.0, 0.75)
    assert Z.field_moments(u2)[0] == pytest.approx(0.25, abs=1e-3)


def test_physics_pairs_are_one_exact_step():
    u, nxt, kappa, vel = P.sample_pairs(0, 4)
    again = P.exact_evolve(u.double().numpy(), P.DT, kappa.double().numpy(), vel.double().numpy())
    np.testing.assert_allclose(again, nxt.numpy(), atol=1e-5)
    assert set(kappa.tolist()) <= set(np.float32(P.KAPPAS).tolist())


def test_surrogate_is_a_transformer_with_named_blocks(tmp_path):
    m = P.PhysicsSurrogate(d_model=16, n_heads=2, n_layers=2, d_mlp=32)
    names = dict(m.named_modules())
    for i in range(2):
        assert f"blocks.{i}.attn" in names and f"blocks.{i}.mlp" in names
    u0 = torch.tensor(P.gaussian_blob(), dtype=torch.float32)
    traj = m.rollout(u0, 3, kappa=0.002, velocity=0.25)
    assert traj.shape == (4, P.N_GRID)
    batch = m.rollout(u0.repeat(2, 1), 3, kappa=torch.tensor([0.002, 0.004]), velocity=0.0)
    assert batch.shape == (2, 4, P.N_GRID)
    m.save_pretrained(tmp_path)
    back = P.PhysicsSurrogate.from_pretrained(tmp_path)
    torch.testing.assert_close(back.rollout(u0, 3, 0.002, 0.25), traj)
