"""Dictionaries spliced into real models through the engine: exactness, feature edits equal plain torch hooks,
feature addresses, attribution patching against real patching, probes on features, transcoders, CE recovered."""
import pytest
import torch

import interp
from probes.dictionaries import DictConfig, Dictionary
from probes.dictionaries.metrics import ce_recovered
from probes.dictionaries.splice import (
    Edit,
    Features,
    Recorder,
    feature_acts,
    feature_attribution,
    splice,
    splice_transcoder,
)

SITE = "blocks.1.resid_post"


def tiny_llama(seed=0, layers=3, d=32, vocab=128):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=d, intermediate_size=2 * d, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


@pytest.fixture(scope="module")
def sae():
    torch.manual_seed(1)
    s = Dictionary(DictConfig(d_in=32, d_sae=64, kind="topk", k=6, site=SITE))
    with torch.no_grad():
        s.b_enc.normal_(0, 0.1)
        s.b_dec.normal_(0, 0.1)
    return s.eval()


def ids(n=2, T=9, seed=3):
    return torch.randint(0, 128, (n, T), generator=torch.Generator().manual_seed(seed))


def hooked(model, fn, layer=1):
    """The plain torch version: a forward hook on block `layer` rewriting its output with fn."""
    def hook(m, i, o):
        if isinstance(o, tuple):
            return (fn(o[0]), *o[1:])
        return fn(o)
    h = model.model.layers[layer].register_forward_hook(hook)
    try:
        with torch.no_grad():
            return model(ids()).logits
    finally:
        h.remove()


def test_error_term_leaves_forward_unchanged(model, sae):
    lm = interp.attach(model)
    clean = lm.run(ids()).logits
    out = lm.run(ids(), ops=[splice(sae, error=True)]).logits
    assert (out - clean).abs().max() <= 1e-6
    assert interp.hook_count(model) == 0


def test_reconstruction_splice_equals_plain_hook(model, sae):
    lm = interp.attach(model)
    got = lm.run(ids(), ops=[splice(sae, error=False)]).logits
    want = hooked(model, lambda h: sae(h))
    assert torch.allclose(got, want, atol=1e-5)
    assert (got - lm.run(ids()).logits).abs().max() > 1e-3  # a lossy dictionary does change the forward


@pytest.mark.parametrize("kind,value", [("set", 0.0), ("set", 3.0), ("add", 2.5), ("scale", 4.0)])
def test_feature_edits_equal_plain_hook(model, sae, kind, value):
    lm = interp.attach(model)
    feats = [5, 17]

    def manual(h):
        f = sae.encode(h)
        f2 = f.clone()
        if kind == "set":
            f2[..., feats] = value
        elif kind == "add":
            f2[..., feats] += value
        else:
            f2[..., feats] *= value
        return h + (f2 - f) @ sae.W_dec / sae.out_scale

    got = lm.run(ids(), ops=[splice(sae, edits=[Edit(feats, kind, value)])]).logits
    assert torch.allclose(got, hooked(model, manual), atol=1e-5)


def test_feature_addresses(model, sae):
    lm = interp.attach(model)
    F = Features({f"{SITE}.sae": sae})
    ops = F.ops({f"{SITE}.sae.f[5]": 0.0, f"{SITE}.sae.f[17,20]": ("add", 2.0)})
    assert len(ops) == 1  # edits at one dictionary are applied together
    ref = splice(sae, edits=[Edit([5], "set", 0.0), Edit([17, 20], "add", 2.0)])
    assert torch.equal(lm.run(ids(), ops=ops).logits, lm.run(ids(), ops=[ref]).logits)
    with pytest.raises(interp.UnknownSiteError, match="no dictionary"):
        F.ops({"blocks.0.resid_post.sae.f[1]": 0.0})
    with pytest.raises(interp.UnknownSiteError, match="not a feature address"):
        F.parse(f"{SITE}.sae[3]")
    with pytest.raises(interp.PositionError, match="64 features"):
        F.parse(f"{SITE}.sae.f[64]")
    assert F.parse(f"{SITE}.sae.f[2:5]")[2] == [2, 3, 4]


