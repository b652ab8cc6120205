"""DAS / IIA on the constructed model: ~100% at the write site, chance elsewhere and on the random-init copy."""
import pytest
import torch

import interp
from probes import das, fit_das, iia_map
from probes.baseline import random_copy

KW = dict(k=2, candidates=[0, 1, 2], epochs=10, lr=0.05, batch_size=100)


def test_iia_is_full_at_the_write_site_and_chance_elsewhere(toy):
    m, lm = toy
    base, source, tgt = m.counterfactual_pairs(500, seed=1)
    res = iia_map(lm, ["blocks.1.resid_post", "blocks.2.resid_post", "blocks.3.resid_post"], [0, 3],
                  base, source, tgt, progress=False, **KW)
    trained = res.sel(model="trained")
    iia = trained.sel(measure="iia").values                     # [layer, pos]
    floor = trained.sel(measure="base_agreement").values
    assert iia[1, 1] > 0.97                                       # (layer 2, last position)
    others = [iia[i, j] for i in range(3) for j in range(2) if (i, j) != (1, 1)]
    assert max(others) < float(floor.max()) + 0.15                 # no better than not intervening
    assert abs(float(floor.mean()) - 1 / 3) < 0.12
    # swapping the whole last-position vector also carries q from the source: far from 100%
    assert trained.sel(measure="iia_full_vector").values[1, 1] < 0.6
    assert res.sel(model="random-init", measure="iia").values.max() < 0.6


def test_training_leaves_the_model_untouched(toy):
    m, lm = toy
    before = {k: v.clone() for k, v in m.state_dict().items()}
    base, source, tgt = m.counterfactual_pairs(100, seed=2)
    al = fit_das(lm, "blocks.2.resid_post", -1, base, source, tgt, k=2, candidates=[0, 1, 2], epochs=1, progress=False)
    assert all(p.grad is None for p in m.parameters())
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    assert interp.hook_count(m) == 0
    R = al.rotation()
    assert torch.allclose(R @ R.T, torch.eye(R.shape[0]), atol=1e-5)
    assert torch.allclose(R[:2], al.W)


def test_das_single_site_report_and_errors(toy):
    m, lm = toy
    base, source, tgt = m.counterfactual_pairs(300, seed=3)
    r = das(lm, "blocks.2.resid_post", 3, base, source, tgt, random_baseline=False, **KW)
    assert r.axes == ("model", "measure") and r.sel(model="trained", measure="iia").values > 0.97
    with pytest.raises(ValueError, match="choose 1 <= k"):
        fit_das(lm, "blocks.2.resid_post", 3, base, source, tgt, k=1000, progress=False)
    with pytest.raises(ValueError, match="align one to one"):
        fit_das(lm, "blocks.2.resid_post", 3, base[:5], source, tgt, progress=False)


def test_random_copy_reinitialises_without_touching_the_original(toy):
    m, _ = toy
    before = m.lm_head.weight.clone()
    r = random_copy(m, seed=0)
    assert torch.equal(m.lm_head.weight, before)
    assert not torch.equal(r.lm_head.weight, m.lm_head.weight)
    assert torch.equal(random_copy(m, seed=0).lm_head.weight, r.lm_head.weight)   # seeded
    X, lab = m.dataset()
    acc = (r(X).logits[:, -1, :3].argmax(-1) == torch.tensor(lab["y"])).float().mean()
    assert acc < 0.6


def test_prompts_of_different_lengths_are_batched_by_length(tiny_llama_dir):
    from probes import iia
    from probes.das import site_activations
    from recipes.models import load

    lm = interp.attach(load(str(tiny_llama_dir)))
    prompts = ["The Eiffel Tower is in", "The Leaning Tower of Pisa is in", "Big Ben is in", "The Louvre is in"]
    assert len({len(lm.tokens(p)) for p in prompts}) > 1
    acts = site_activations(lm, prompts, "blocks.1.resid_post", -1, batch_size=8)
    for i, p in enumerate(prompts):
        alone = lm.run(p, capture="blocks.1.resid_post").cache["blocks.1.resid_post"][0, -1]
        assert torch.allclose(acts[i], alone, atol=1e-5)
    tgt = torch.tensor([0, 1, 0, 1])
    al = fit_das(lm, "blocks.1.resid_post", -1, prompts, prompts[::-1], tgt, k=2, candidates=[5, 6], epochs=1,
                 progress=False)
    assert 0.0 <= iia(lm, al, prompts, prompts[::-1], tgt, candidates=[5, 6]) <= 1.0
