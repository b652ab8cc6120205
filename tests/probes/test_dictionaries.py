"""Dictionary learners recover planted sparse features; formats round-trip and match their specs' math."""
import json

import pytest
import torch

from probes.dictionaries import (
    DictConfig,
    Dictionary,
    DictionaryError,
    TrainConfig,
    Trainer,
    load,
    load_saelens,
    load_sparsify_release,
    planted,
    recovery,
    save,
    train,
)
from probes.dictionaries.metrics import reconstruction


@pytest.fixture(scope="module")
def data():
    return planted(40000, 32, 64, p=0.03, seed=0)


@pytest.mark.parametrize("kind,kw", [("topk", {"k": 4}), ("batchtopk", {"k": 4}), ("relu", {"l1": 3e-2}),
                                     ("jumprelu", {"l0": 1e-2})])
def test_planted_directions_are_recovered(data, kind, kw):
    X, D = data
    cfg = DictConfig(d_in=32, d_sae=128, kind=kind, k=kw.pop("k", None))
    sae, log = train(cfg, X, steps=1200, batch_size=512, lr=3e-3, progress=False, dead_after=20000,
                     resample_every=300, **kw)
    rec = recovery(sae, D)
    assert rec.mean() >= 0.9, (kind, rec.mean())
    m = reconstruction(sae, X[:5000])
    assert m["explained_variance"] > 0.85, m
    # a dictionary with the planted sparsity: L0 close to the true number of active features (64 * 0.03 = 1.9)
    assert m["l0"] < 12, m
    # a random dictionary does not pass the recovery bar (the test can fail)
    assert recovery(Dictionary(cfg), D).mean() < 0.6


def test_transcoder_learns_a_sparse_map():
    X, D = planted(30000, 24, 48, p=0.04, seed=1)
    g = torch.Generator().manual_seed(2)
    M = torch.randn(24, 32, generator=g) / 24 ** 0.5
    Y = X @ M
    cfg = DictConfig(d_in=24, d_sae=96, kind="topk", k=4, d_out=32)
    sae, log = train(cfg, (X, Y), steps=1200, batch_size=512, lr=3e-3, progress=False, dead_after=20000)
    m = reconstruction(sae, X[:4000], Y[:4000])
    assert m["explained_variance"] > 0.85, m
    # the decoder learns the images of the planted features under M
    img = D @ M
    cos = (img / img.norm(dim=1, keepdim=True)) @ sae.directions().T
    assert cos.max(1).values.mean() > 0.9


def test_dead_features_are_revived():
    X, _ = planted(20000, 16, 32, p=0.05, seed=3)
    cfg = DictConfig(d_in=16, d_sae=64, kind="relu")
    t = Trainer(cfg, TrainConfig(steps=400, batch_size=256, lr=3e-3, l1=3e-2, dead_after=2000, resample_every=100,
                                 progress=False))
    with torch.no_grad():  # kill half the features: encoder bias far below zero
        t.sae.b_enc[:32] = -100.0
    t.run(X)
    assert t.log.resampled >= 32
    f = t.sae.encode(X[:4000]) > 0
    assert f[:, :32].any(0).float().mean() > 0.5  # most killed features fire again


def test_topk_aux_loss_trains_starved_features():
    """Features whose encoder is shrunk 100x never win the top-k, so only AuxK gives them a gradient: with it their
    encoder columns grow and some fire again; without it they stay exactly as they were."""
    X, _ = planted(20000, 16, 32, p=0.05, seed=4)

    def run(aux):
        t = Trainer(DictConfig(d_in=16, d_sae=64, kind="topk", k=3),
                    TrainConfig(steps=400, batch_size=256, lr=3e-3, dead_after=1000, aux_coef=aux, progress=False))
        with torch.no_grad():
            t.sae.W_enc[:, :32] *= 0.01
        start = t.sae.W_enc[:, :32].norm(dim=0).clone()
        t.run(X)
        assert torch.allclose(t.sae.W_dec.norm(dim=1), torch.ones(64), atol=1e-5)
        grown = float((t.sae.W_enc.detach()[:, :32].norm(dim=0) / start).median())
        return grown, float((t.sae.encode(X[:4000]) > 0)[:, :32].any(0).float().mean())

    (g_aux, fire_aux), (g_none, fire_none) = run(1 / 32), run(0.0)
    assert g_none == pytest.approx(1.0, abs=1e-4) and fire_none == 0.0
    assert g_aux > 3.0 and fire_aux > 0.0, (g_aux, fire_aux)


def test_checkpoint_resume_equals_uninterrupted(tmp_path):
    X, _ = planted(8000, 16, 32, p=0.05, seed=5)
    cfg = DictConfig(d_in=16, d_sae=32, kind="topk", k=3)
    tc = dict(batch_size=128, lr=3e-3, progress=False, checkpoint_every=20)
    full = Trainer(cfg, TrainConfig(steps=60, checkpoint_dir=str(tmp_path / "a"), **tc))
    full.run(X)
    part = Trainer(cfg, TrainConfig(steps=40, checkpoint_dir=str(tmp_path / "b"), **tc))
    part.run(X)
    resumed = Trainer(cfg, TrainConfig(steps=60, checkpoint_dir=str(tmp_path / "b"), **tc))
    assert resumed.step == 0
    resumed.run(X)
    assert resumed.step == 60
    # a resumed run restarts its data order from the seed + step, so weights differ slightly but are trained
    assert load(tmp_path / "b" / "dictionary").cfg.d_sae == 32
    assert (resumed.sae.W_dec - full.sae.W_dec).abs().max() < 1.0


