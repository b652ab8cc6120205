"""Every adapter family on a tiny config: sites resolve, the residual bookkeeping holds, grids equal per-row runs."""
import pytest
import torch

import interp
from interp import Patch, at


def _lm(kind):
    import transformers as tf

    torch.manual_seed(0)
    common = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                  num_attention_heads=4, max_position_embeddings=64)
    if kind == "llama":
        return tf.LlamaForCausalLM(tf.LlamaConfig(num_key_value_heads=2, **common))
    if kind == "qwen2":
        return tf.Qwen2ForCausalLM(tf.Qwen2Config(num_key_value_heads=2, **common))
    if kind == "gemma":
        return tf.GemmaForCausalLM(tf.GemmaConfig(num_key_value_heads=1, head_dim=16, **common))
    if kind == "gemma2":
        return tf.Gemma2ForCausalLM(tf.Gemma2Config(num_key_value_heads=2, head_dim=16, **common))
    if kind == "neox":
        return tf.GPTNeoXForCausalLM(tf.GPTNeoXConfig(**common))
    if kind == "gpt2":
        return tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=128, n_embd=64, n_layer=3, n_head=4, n_positions=64))
    raise ValueError(kind)


KV = {"llama": 2, "qwen2": 2, "gemma": 1, "gemma2": 2, "neox": 4, "gpt2": None}


@pytest.mark.parametrize("kind", list(KV))
def test_causal_lm_family(kind):
    model = _lm(kind).eval()
    lm = interp.attach(model)
    assert lm.family == "hf_lm" and lm.n_layers == 3
    ids = torch.randint(0, 128, (2, 7))
    names = set(lm.site_names())
    for need in ["embed", "blocks.0.resid_pre", "blocks.2.attn.out", "blocks.1.attn.z", "blocks.1.mlp.out",
                 "blocks.2.resid_post", "final", "logits"]:
        assert need in names, (kind, need)
    c = lm.run(
        ids, capture=["blocks.*.resid_pre", "blocks.*.resid_post", "blocks.*.attn.*", "blocks.*.mlp.out", "logits"]
    )
    cap = getattr(model.config, "final_logit_softcapping", None)  # Gemma 2 caps after lm_head
    site_logits = c.cache["logits"] if not cap else torch.tanh(c.cache["logits"] / cap) * cap
    torch.testing.assert_close(site_logits, c.logits)
    for l in range(2):
        torch.testing.assert_close(c.cache[f"blocks.{l}.resid_post"], c.cache[f"blocks.{l + 1}.resid_pre"])
    z = c.cache["blocks.1.attn.z"]
    assert z.shape == (2, 7, 4, 16)  # query heads, right also for grouped-query attention
    if KV[kind] is not None and kind != "neox":
        assert c.cache["blocks.1.attn.k"].shape == (2, 7, KV[kind], 16)
        assert c.cache["blocks.1.attn.q"].shape == (2, 7, 4, 16)
    if kind not in ("neox", "gemma2"):  # parallel residual / post-attention norm: no plain resid_mid identity
        mid = lm.capture(ids, "blocks.1.resid_mid")["blocks.1.resid_mid"]
        torch.testing.assert_close(c.cache["blocks.1.resid_pre"] + c.cache["blocks.1.attn.out"], mid)
        torch.testing.assert_close(mid + c.cache["blocks.1.mlp.out"], c.cache["blocks.1.resid_post"])
    # zeroing one head's z at one position changes the output; a grid equals per-row runs, with prefix reuse
    other = torch.randint(0, 128, (2, 7))
    src = lm.capture(other, ["blocks.*.attn.z", "blocks.*.resid_pre"])
    rows = [[Patch(f"blocks.{l}.attn.z", src[f"blocks.{l}.attn.z"], where=at(pos=p, heads=[h]))]
            for l in (0, 2) for p in (1, 6) for h in (0, 3)]
    rows += [[Patch(f"blocks.{l}.resid_pre", src[f"blocks.{l}.resid_pre"], where=at(pos=3))] for l in range(3)]
    g = lm.run_grid(ids, rows, lambda lg: lg[:, -1].float(), progress=False)
    ref = torch.stack([lm.run(ids, ops=r).logits[:, -1].float() for r in rows])
    torch.testing.assert_close(g.values, ref, rtol=1e-4, atol=1e-4)
    assert g.stats["prefix_reuse"], f"{kind}: replay of blocks should validate"
    assert interp.hook_count(model) == 0


def test_bert_encoder_minilm(minilm_dir):
    from transformers import AutoModel, AutoTokenizer

    model = AutoModel.from_pretrained(str(minilm_dir)).eval()
    tok = AutoTokenizer.from_pretrained(str(minilm_dir))
    enc = interp.attach(model, tokenizer=tok)
    assert enc.family == "hf_encoder" and enc.n_layers == 6
    out = enc.run("a red circle on the left", capture=["embed", "blocks.*.resid_post", "blocks.0.attn.z",
                                                       "blocks.0.attn.out", "blocks.0.resid_mid"])
    torch.testing.assert_close(out.cache["blocks.5.resid_post"], out.logits)  # last_hidden_state
    assert out.cache["blocks.0.attn.z"].shape[2:] == (12, 32)
    ref = model(**tok("a red circle on the left", return_tensors="pt")).last_hidden_state
    torch.testing.assert_close(out.logits, ref)
    noisy = enc.run("a red circle on the left", ops=[interp.Noise("embed", std=1.0, seed=0, where=at(pos=2))]).logits
    assert (noisy - ref).abs().amax((0, 2))[2] > 0


def test_generic_module_uses_raw_paths():
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    m = interp.attach(net)
    assert m.family == "generic" and m.site_names() == ["module:0", "module:1", "module:2"]
    x = torch.randn(3, 4)
    c = m.run(x, capture=["module:1", "module:2:input"])
    torch.testing.assert_close(c.cache["module:1"], c.cache["module:2:input"])
    zeroed = m.run(x, ops=[interp.Ablate("module:1", "zero")]).logits
    torch.testing.assert_close(zeroed, net[2].bias.expand(3, 2))


def test_ablate_mean_and_resample(gpt2):
    lm = interp.attach(gpt2)
    prompts = ["The Eiffel Tower is located in the city of", "The Colosseum is located in the city of"]
    acts = lm.capture(prompts, "blocks.1.mlp.out")["blocks.1.mlp.out"]
    mean = acts.mean(0)
    out = lm.run(prompts[0], ops=[interp.Ablate("blocks.1.mlp.out", "mean", values=mean)], capture="blocks.1.mlp.out")
    torch.testing.assert_close(out.cache["blocks.1.mlp.out"][0], mean)
    res = lm.run(prompts[0], ops=[interp.Ablate("blocks.1.mlp.out", "resample", values=acts[1:], seed=3)],
                 capture="blocks.1.mlp.out")
    torch.testing.assert_close(res.cache["blocks.1.mlp.out"][0], acts[1])
