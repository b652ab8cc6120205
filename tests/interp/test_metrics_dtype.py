"""Metrics keep a float64 model's precision (16-bit logits are widened to float32, float64 is not narrowed)."""
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

import interp
from interp import Patch, at
from interp.metrics import kl_to, logit_diff, logprob, prob


@pytest.fixture(scope="module")
def lm64():
    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=100, n_positions=32, bos_token_id=0, eos_token_id=0)
    return interp.attach(GPT2LMHeadModel(cfg).eval().double())


def test_every_metric_keeps_float64(lm64):
    logits = lm64.run(torch.randint(0, 100, (2, 6))).logits
    for metric in (logit_diff(1, 2), prob(1), logprob(1), kl_to(logits[0, -1])):
        assert metric(logits).dtype == torch.float64, metric
    assert logit_diff(1, 2)(logits.half()).dtype == torch.float32  # 16-bit logits are widened


def test_grid_values_of_a_float64_model_are_float64_and_exact(lm64):
    clean, corrupted = torch.randint(0, 100, (1, 6)), torch.randint(0, 100, (1, 6))
    src = lm64.run(clean, capture="blocks.1.resid_pre").cache["blocks.1.resid_pre"]
    rows = [[Patch("blocks.1.resid_pre", src, where=at(pos=p))] for p in range(6)]
    grid = lm64.run_grid(corrupted, rows, logit_diff(1, 2), progress=False)
    assert grid.values.dtype == torch.float64
    for p in range(6):  # each row equals its own run, in float64
        one = lm64.run(corrupted, ops=rows[p]).logits
        assert abs(float(grid.values[p].reshape(-1)[0]) - float(logit_diff(1, 2)(one)[0])) < 1e-12
