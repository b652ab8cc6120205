"""Steering vectors: extraction maths on planted directions, provenance round trips, and
dose-responses on a constructed model whose output reads one known direction."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

import interp
from interp.errors import InterpError, SiteShapeError
from interventions import steering as S

D = 32


def _planted(n=400, seed=0):
    g = torch.Generator().manual_seed(seed)
    d = torch.randn(D, generator=g)
    d = d / d.norm() * 3
    pos = torch.randn(n, D, generator=g) + d
    neg = torch.randn(n, D, generator=g) - d
    return d, pos, neg


def _cos(a, b):
    return float(torch.nn.functional.cosine_similarity(a.reshape(-1).double(), b.reshape(-1).double(), 0))


def test_methods_recover_a_planted_direction():
    d, pos, neg = _planted()
    md = S.direction(pos, neg, "mean_diff")
    assert _cos(md, d) > 0.97 and abs(md.norm() / (2 * d.norm()) - 1) < 0.1
    torch.testing.assert_close(S.direction(pos, neg, "caa"), md, atol=1e-5, rtol=1e-5)  # equal sets: same vector
    pc = S.direction(pos, neg, "pca")
    assert _cos(pc, d) > 0.95 and abs(pc.norm() / (2 * d.norm()) - 1) < 0.15  # signed and scaled like the shift
    assert _cos(S.direction(neg, pos, "pca"), d) < -0.95
    assert abs(_cos(S.shuffled_direction(pos, neg, "mean_diff", seed=1), d)) < 0.4
    assert abs(_cos(S.shuffled_direction(pos, neg, "caa", seed=1), d)) < 0.4


def test_znorm_removes_per_example_scale_and_offset():
    d, pos, neg = _planted(200)
    g = torch.Generator().manual_seed(5)
    warp = lambda x: x * torch.rand(len(x), 1, generator=g).mul(20).add(0.1) + torch.randn(len(x), 1, generator=g) * 50
    clean = S.direction(pos, neg, znorm=True)
    torch.testing.assert_close(S.direction(warp(pos), warp(neg), znorm=True), clean, atol=1e-5, rtol=1e-4)
    assert _cos(S.direction(warp(pos), warp(neg)), d) < _cos(clean, d) - 0.1  # without it the warp hurts


def test_bad_inputs_say_what_to_do():
    _, pos, neg = _planted(10)
    with pytest.raises(SiteShapeError, match="same site"):
        S.direction(pos, neg[:, :5])
    with pytest.raises(ValueError, match="mean_diff"):
        S.direction(pos, neg[:7], "caa")
    with pytest.raises(ValueError, match="choose one of"):
        S.direction(pos, neg, "lda")
    with pytest.raises(SiteShapeError, match="non-finite"):
        S.SteeringVector(torch.tensor([1.0, float("nan")]), "blocks.0.resid_post")


def test_save_load_round_trip_keeps_vector_and_provenance(tmp_path):
    _, pos, neg = _planted(20)
    sv = S.from_activations(pos, neg, "blocks.3.resid_post", method="pca", model="toy", meta={"layer": 3})
    p = sv.save(tmp_path / "v")
    back = S.SteeringVector.load(p)
    assert torch.equal(back.vector, sv.vector)
    assert (back.site, back.method, back.model, back.data_hash, back.spatial) == \
        ("blocks.3.resid_post", "pca", "toy", sv.data_hash, None)
    assert back.meta["layer"] == 3 and back.meta["n_pos"] == 20
    assert (
        S.from_activations(pos, neg, "x").data_hash
        != S.from_activations(pos, neg[torch.arange(19, -1, -1)], "x").data_hash
    )
    interp.Result(torch.zeros(2), ("a",)).save(tmp_path / "r")
    with pytest.raises(InterpError, match="not an interp steering vector"):
        S.SteeringVector.load(tmp_path / "r.safetensors")
    r = sv.random_like(3)
    assert abs(r.norm - sv.norm) < 1e-4 and r.vector.shape == sv.vector.shape and abs(sv.cosine(r)) < 0.5


# -------------------------------------------------------------------------------- a constructed model
class Res(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(D, D)

    def forward(self, x):
        return x + 0.1 * torch.tanh(self.lin(x))


class Toy(nn.Module):
    """Tokens 0-9 carry +3u, 10-19 carry -3u, 20-29 neither; class 1's logit reads u at the last token."""

    def __init__(self, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.u = torch.randn(D, generator=g)
        self.u /= self.u.norm()
        E = torch.randn(30, D, generator=g)
        E -= (E @ self.u)[:, None] * self.u
        E[:10] += 3 * self.u
        E[10:20] -= 3 * self.u
        self.embed = nn.Embedding.from_pretrained(E)
        self.blocks = nn.ModuleList([Res(), Res()])
        self.head = nn.Linear(D, 2, bias=False)
        with torch.no_grad():
            self.head.weight.copy_(torch.stack([-self.u, self.u]) + 0.05 * torch.randn(2, D, generator=g))

    def forward(self, ids):
        x = self.embed(ids)
        for b in self.blocks:
            x = b(x)
        return self.head(x)


@pytest.fixture(scope="module")
def toy():
    torch.manual_seed(0)
    model = Toy().eval()
    g = torch.Generator().manual_seed(1)
    pos = torch.randint(0, 10, (64, 5), generator=g)
    neg = torch.randint(10, 20, (64, 5), generator=g)
    neutral = torch.randint(20, 30, (16, 5), generator=g)
    return model, interp.attach(model), pos, neg, neutral


def test_extraction_finds_the_readout_direction_and_steering_is_monotone(toy):
    model, lm, pos, neg, neutral = toy
    sv, p, n = S.extract(lm, pos, neg, "module:blocks.0", reduce="mean", model="toy", return_activations=True)
    assert sv.spatial is None and sv.vector.shape == (D,) and _cos(sv.vector, model.u) > 0.9  # random: ~0.2
    vecs = S.controls(sv, p, n, seed=0)
    assert abs(vecs["norm_matched"].norm - sv.norm) < 1e-3 and abs(vecs["random"].norm - sv.norm) < 1e-3

    def p_class1(v, a):
        with torch.no_grad(), v.apply(lm, a, norm="relative"):
            return float(model(neutral)[:, -1].softmax(-1)[:, 1].mean())

    alphas = [-0.4, -0.2, 0.0, 0.2, 0.4]
    res = S.dose_response(vecs, alphas, p_class1, metric="p(class 1)", progress=False)
    mono = res.attrs["monotonicity"]
    assert mono["steer"]["increasing"] and mono["steer"]["change"] > 0.3
    for c in ("random", "norm_matched"):
        assert abs(mono[c]["change"]) < 0.3 * mono["steer"]["change"], (c, mono[c])
    with torch.no_grad():
        base = float(model(neutral)[:, -1].softmax(-1)[:, 1].mean())
    assert res.sel(vector="steer", alpha=0.0).values.item() == base  # alpha = 0: bitwise the unsteered output


def test_dose_response_result_round_trips_and_plots(toy, tmp_path):
    _, lm, pos, neg, neutral = toy
    sv = S.extract(lm, pos, neg, "module:blocks.1", method="caa", reduce="last")
    res = S.dose_response({"steer": sv, "random": sv.random_like()}, [0.0, 0.5],
                          lambda v, a: {"m": a * 2, "n": 1.0}, metric="m", extra=("n",), progress=False)
    assert res.axes == ("vector", "alpha", "quantity")
    back = interp.Result.load(res.save(tmp_path / "dose"))
    assert torch.equal(back.values, res.values) and back.attrs["monotonicity"]["steer"]["increasing"]
    png = S.plot_dose_response(res, tmp_path / "dose.png", title="toy")
    assert png.stat().st_size > 5000


def test_keep_mode_vector_has_the_item_shape(toy):
    model, lm, pos, neg, neutral = toy
    sv = S.extract(lm, pos, neg, "module:blocks.0", reduce="keep")
    assert sv.spatial == "keep" and sv.vector.shape == (5, D)
    with torch.no_grad():
        h = model.blocks[0](model.embed(neutral))
        want = model.head(
            model.blocks[1](h + 0.3 * sv.vector * h.flatten(1).norm(dim=1)[:, None, None] / sv.vector.norm())
        )
        with sv.apply(lm, 0.3):
            got = model(neutral)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="every location"):
        sv.op(0.3, pos=2)


