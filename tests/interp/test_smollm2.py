"""The embedded default: SmolLM2-135M-Instruct loads offline and knows where the Eiffel Tower is."""
import time

import pytest

import interp
from interp import metrics


@pytest.fixture(scope="module")
def smol():
    return interp.attach(interp.zoo.load("smollm2"))


def test_loads_offline_and_predicts_paris(smol):
    out = smol.run("The Eiffel Tower is located in the city of")
    probs = out.logits[0, -1].softmax(-1)
    top = int(probs.argmax())
    assert smol.tokenizer.decode([top]) == " Paris"
    assert 0.6 < float(probs[top]) < 0.8  # 0.70 for the Q4_1 GGUF weights
    assert smol.n_layers == 30 and smol.site("blocks.29.attn.z").heads == 9
    assert smol.capture("The Colosseum is in", "blocks.3.attn.k")["blocks.3.attn.k"].shape[2:] == (3, 64)  # GQA


def test_second_load_reads_the_safetensors_cache():
    from interp.zoo import smollm2

    assert (smollm2.cache_dir() / "model.safetensors").exists()
    t = time.perf_counter()
    interp.zoo.load("smollm2")
    assert time.perf_counter() - t < 25  # the GGUF dequantisation (~30 s) is not repeated


def test_colosseum_fact_and_metric_helpers(smol):
    italy = metrics.token_id(smol.tokenizer, " Italy")
    p = metrics.prob(italy)(smol.run("The Colosseum is in the country of").logits)
    assert float(p) > 0.5
    with pytest.raises(ValueError, match="single-token"):
        metrics.token_id(smol.tokenizer, " Eiffel Tower")
