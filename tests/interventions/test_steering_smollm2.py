"""SmolLM2 (the real pretrained LM): a sentiment vector moves p(positive words) monotonically, and
steering inside HF `generate` is exact (alpha = 0 bitwise, generated tokens only)."""
from __future__ import annotations

import pytest
import torch

import interp
from interventions import steering as S
from recipes.steer import EVAL, NEGATIVE, POSITIVE, TARGETS

SITE = "blocks.8.resid_post"


@pytest.fixture(scope="module")
def smol():
    from interp.errors import OfflineModelError
    from interp.zoo import load

    try:
        model = load("smollm2")
    except OfflineModelError as e:
        pytest.skip(str(e))
    torch.set_grad_enabled(False)
    lm = interp.attach(model)
    sv, p, n = S.extract(lm, POSITIVE, NEGATIVE, SITE, method="caa", reduce="last", model="smollm2",
                         return_activations=True)
    yield lm, sv, S.controls(sv, p, n)
    torch.set_grad_enabled(True)


def test_sentiment_vector_shifts_target_probability_monotonically(smol):
    lm, sv, vecs = smol
    res = S.lm_target_prob(lm, vecs, EVAL[:2], TARGETS, [-0.2, 0.0, 0.2], progress=False)
    m = res.attrs["monotonicity"]
    assert m["steer"]["increasing"], res.values
    lo, mid, hi = res.sel(vector="steer").values.tolist()
    assert hi > 1.3 * mid and lo < mid / 1.3  # a real shift both ways, not a rounding wobble
    for c in ("random", "norm_matched"):  # neither control moves p(targets) up like the vector does
        assert res.sel(vector=c, alpha=0.2).values.item() < mid + 0.5 * (hi - mid), (c, res.values)


def test_generate_alpha_zero_is_bitwise_and_generated_only_spares_the_prompt(smol):
    lm, sv, _ = smol
    prompt = EVAL[0]
    plain = S.generate(lm, prompt, max_new_tokens=5)
    zero = S.generate(lm, prompt, sv, 0.0, max_new_tokens=5)
    assert torch.equal(plain["ids"], zero["ids"]) and torch.equal(plain["scores"], zero["scores"])
    steered = S.generate(lm, prompt, sv, 0.3, max_new_tokens=5)
    # the first new token is predicted from the prompt alone, which "generated" does not touch
    assert torch.equal(steered["scores"][0], plain["scores"][0])
    assert (steered["scores"][1:] - plain["scores"][1:]).abs().max() > 1e-2
    assert interp.hook_count(lm.model) == 0
