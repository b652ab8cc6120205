"""Steering vectors carry the identity of the model they were recorded on: applying one to another model of
the same width (another seed, another config) is an error unless forced, also after a round trip through
disk; the same model in another dtype is accepted. A non-finite alpha is refused."""
from __future__ import annotations

import pytest
import torch

import interp
from interventions.steering import ModelMismatchError, SteeringVector, extract, generate, lm_target_prob, model_identity

SITE = "blocks.1.resid_post"


def tiny(seed: int, layers: int = 2, heads: int = 4):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(num_hidden_layers=layers, hidden_size=32, intermediate_size=64, num_attention_heads=heads,
                      num_key_value_heads=2, vocab_size=40, max_position_embeddings=32, pad_token_id=0)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def vector():
    lm = interp.attach(tiny(0))
    g = torch.Generator().manual_seed(0)
    pos, neg = torch.randint(1, 40, (6, 5), generator=g), torch.randint(1, 40, (6, 5), generator=g)
    return extract(lm, pos, neg, SITE, reduce="last", model="tiny-0")


def _use(lm, sv, force=False):
    ids = torch.randint(1, 40, (1, 5), generator=torch.Generator().manual_seed(3))
    with sv.apply(lm, 2.0, force=force):
        return lm.model(ids).logits


def test_the_recording_model_accepts_its_vector(vector):
    assert vector.identity and vector.identity["arch"]
    base = interp.attach(tiny(0))
    ids = torch.randint(1, 40, (1, 5), generator=torch.Generator().manual_seed(3))
    assert not torch.equal(_use(base, vector), base.model(ids).logits)  # it steers


@pytest.mark.parametrize("other,why", [(lambda: tiny(1), "other weights"),
                                       (lambda: tiny(0, layers=3), "architecture or config"),
                                       (lambda: tiny(0, heads=8), "architecture or config")])
def test_another_model_of_the_same_width_is_an_error_unless_forced(vector, other, why):
    lm = interp.attach(other())
    with pytest.raises(ModelMismatchError, match=why):
        _use(lm, vector)
    with pytest.raises(ModelMismatchError, match="force=True"):
        generate(lm, "", vector, 1.0) if lm.tokenizer is not None else vector.check(lm)
    _use(lm, vector, force=True)  # forced: applied


def test_identity_survives_disk_and_a_change_of_dtype(vector, tmp_path):
    path = vector.save(tmp_path / "v")
    back = SteeringVector.load(path)
    assert back.identity == vector.identity and torch.equal(back.vector, vector.vector)
    with pytest.raises(ModelMismatchError):
        _use(interp.attach(tiny(1)), back)
    for dtype in (torch.float64, torch.bfloat16):
        assert model_identity(tiny(0).to(dtype))["arch"] == vector.identity["arch"]
        back.check(interp.attach(tiny(0).to(dtype)))  # same weights, other dtype: accepted


def test_lm_target_prob_checks_every_vector(vector):
    lm = interp.attach(tiny(1))
    with pytest.raises(ModelMismatchError):
        lm_target_prob(lm, {"steer": vector}, ["a"], ["b"], [0.0, 1.0], progress=False)


def test_a_vector_without_identity_is_not_checked_and_alpha_must_be_finite():
    bare = SteeringVector(torch.ones(32), SITE)
    _use(interp.attach(tiny(5)), bare)
    for alpha in (float("nan"), float("inf"), "x"):
        with pytest.raises(interp.errors.InterpError, match="alpha"):
            bare.op(alpha)


def test_identity_of_a_model_with_a_huge_tensor_samples_inside_it():
    """float32 linspace rounds 28311551 (SmolLM2's embedding, 49152 x 576) up past the last index."""
    big = torch.nn.Embedding(49152, 576)
    ident = model_identity(big)
    assert len(ident["sample"]) == 64 and ident["sample"][-1] == float(big.weight.detach().reshape(-1)[-1])
