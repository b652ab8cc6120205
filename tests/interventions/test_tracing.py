"""ROME causal tracing finds the sites planted in a constructed model, equals per-cell reference runs,
and draws a different noise sample for every item of the batch."""
from __future__ import annotations

import pytest
import torch

import interp
from interp import Noise, Patch, Result, at
from interventions.patching import layer_window
from interventions.tracing import embedding_std, trace

T, L, SUBJ, MLP_LAYER, ATTN_LAYER = 6, 4, 2, 1, 2
PROMPT = torch.tensor([[7, 12, 33, 4, 50, 21]])



def planted_gpt2(mlp_scale: float = 50.0, sharpness: float = 300.0):
    """Only the subject token carries information: every other prompt token embeds to zero and there
    are no position embeddings, so other positions stay exactly zero until attention reads the
    subject. One MLP (layer MLP_LAYER, scaled up) rewrites the subject's state; one attention layer
    (ATTN_LAYER, zero queries: uniform causal attention) moves it to the last position. Every other
    attention and MLP writes exactly zero."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    d = 32
    m = GPT2LMHeadModel(GPT2Config(n_layer=L, n_embd=d, n_head=4, vocab_size=61, n_positions=16)).eval()
    with torch.no_grad():
        m.transformer.wpe.weight.zero_()
        for tok in PROMPT[0].tolist():
            if tok != PROMPT[0, SUBJ]:
                m.transformer.wte.weight[tok] = 0.0
        for i, blk in enumerate(m.transformer.h):
            if i != ATTN_LAYER:
                blk.attn.c_proj.weight.zero_()
                blk.attn.c_proj.bias.zero_()
            else:
                blk.attn.c_attn.weight[:, :d] = 0.0   # queries = 0: every position is attended equally
                blk.attn.c_attn.bias[:d] = 0.0
            if i != MLP_LAYER:
                blk.mlp.c_proj.weight.zero_()
                blk.mlp.c_proj.bias.zero_()
            else:
                blk.mlp.c_proj.weight.mul_(mlp_scale)
        m.transformer.ln_f.weight.mul_(sharpness)  # sharp next-token distributions
    return m


@pytest.fixture(scope="module")
def lm():
    return interp.attach(planted_gpt2())




def test_finds_the_planted_mlp_and_attention(lm):
    tr = trace(lm, PROMPT, [SUBJ], window=1, samples=10, progress=False)
    assert tr.p_clean - tr.p_corrupted > 0.05, "the corruption must change the prediction for the test to mean anything"
    mlp, attn = tr["mlp"].values, tr["attn"].values
    te = tr.p_clean - tr.p_corrupted
    layer, tok, v = tr.peak("mlp")
    assert (layer, tok) == (MLP_LAYER, f"{SUBJ}:33*") and v > 0.5 * te
    layer, tok, v = tr.peak("attn")
    assert (layer, tok) == (ATTN_LAYER, f"{T - 1}:21") and v > 0.5 * te
    mlp[MLP_LAYER, SUBJ] = 0.0
    attn[ATTN_LAYER, T - 1] = 0.0
    assert float(mlp.abs().max()) < 1e-5 and float(attn.abs().max()) < 1e-5  # nothing anywhere else
    hidden = tr["hidden"].values
    # single states: the subject token before the attention layer moves it, the last token from then on
    assert torch.all(hidden[:ATTN_LAYER, SUBJ] > 0.5 * te) and torch.all(hidden[ATTN_LAYER:, T - 1] > 0.99 * te)
    assert float(hidden[:, [0, 1, 3, 4]].abs().max()) < 1e-5


def test_equals_per_cell_reference_runs(lm):
    tr = trace(lm, PROMPT, [SUBJ, 3], window=3, samples=5, seed=7, noise=2.0, progress=False)
    std = 2.0 * embedding_std(lm)
    assert tr["mlp"].attrs["noise_std"] == pytest.approx(std)
    batch = PROMPT.repeat(5, 1)
    noise = Noise("embed", std=std, seed=7, where=at(pos=[SUBJ, 3]))
    clean = lm.run(PROMPT, capture=["blocks.*.resid_post", "blocks.*.mlp.out", "blocks.*.attn.out"])
    tid = int(clean.logits[0, -1].argmax())

    def p(ops):
        return float(lm.run(batch, ops=[noise, *ops]).logits[:, -1].softmax(-1)[:, tid].mean())
    p_corr = p([])
    assert tr.p_corrupted == pytest.approx(p_corr, abs=1e-6)
    for layer, pos in [(0, 2), (1, 3), (2, 5), (3, 0)]:
        s = f"blocks.{layer}.resid_post"
        want = p([Patch(s, clean.cache[s], where=at(pos=pos))]) - p_corr
        assert float(tr["hidden"].values[layer, pos]) == pytest.approx(want, abs=1e-5)
        for kind, name in (("mlp", "mlp.out"), ("attn", "attn.out")):
            ops = [Patch(f"blocks.{j}.{name}", clean.cache[f"blocks.{j}.{name}"], where=at(pos=pos))
                   for j in layer_window(layer, 3, L)]
            assert float(tr[kind].values[layer, pos]) == pytest.approx(p(ops) - p_corr, abs=1e-5)


def test_every_item_gets_its_own_noise(lm):
    out = lm.run(PROMPT.repeat(3, 1), ops=[Noise("embed", std=1.0, seed=0, where=at(pos=[SUBJ]))], capture="embed")
    e = out.cache["embed"]
    assert not torch.allclose(e[0, SUBJ], e[1, SUBJ]) and not torch.allclose(e[1, SUBJ], e[2, SUBJ])
    assert torch.equal(e[0, :SUBJ], e[1, :SUBJ]) and torch.equal(e[0, SUBJ + 1:], e[2, SUBJ + 1:])


def test_resid_pre_state_and_layer_subset(lm):
    tr = trace(lm, PROMPT, [SUBJ], kinds=("hidden",), state="resid_pre", layers=[1, 3], samples=4, progress=False)
    assert set(tr.results) == {"hidden"} and tr["hidden"].coord("layer") == [1, 3]
    # resid_pre of layer 3 at the last token holds the moved information
    assert float(tr["hidden"].values[1, T - 1]) > 0.99 * (tr.p_clean - tr.p_corrupted)


def test_save_writes_heatmaps_and_reloadable_numbers(lm, tmp_path):
    tr = trace(lm, PROMPT, [SUBJ], window=2, samples=3, progress=False)
    paths = tr.save(tmp_path)
    for kind in ("hidden", "mlp", "attn"):
        assert paths[f"{kind}.png"].read_bytes()[:4] == b"\x89PNG"
        back = Result.load(paths[f"{kind}.json"])
        assert torch.equal(back.values, tr[kind].values) and back.coords == tr[kind].coords
        assert back.attrs["p_clean"] == pytest.approx(tr.p_clean)


def test_subject_text_on_a_real_tokenizer(gpt2):
    lm = interp.attach(gpt2)
    tr = trace(lm, "The Eiffel Tower is located in the city of", "Eiffel Tower", " Paris", samples=2,
               kinds=("hidden",), progress=False)
    assert tr.subject_positions == [1, 2, 3, 4] and tr.target == " Paris"  # " E" "iff" "el" " Tower"
    assert tr["hidden"].coord("pos")[1].endswith("*") and not tr["hidden"].coord("pos")[0].endswith("*")


def test_bad_input(lm, gpt2):
    with pytest.raises(ValueError, match="unknown trace kind"):
        trace(lm, PROMPT, [SUBJ], kinds=("mlp", "heads"))
    with pytest.raises(ValueError, match="state"):
        trace(lm, PROMPT, [SUBJ], state="resid_mid")
    with pytest.raises(interp.PositionError, match="does not occur"):
        trace(interp.attach(gpt2), "The Eiffel Tower is in", "Colosseum")


def test_seeds_give_the_mean_of_single_seed_traces_and_a_t_interval(lm):
    from interventions.tracing import seed_interval

    multi = trace(lm, PROMPT, [SUBJ, 3], window=3, samples=4, seed=5, seeds=3, noise=2.0, progress=False)
    singles = [trace(lm, PROMPT, [SUBJ, 3], window=3, samples=4, seed=s, noise=2.0, progress=False) for s in (5, 6, 7)]
    for kind in ("hidden", "mlp", "attn"):
        stack = torch.stack([t[kind].values for t in singles])
        torch.testing.assert_close(multi[kind].values, stack.mean(0), rtol=1e-5, atol=1e-6)
        lo, hi = seed_interval(stack, 0.95)
        torch.testing.assert_close(torch.as_tensor(multi[kind].attrs["ci_low"]), lo, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(torch.as_tensor(multi[kind].attrs["ci_high"]), hi, rtol=1e-5, atol=1e-6)
        assert multi[kind].attrs["seeds"] == [5, 6, 7]
        assert multi[kind].attrs["per_seed_peak"] == pytest.approx([float(t[kind].values.max()) for t in singles])
    # the noise draws differ between seeds, so the interval has width where the effect is not flat
    assert (
        float((torch.as_tensor(multi["mlp"].attrs["ci_high"]) - torch.as_tensor(multi["mlp"].attrs["ci_low"])).max())
        > 0
    )
    assert multi.p_corrupted == pytest.approx(sum(t.p_corrupted for t in singles) / 3)


def test_t_quantile_matches_the_table():
    from interventions.tracing import t_quantile

    for df, q975 in ((1, 12.706), (2, 4.303), (4, 2.776), (9, 2.262), (30, 2.042)):
        assert t_quantile(0.975, df) == pytest.approx(q975, abs=2e-3)
    assert t_quantile(0.95, 3) == pytest.approx(2.353, abs=2e-3)
    with pytest.raises(ValueError):
        t_quantile(0.3, 2)
