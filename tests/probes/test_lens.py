"""Logit lens equals the model's own head on each layer; the tuned lens beats it on held-out rows; disk round trip."""
import pytest
import torch

import interp
from interp.store import ActivationStore, batched
from probes.dictionaries.lens import LensError, TunedLens, lens_kl, logit_lens, plot_lens, train_tuned_lens


def tiny_gpt2(gpt2_tokenizer, seed=0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(n_layer=3, n_embd=32, n_head=4, vocab_size=len(gpt2_tokenizer), n_positions=64,
                     attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0)
    m = GPT2LMHeadModel(cfg).eval()
    m.tokenizer = gpt2_tokenizer
    return m


def test_logit_lens_is_the_head_on_each_layer(gpt2_tokenizer, tmp_path):
    model = tiny_gpt2(gpt2_tokenizer)
    lm = interp.attach(model, tokenizer=gpt2_tokenizer)
    prompt = "The Eiffel Tower is in the city of"
    res = logit_lens(lm, prompt)
    assert res.axes == ("layer", "pos") and res.shape == (3, len(lm.tokens(prompt)))
    # plain torch: hidden states from HF, final norm + head by hand
    with torch.no_grad():
        out = model(**gpt2_tokenizer(prompt, return_tensors="pt"), output_hidden_states=True)
    for layer in range(3):
        h = out.hidden_states[layer + 1]
        if layer < 2:  # HF's last hidden state already has the final norm applied
            h = model.transformer.ln_f(h)
        p = model.lm_head(h)[0].softmax(-1)
        assert torch.allclose(res.values[layer], p.max(-1).values, atol=1e-5)
        assert res.attrs["top_tokens"][layer][-1] == gpt2_tokenizer.decode([int(p[-1].argmax())])
    assert max(abs(v) for v in res.attrs["kl_to_final"][-1]) < 1e-5  # the last layer is the model
    png = plot_lens(res, tmp_path / "lens.png")
    assert png.stat().st_size > 5000
    back = interp.Result.load(res.save(tmp_path / "lens"))
    assert torch.equal(back.values, res.values) and back.attrs["top_tokens"] == res.attrs["top_tokens"]


def test_tuned_lens_beats_logit_lens_on_held_out_rows(gpt2_tokenizer, tmp_path):
    model = tiny_gpt2(gpt2_tokenizer)
    lm = interp.attach(model, tokenizer=gpt2_tokenizer)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 5000, (48, 16), generator=g)
    store = ActivationStore(lm, "blocks.*.resid_post", shard_rows=256).fill(batched(ids[:40], 8), progress=False)
    held = ActivationStore(lm, "blocks.*.resid_post").fill(batched(ids[40:], 8), progress=False).tensors()
    tl = train_tuned_lens(lm, store, steps=150, batch_size=128, lr=3e-3, progress=False)
    kl_logit, kl_tuned = lens_kl(lm, held), lens_kl(lm, held, tl)
    assert kl_tuned[-1] == pytest.approx(kl_logit[-1], abs=1e-6) and kl_logit[-1] < 1e-5
    for layer in range(2):
        assert kl_tuned[layer] < 0.7 * kl_logit[layer], (kl_tuned, kl_logit)
    back = TunedLens.load(tl.save(tmp_path / "tl"))
    assert torch.equal(back.A, tl.A)
    res = logit_lens(lm, "hello there my friend", tuned=back)
    assert res.attrs["lens"] == "tuned lens"
    # the zero-initialised tuned lens is the logit lens
    zero = logit_lens(lm, "hello there my friend", tuned=TunedLens(3, 32))
    assert torch.allclose(zero.values, logit_lens(lm, "hello there my friend").values, atol=1e-6)


def test_lens_errors():
    net = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(LensError, match="head"):
        logit_lens(interp.attach(net), torch.zeros(1, 2, 4))