def test_feature_ablation_of_active_features_changes_output_at_chosen_positions(model, sae):
    lm = interp.attach(model)
    f = feature_acts(lm, sae, ids())
    assert f.shape == (2, 9, 64)
    j = int(f[0, 4].argmax())
    op = splice(sae, edits=[Edit([j], "set", 0.0)], where=interp.at(pos=4))
    out, clean = lm.run(ids(), ops=[op]).logits, lm.run(ids()).logits
    assert torch.allclose(out[:, :4], clean[:, :4], atol=1e-6)  # causal: earlier positions untouched
    assert (out[0, 4:] - clean[0, 4:]).abs().max() > 1e-4


def test_splice_in_run_grid_and_session(model, sae):
    lm = interp.attach(model)
    rows = [[splice(sae, edits=[Edit([j], "add", 3.0)])] for j in (1, 2, 3)]
    grid = lm.run_grid(ids(1), rows, metric=lambda lg: lg[:, -1, 7], progress=False)
    for r, ops in enumerate(rows):
        assert torch.allclose(grid.values[r], lm.run(ids(1), ops=ops).logits[:, -1, 7], atol=1e-5)
    rec = Recorder()
    with lm.applied([splice(sae, error=True, record=rec)]):
        with torch.no_grad():
            model(ids(1))
    assert rec["f"][0].shape == (1, 9, 64)


def test_attribution_matches_patching_to_first_order(model, sae):
    lm = interp.attach(model)
    clean, corrupt = ids(1, seed=4), ids(1, seed=5)
    corrupt[:, :6] = clean[:, :6]  # the inputs differ at positions 6..8 only
    metric = lambda lg: lg[:, -1, 11] - lg[:, -1, 12]
    res = feature_attribution(lm, sae, clean, corrupt, metric)
    assert res.axes == ("pos", "feature") and res.shape == (9, 64)
    assert res.values[:6].abs().max() < 1e-5  # identical prefix: identical features, no attribution
    f_clean = feature_acts(lm, sae, clean)
    base = float(metric(lm.run(corrupt).logits))
    est, real = [], []
    top = res.values[6:].abs().flatten().topk(8).indices
    for flat in top.tolist():
        p, j = 6 + flat // 64, flat % 64
        # a small step toward the clean value: the linear regime where attribution is exact to first order
        f_c = feature_acts(lm, sae, corrupt)
        delta = 0.01 * float(f_clean[0, p, j] - f_c[0, p, j])
        op = splice(sae, edits=[Edit([j], "add", delta)], where=interp.at(pos=p))
        real.append((float(metric(lm.run(corrupt, ops=[op]).logits)) - base) / 0.01)
        est.append(float(res.values[p, j]))
    est, real = torch.tensor(est), torch.tensor(real)
    assert torch.allclose(est, real, rtol=0.05, atol=1e-4 * est.abs().max()), (est, real)


def test_probe_on_feature_activations():
    """Planted data through a plain nn.Module (generic adapter): a label that is one planted feature being on is
    read by a fresh probe on held-out feature activations, and by that one matched feature alone."""
    from probes import fit
    from probes.dictionaries import planted, recovery, train

    net = torch.nn.Sequential(torch.nn.Identity(), torch.nn.Linear(24, 3)).eval()
    lm = interp.attach(net)
    X, D = planted(24000, 24, 32, p=0.05, seed=7)
    sae, _ = train(DictConfig(d_in=24, d_sae=64, kind="topk", k=3, site="module:0"), X[:20000], steps=800,
                   batch_size=256, lr=3e-3, progress=False, dead_after=10000)
    assert recovery(sae, D).mean() > 0.9
    held = X[20000:]
    y = ((held @ D[3]) > 0.5).long()  # feature 3 on (its coefficient dominates the projection)
    F = feature_acts(lm, sae, held[:, None])[:, 0]
    probe = fit(F[:2000], y[:2000], kind="logistic")
    assert probe.accuracy(F[2000:], y[2000:]) > 0.95
    j = int((sae.directions() @ D[3]).argmax())
    assert ((F[:, j] > 0).long() == y).float().mean() > 0.9