# -------------------------------------------------------------------------------- prompts on a tiny LM
class CharTok:
    """Characters a-z -> ids 1..26; pads with 0 (right)."""

    pad_token_id, eos_token_id = 0, 0

    def __call__(self, text, return_tensors=None, **kw):
        ids = [ord(c) - 96 for c in text]
        return {"input_ids": torch.tensor([ids]) if return_tensors == "pt" else ids}

    def decode(self, ids, **kw):
        return "".join(chr(int(i) + 96) for i in ids)


def test_collect_from_prompts_of_different_lengths_is_exact():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=32, hidden_size=D, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    lm = interp.attach(LlamaForCausalLM(cfg).eval(), tokenizer=CharTok())
    prompts = ["abc", "hello", "z", "steering"]
    site = "blocks.1.resid_post"
    last = S.collect(lm, prompts, site, reduce="last", batch_size=3)
    mean = S.collect(lm, prompts, site, reduce="mean", batch_size=3)
    for i, p in enumerate(prompts):
        alone = lm.capture(p, site)[site][0]
        torch.testing.assert_close(last[i], alone[-1], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(mean[i], alone.mean(0), atol=1e-5, rtol=1e-5)
    sv = S.extract(lm, ["abc", "abd"], ["xyz", "xyw"], site)
    assert sv.data_hash == S.extract(lm, ["abc", "abd"], ["xyz", "xyw"], site).data_hash
    assert sv.data_hash != S.extract(lm, ["abc", "abd"], ["xyz", "xyv"], site).data_hash
    with pytest.raises(interp.UnknownSiteError, match="Did you mean"):
        S.collect(lm, prompts, "blocks.1.resid_pots")


def test_steer_command_line_parses_presets_and_reductions():
    from recipes.cli import build_parser
    from recipes.steer import config

    args = build_parser().parse_args(["steer", "--preset", "physics-kappa", "--reduce", "1:", "--alphas=-1,0,2",
                                      "--steps", "3,9", "--norm", "relative"])
    cfg = config(args)
    assert (cfg.kind, cfg.reduce, cfg.alphas) == ("physics", slice(1, None), [-1.0, 0.0, 2.0])
    assert cfg.extra["window"] == (3, 9) and cfg.extra["norm"] == "relative"
    assert config(build_parser().parse_args(["steer", "--reduce", "0"])).reduce == 0
    assert config(build_parser().parse_args(["steer"])).extra["targets"][0] == " great"
    with pytest.raises(ValueError, match="--reduce"):
        config(build_parser().parse_args(["steer", "--reduce", "middle"]))
