"""Mediation effects on mediators whose role is known: a complete cut of the model (NDE = 0,
NIE = TE), a site off the causal path (NIE = 0, NDE = TE), and per-cell reference runs."""
from __future__ import annotations

import pytest
import torch

import interp
from interp import Patch, at
from interp.metrics import logit_diff
from interventions.mediation import Mediator, mediation

T, L = 6, 3
METRIC = logit_diff(5, 9)



@pytest.fixture(scope="module")
def lm():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(4)
    cfg = LlamaConfig(num_hidden_layers=L, hidden_size=48, intermediate_size=96, num_attention_heads=6,
                      num_key_value_heads=2, vocab_size=61, max_position_embeddings=32)
    return interp.attach(LlamaForCausalLM(cfg).eval())


def pair():
    g = torch.Generator().manual_seed(8)
    clean = torch.randint(0, 61, (2, T), generator=g)
    corrupted = clean.clone()
    corrupted[:, 1] = (corrupted[:, 1] + 11) % 61
    return clean, corrupted


def test_a_complete_cut_mediates_everything(lm):
    clean, corrupted = pair()
    res = mediation(lm, clean, corrupted, ["embed", "blocks.1.resid_pre", "blocks.2.resid_post"], METRIC,
                    progress=False)
    assert res.axes == ("mediator", "effect") and res.coord("effect") == ["TE", "NIE", "NDE"]
    te = float(METRIC(lm.run(corrupted).logits).mean() - METRIC(lm.run(clean).logits).mean())
    assert abs(te) > 1e-3
    for name in res.coord("mediator"):
        row = res.sel(mediator=name).values
        assert float(row[0]) == pytest.approx(te, abs=1e-5)
        assert float(row[1]) == pytest.approx(te, abs=1e-4)   # NIE = TE
        assert float(row[2]) == pytest.approx(0.0, abs=1e-4)  # NDE = 0


def test_a_site_off_the_path_mediates_nothing(lm):
    clean, corrupted = pair()
    # the last layer's output at position 0 never reaches the last position's logits
    res = mediation(lm, clean, corrupted, [Mediator("blocks.2.resid_post", pos=0)], METRIC, progress=False)
    te, nie, nde = res.values[0].tolist()
    assert nie == pytest.approx(0.0, abs=1e-5) and nde == pytest.approx(te, abs=1e-5)


def test_partial_mediators_equal_per_cell_runs(lm):
    clean, corrupted = pair()
    meds = [("blocks.1.attn.z", -1, [0, 4]), Mediator("blocks.0.mlp.out", pos=[1, 2]), "blocks.1.attn.out"]
    res = mediation(lm, clean, corrupted, meds, METRIC, progress=False)
    sites = ["blocks.1.attn.z", "blocks.0.mlp.out", "blocks.1.attn.out"]
    c = lm.run(clean, capture=sites)
    k = lm.run(corrupted, capture=sites)
    m_c = METRIC(c.logits).mean()
    wheres = [at(pos=-1, heads=[0, 4]), at(pos=[1, 2]), at()]
    for i, (s, w) in enumerate(zip(sites, wheres)):
        nie = METRIC(lm.run(clean, ops=[Patch(s, k.cache[s], where=w)]).logits).mean() - m_c
        nde = METRIC(lm.run(corrupted, ops=[Patch(s, c.cache[s], where=w)]).logits).mean() - m_c
        assert float(res.values[i, 1]) == pytest.approx(float(nie), abs=1e-5)
        assert float(res.values[i, 2]) == pytest.approx(float(nde), abs=1e-5)
    assert res.coord("mediator")[0] == "blocks.1.attn.z pos=-1 heads=[0, 4]"


def test_bad_mediators(lm):
    clean, corrupted = pair()
    with pytest.raises(ValueError, match="at least one mediator"):
        mediation(lm, clean, corrupted, [], METRIC)
    with pytest.raises(interp.UnknownSiteError, match="Did you mean"):
        mediation(lm, clean, corrupted, ["blocks.1.mlp_out"], METRIC)
    with pytest.raises(TypeError, match="mediator is a site name"):
        mediation(lm, clean, corrupted, [3], METRIC)


def test_float64_model_keeps_float64_effects():
    """A float64 model's effects are not rounded to float32: TE equals the float64 reference run to 1e-12
    (a float32 cast would leave errors ~1e-7 of the metric's size)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(5)
    cfg = LlamaConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=61, max_position_embeddings=32)
    lm64 = interp.attach(LlamaForCausalLM(cfg).double().eval())
    clean, corrupted = pair()
    metric = lambda logits: logits[:, -1, 5] - logits[:, -1, 9]  # keeps the logits' dtype
    res = mediation(lm64, clean, corrupted, ["blocks.1.resid_pre", Mediator("blocks.1.resid_post", pos=0)], metric,
                    progress=False)
    assert res.values.dtype == torch.float64
    with torch.no_grad():
        te = metric(lm64.run(corrupted).logits).mean() - metric(lm64.run(clean).logits).mean()
    assert te.dtype == torch.float64 and abs(float(te)) > 1e-3
    assert abs(float(res.values[0, 0]) - float(te)) < 1e-12
    assert abs(float(res.values[0, 1]) - float(te)) < 1e-10  # a complete cut: NIE = TE in float64 too