def test_transcoder_splice(model):
    lm = interp.attach(model)
    a, b = "blocks.1.resid_mid", "blocks.1.mlp.out"
    tc = Dictionary(DictConfig(d_in=32, d_sae=64, kind="relu", d_out=32, site=a, out_site=b))
    clean = lm.run(ids()).logits
    assert (lm.run(ids(), ops=splice_transcoder(tc, error=True)).logits - clean).abs().max() <= 1e-6
    cache = lm.capture(ids(), [a])
    got = lm.run(ids(), ops=splice_transcoder(tc, error=False)).logits

    def hook(m, i, o):
        return tc(cache[a])
    h = model.model.layers[1].mlp.register_forward_hook(hook)
    try:
        with torch.no_grad():
            want = model(ids()).logits
    finally:
        h.remove()
    assert torch.allclose(got, want, atol=1e-5)


class ShiftLM(torch.nn.Module):
    """A constructed LM that predicts token + 1: one-hot embeddings, an identity block (the site), a shifted head.
    Clean CE is near 0, zero-ablating the block output gives uniform logits (CE = ln V)."""

    def __init__(self, V=16):
        super().__init__()
        self.embed = torch.nn.Embedding(V, V)
        self.block = torch.nn.Identity()
        self.head = torch.nn.Linear(V, V, bias=False)
        with torch.no_grad():
            self.embed.weight.copy_(torch.eye(V))
            self.head.weight.copy_(12.0 * torch.eye(V).roll(1, 0))

    def forward(self, ids):
        return self.head(self.block(self.embed(ids)))


def test_ce_recovered_orders_dictionaries():
    import math

    from probes.dictionaries import train

    V = 16
    lm = interp.attach(ShiftLM(V))
    seqs = (torch.randint(0, V, (8, 1), generator=torch.Generator().manual_seed(0)) + torch.arange(12)) % V
    X = torch.eye(V).repeat(200, 1)
    good, _ = train(DictConfig(d_in=V, d_sae=32, kind="topk", k=1, site="module:block"), X, steps=300,
                    batch_size=128, lr=1e-2, progress=False, dead_after=10**9)
    bad = Dictionary(DictConfig(d_in=V, d_sae=32, kind="topk", k=1, site="module:block"))
    g, b = ce_recovered(lm, good, [seqs], skip_first=0), ce_recovered(lm, bad, [seqs], skip_first=0)
    assert g["clean"] < 1e-3 and abs(g["zero"] - math.log(V)) < 1e-4
    assert abs(g["error_term"] - g["clean"]) < 1e-6
    assert g["ce_recovered"] > 0.95 and b["ce_recovered"] < g["ce_recovered"] - 0.2, (g, b)


def test_feature_steering_dose_response_on_constructed_model():
    """ShiftLM predicts token + 1; steering the feature that encodes token 5 raises P(6) monotonically."""
    from probes.dictionaries import train
    from probes.dictionaries.splice import dose_response

    V = 16
    lm = interp.attach(ShiftLM(V))
    sae, _ = train(DictConfig(d_in=V, d_sae=32, kind="topk", k=1, site="module:block"), torch.eye(V).repeat(200, 1),
                   steps=300, batch_size=128, lr=1e-2, progress=False, dead_after=10**9)
    j = int(sae.encode(torch.eye(V)[5]).argmax())
    prompt = torch.tensor([[1, 2, 3]])
    res = dose_response(lm, sae, j, [prompt], [6], [0.0, 0.1, 0.2, 0.4, 0.8], kind="add")
    v = res.values.tolist()
    assert all(b > a for a, b in zip(v, v[1:])), v
    assert v[-1] > v[0] + 2.0
    # a feature of another token does not raise P(6)
    k = int(sae.encode(torch.eye(V)[9]).argmax())
    other = dose_response(lm, sae, k, [prompt], [6], [0.0, 0.8], kind="add").values
    assert other[1] <= other[0] + 1e-4
