import pytest
import torch

import interp
from probes.toy import ToyLM

# Tiny models and many small solves: extra threads only contend with each other on a shared machine.


@pytest.fixture(scope="session")
def toy():
    torch.manual_seed(0)
    m = ToyLM()
    return m, interp.attach(m)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    """A saved 2-layer random Llama with SmolLM2's real tokenizer (multi-token subjects, varied prompt lengths)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from interp.zoo.smollm2 import cache_dir

    if not (cache_dir() / "tokenizer.json").exists():
        pytest.skip("SmolLM2's tokenizer is not cached yet (run `interp demo` once)")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    folder = tmp_path_factory.mktemp("tiny_llama")
    LlamaForCausalLM(cfg).save_pretrained(folder)
    AutoTokenizer.from_pretrained(str(cache_dir())).save_pretrained(folder)
    return folder
