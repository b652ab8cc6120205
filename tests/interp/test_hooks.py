"""Hooks never outlive a run: exceptions, KeyboardInterrupt, and no memory growth over many runs."""
import gc
import weakref

import pytest
import torch

import interp
from interp import Add, Patch, Replace, at

PROMPT = "The Eiffel Tower is located in the city of"


def _boom(exc):
    def fn(x):
        raise exc
    return fn


@pytest.mark.parametrize("exc", [RuntimeError("boom"), KeyboardInterrupt()])
def test_hooks_removed_after_exception_in_hook(gpt2, exc):
    lm = interp.attach(gpt2)
    with pytest.raises(type(exc)):
        lm.run(PROMPT, ops=[Add("blocks.0.resid_pre", torch.ones(64)), Replace("blocks.1.mlp.out", _boom(exc))],
               capture="blocks.*.resid_post")
    assert interp.hook_count(gpt2) == 0
    # the model still runs cleanly afterwards, with identical results
    assert torch.equal(lm.run(PROMPT).logits, gpt2(**gpt2.tokenizer(PROMPT, return_tensors="pt")).logits)


def test_hooks_removed_after_exception_in_grid_metric(gpt2):
    lm = interp.attach(gpt2)
    src = lm.capture(PROMPT, "blocks.1.resid_pre")["blocks.1.resid_pre"]
    rows = [[Patch("blocks.1.resid_pre", src, where=at(pos=p))] for p in range(4)]

    def bad_metric(logits):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        lm.run_grid(PROMPT, rows, bad_metric, progress=False)
    assert interp.hook_count(gpt2) == 0


def test_no_hooks_between_runs_and_model_unchanged(gpt2):
    before = {k: v.clone() for k, v in gpt2.state_dict().items()}
    lm = interp.attach(gpt2)
    lm.run(PROMPT, ops=[Add("blocks.0.resid_pre", torch.ones(64), alpha=3.0)], capture="blocks.*.attn.z")
    assert interp.hook_count(gpt2) == 0
    after = gpt2.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_runs_do_not_keep_inputs_or_caches_alive(gpt2):
    lm = interp.attach(gpt2)
    src = lm.capture(PROMPT, "blocks.1.resid_pre")["blocks.1.resid_pre"]
    ref = weakref.ref(src)
    out = lm.run(PROMPT, ops=[Patch("blocks.1.resid_pre", src, where=at(pos=2))])
    del src, out
    gc.collect()
    assert ref() is None  # nothing in interp or the model holds the patch source


def test_hundred_runs_do_not_grow_memory(gpt2):
    lm = interp.attach(gpt2)
    src = lm.capture(PROMPT, "blocks.1.resid_pre")["blocks.1.resid_pre"]

    def live_tensors():
        gc.collect()
        return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))

    for _ in range(5):  # warm-up
        lm.run(PROMPT, ops=[Patch("blocks.1.resid_pre", src, where=at(pos=3))], capture="blocks.0.resid_post")
    start = live_tensors()
    for _ in range(100):
        lm.run(PROMPT, ops=[Patch("blocks.1.resid_pre", src, where=at(pos=3))], capture="blocks.0.resid_post")
    assert live_tensors() <= start
    assert interp.hook_count(gpt2) == 0
