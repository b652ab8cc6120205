"""Edits and LEACE erasers folded into weights, written with the atomic checkpoint writer, reloaded by stock
transformers (AutoModelForCausalLM) with the in-memory outputs; folds that are not exact are refused."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import interp
from interventions.checkpoint import folder_hash, read_manifest, verify_files, write_checkpoint
from interventions.editing import EditError, Fact, ValueConfig, down_proj, edit, key_stats
from interventions.editing.evaluate import edited
from interventions.editing.fold import fold_eraser_edit, folded_output_error
from interventions.erasure import LeaceEraser

sys.path.insert(0, str(Path(__file__).parent))
from editing_models import tiny_gpt2, tiny_llama  # noqa: E402

CTX = ["{}", "We talked. {}"]
PROMPTS = ["I visited the Eiffel Tower", "The weather in Paris is nice", "She likes to read books at night"]


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("INTERP_CACHE", str(tmp_path / "cache"))


def _logits(model, tok, prompts=PROMPTS):
    with torch.no_grad():
        return [model(tok(p, return_tensors="pt")["input_ids"]).logits for p in prompts]


def _source(tmp_path, build, tok):
    """A saved unedited checkpoint, loaded back the way a user would (from its folder)."""
    from transformers import AutoModelForCausalLM

    src = tmp_path / "src"
    build(tok).save_pretrained(src)
    model = AutoModelForCausalLM.from_pretrained(src).eval()
    model.tokenizer = tok
    return src, model


@pytest.mark.parametrize("build", [tiny_gpt2, tiny_llama], ids=["gpt2-conv1d", "llama-linear"])
@pytest.mark.parametrize("method", ["rome", "memit"])
def test_edited_checkpoint_reloads_in_stock_transformers(tmp_path, gpt2_tokenizer, build, method):
    from transformers import AutoModelForCausalLM

    tok = gpt2_tokenizer
    src, model = _source(tmp_path, build, tok)
    before_hash = folder_hash(src)
    lm = interp.attach(model)
    layers = [1] if method == "rome" else [0, 1]
    stats = key_stats(lm, [down_proj(lm, l) for l in layers], n_tokens=2000, length=32, progress=False)
    e = edit(lm, [Fact("I visited the {}", "Eiffel Tower", " Rome")], method, layers, stats=stats, context=CTX,
             value_cfg=ValueConfig(clamp=4.0, steps=30), progress=False)
    clean = _logits(model, tok)
    with edited(model, e):
        want = _logits(model, tok)
        dest = write_checkpoint(model, tmp_path / "edited", e, source=src)
    assert folder_hash(src) == before_hash and verify_files(dest) == []
    man = read_manifest(dest)
    assert man["method"] == method and man["facts"][0]["subject"] == "Eiffel Tower"
    assert man["key_statistics"][str(layers[0])]["n_tokens"] >= 2000
    plain = AutoModelForCausalLM.from_pretrained(dest).eval()
    got = _logits(plain, tok)
    for g, w, _c in zip(got, want, clean):
        assert float((g - w).abs().max()) < 1e-5
    assert max(float((w - c).abs().max()) for w, c in zip(want, clean)) > 1e-2  # the edit is in there


def _eraser(lm, site):
    """LEACE fitted on `site` with labels: does the prompt mention a place (Paris/Eiffel) or not."""
    acts = lm.capture(PROMPTS[0:1], site)[site][0]
    acts2 = lm.capture(PROMPTS[2:3], site)[site][0]
    x = torch.cat([acts, acts2]).double()
    z = torch.tensor([1] * len(acts) + [0] * len(acts2))
    return LeaceEraser.fit(x, z)


def test_leace_folded_into_gpt2_output_projection_reloads_exactly(tmp_path, gpt2_tokenizer):
    from transformers import AutoModelForCausalLM

    tok = gpt2_tokenizer
    src, model = _source(tmp_path, tiny_gpt2, tok)
    lm = interp.attach(model)
    for site in ("blocks.1.mlp.out", "blocks.0.attn.out"):
        er = _eraser(lm, site)
        fe = fold_eraser_edit(lm, site, er, concept="place")
        assert fe.info["exact"]
        ids = tok(PROMPTS[1], return_tensors="pt")["input_ids"]
        assert folded_output_error(lm, site, er, fe, ids) < 1e-5
    with torch.no_grad():
        want = lm.run(ids, ops=[er.op(site)]).logits
    with edited(model, fe):
        dest = write_checkpoint(model, tmp_path / "erased", fe, source=src)
    plain = AutoModelForCausalLM.from_pretrained(dest).eval()
    with torch.no_grad():
        got = plain(ids).logits
    assert float((got - want).abs().max()) < 1e-5
    assert read_manifest(dest)["method"] == "leace-fold"


def test_folds_that_are_not_exact_are_refused(gpt2_tokenizer):
    tok = gpt2_tokenizer
    lm = interp.attach(tiny_llama(tok))
    er = _eraser(lm, "blocks.1.mlp.out")
    with pytest.raises(EditError, match="no bias"):
        fold_eraser_edit(lm, "blocks.1.mlp.out", er)
    shifted = fold_eraser_edit(lm, "blocks.1.mlp.out", er, allow_mean_shift=True)
    assert not shifted.info["exact"]
    for site in ("blocks.1.resid_mid", "blocks.1.resid_post", "final"):
        e2 = _eraser(lm, site)
        with pytest.raises(EditError, match="norm is not linear|no single linear layer"):
            fold_eraser_edit(lm, site, e2)


def test_cli_edit_fact_writes_a_stock_checkpoint(tmp_path, gpt2_tokenizer, capsys):
    from transformers import AutoModelForCausalLM

    from recipes.cli import main

    src = tmp_path / "src"
    tiny_gpt2(gpt2_tokenizer).save_pretrained(src)
    gpt2_tokenizer.save_pretrained(src)
    before = folder_hash(src)
    out = tmp_path / "out"
    rc = main(["edit", "fact", "--model", str(src), "--prompt", "I visited the {}", "--subject", "Eiffel Tower",
               "--target", " Rome", "--method", "rome", "--layers", "1", "--tokens", "1000", "--out", str(out)])
    assert rc == 0
    msg = capsys.readouterr().out
    assert "p(target)" in msg and "within 1e-5" in msg
    assert folder_hash(src) == before and read_manifest(out)["method"] == "rome"
    plain = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = gpt2_tokenizer("I visited the Eiffel Tower", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        p = plain(ids).logits[0, -1].softmax(-1)[gpt2_tokenizer(" Rome")["input_ids"][0]]
    assert float(p) > 0.5
    rc = main(["edit", "fact", "--model", str(src), "--prompt", "no subject slot", "--subject", "x", "--target", " y",
               "--out", str(tmp_path / "bad")])
    assert rc == 2 and "no '{}'" in capsys.readouterr().err