def test_interp_format_round_trip(tmp_path):
    for cfg in (DictConfig(d_in=8, d_sae=16, kind="jumprelu", site="blocks.0.resid_post"),
                DictConfig(d_in=8, d_sae=16, kind="batchtopk", k=3, d_out=6, site="a", out_site="b", skip=True)):
        sae = Dictionary(cfg)
        with torch.no_grad():
            for p in sae.parameters():
                p.add_(torch.randn_like(p) * 0.1)
            sae.in_scale.fill_(1.7)
            sae.threshold.fill_(0.05)
        path = save(sae, tmp_path / cfg.kind, extra={"note": "x"})
        back = load(path)
        x = torch.randn(5, 8)
        assert back.cfg == cfg and torch.equal(back(x), sae(x))
        assert back.extra == {"note": "x"}
    save(sae, tmp_path / cfg.kind)  # overwrite in place
    assert not list(tmp_path.glob(".*"))  # no temp folders left behind


def _saelens_reference(w, cfg, x):
    """SAELens' documented math, written out: standard / jumprelu / topk encoders."""
    xin = x - w["b_dec"] if cfg["apply_b_dec_to_input"] else x
    pre = xin @ w["W_enc"] + w["b_enc"]
    if cfg["architecture"] == "standard":
        f = torch.relu(pre)
    elif cfg["architecture"] == "jumprelu":
        f = torch.relu(pre) * (pre > w["threshold"])
    else:
        v, i = pre.topk(cfg["k"], dim=-1)
        f = torch.zeros_like(pre).scatter(-1, i, torch.relu(v))
    return f, f @ w["W_dec"] + w["b_dec"]


@pytest.mark.parametrize("arch", ["standard", "jumprelu", "topk"])
def test_read_saelens_layout(tmp_path, arch):
    from safetensors.torch import save_file

    d, m = 12, 40
    g = torch.Generator().manual_seed(0)
    w = {"W_enc": torch.randn(d, m, generator=g), "b_enc": torch.randn(m, generator=g) * 0.1,
         "W_dec": torch.randn(m, d, generator=g), "b_dec": torch.randn(d, generator=g)}
    if arch == "jumprelu":
        w["threshold"] = torch.rand(m, generator=g)
    cfg = {"architecture": arch, "d_in": d, "d_sae": m, "dtype": "float32", "device": "cpu",
           "apply_b_dec_to_input": arch != "jumprelu", "normalize_activations": "none",
           "metadata": {"hook_name": "blocks.3.hook_resid_post", "model_name": "gpt2"}}
    if arch == "topk":
        cfg["k"] = 5
    save_file(w, str(tmp_path / "sae_weights.safetensors"))
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    sae = load(tmp_path)
    assert sae.cfg.site == "blocks.3.hook_resid_post" and sae.cfg.meta["source"] == "saelens"
    x = torch.randn(7, d, generator=g)
    f_ref, y_ref = _saelens_reference(w, cfg, x)
    assert torch.allclose(sae.encode(x), f_ref, atol=1e-5) and torch.allclose(sae(x), y_ref, atol=1e-4)
    cfg["normalize_activations"] = "expected_average_only_in"
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(DictionaryError, match="normalize_activations"):
        load_saelens(tmp_path)


@pytest.mark.parametrize("transcode", [False, True])
def test_read_sparsify_layout(tmp_path, transcode):
    from safetensors.torch import save_file

    d, m, k = 10, 30, 4
    g = torch.Generator().manual_seed(1)
    w = {"encoder.weight": torch.randn(m, d, generator=g), "encoder.bias": torch.randn(m, generator=g) * 0.1,
         "W_dec": torch.randn(m, d, generator=g), "b_dec": torch.randn(d, generator=g)}
    if transcode:
        w["W_skip"] = torch.randn(d, d, generator=g) * 0.1
    hp = tmp_path / "layers.3.mlp"
    hp.mkdir()
    save_file(w, str(hp / "sae.safetensors"))
    (hp / "cfg.json").write_text(json.dumps({"activation": "topk", "expansion_factor": 3, "normalize_decoder": True,
                                             "num_latents": m, "k": k, "multi_topk": False,
                                             "skip_connection": transcode, "transcode": transcode, "d_in": d}))
    sae = load_sparsify_release(tmp_path)["layers.3.mlp"]
    x = torch.randn(6, d, generator=g)
    # sparsify's documented forward: centre (SAEs only), linear encoder, relu, top-k, decode, + skip
    xin = x if transcode else x - w["b_dec"]
    pre = torch.relu(xin @ w["encoder.weight"].T + w["encoder.bias"])
    v, i = pre.topk(k, dim=-1)
    y = torch.zeros(6, m).scatter(-1, i, v) @ w["W_dec"] + w["b_dec"]
    if transcode:
        y = y + x @ w["W_skip"].T
    assert torch.allclose(sae(x), y, atol=1e-4)
    assert sae.cfg.transcoder == transcode
    with pytest.raises(DictionaryError, match="holds no dictionary"):
        load(tmp_path)


def test_config_errors():
    with pytest.raises(DictionaryError, match="needs k"):
        DictConfig(d_in=4, d_sae=8, kind="topk")
    with pytest.raises(DictionaryError, match="unknown"):
        DictConfig(d_in=4, d_sae=8, kind="gated")
    sae = Dictionary(DictConfig(d_in=4, d_sae=8, site="blocks.1.resid_post"))
    with pytest.raises(DictionaryError, match="width 4"):
        sae.encode(torch.zeros(2, 5))
