"""Exceptions and KeyboardInterrupt raised inside ops, metrics, sessions (HF generate) and diffusion sampling,
at seeded random moments, leave no hook and no forward override on any module, and the model still gives its
clean outputs afterwards."""
from __future__ import annotations

import os
import random
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from reliab_helpers import hooks_left  # noqa: E402

import interp  # noqa: E402
from interp import Replace, at  # noqa: E402

FAULTS = (RuntimeError, KeyboardInterrupt)


class Boom(Exception):
    pass


def raising_after(n: int, exc: type[BaseException]):
    """An op function that passes `n` calls through and raises `exc` on the next one."""
    calls = [0]

    def fn(x):
        calls[0] += 1
        if calls[0] > n:
            raise exc("injected fault")
        return x
    return fn


@pytest.fixture(scope="module")
def lm():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(num_hidden_layers=3, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=50, max_position_embeddings=64, pad_token_id=0,
                      bos_token_id=1, eos_token_id=2)
    return interp.attach(LlamaForCausalLM(cfg).eval())


@pytest.fixture(scope="module")
def ids():
    return torch.randint(3, 50, (2, 7), generator=torch.Generator().manual_seed(1))


def _clean_logits(lm, ids):
    with torch.no_grad():
        return lm.model(ids).logits


def _expect_fault(exc, fn):
    with pytest.raises((exc, interp.errors.InterpError)) as info:
        fn()
    return info


SEEDS = random.Random(16).sample(range(1000), 4)


@pytest.mark.parametrize("exc", FAULTS)
@pytest.mark.parametrize("seed", SEEDS)
def test_faults_in_ops_metrics_and_sessions_leave_no_hooks(lm, ids, exc, seed):
    rng = random.Random(seed)
    ref = _clean_logits(lm, ids)
    site = rng.choice(["blocks.0.resid_post", "blocks.1.mlp.out", "blocks.2.attn.out", "embed"])
    cases = {
        "op in run": lambda: lm.run(ids, ops=[Replace(site, raising_after(0, exc))], capture=["blocks.1.resid_pre"]),
        "op in run_grid": lambda: lm.run_grid(ids, [[Replace(site, raising_after(rng.randint(0, 2), exc))]] * 4,
                                              lambda lo: lo[:, -1, 0], progress=False, chunk_rows=1),
        "metric in run_grid": lambda: lm.run_grid(ids, [[Replace(site, lambda x: x * 1.0)]] * 3,
                                                  _metric_raising_after(rng.randint(0, 2), exc), progress=False,
                                                  chunk_rows=1),
        "op in a session": lambda: _in_session(lm, ids, [Replace(site, raising_after(rng.randint(0, 1), exc))]),
        "body of a session": lambda: _body_raises(lm, ids, site, exc),
        "op during generate": lambda: _generate(lm, ids, site, raising_after(rng.randint(1, 4), exc)),
    }
    for name, case in cases.items():
        _expect_fault(exc, case)
        assert hooks_left(lm.model) == [], name
    torch.testing.assert_close(_clean_logits(lm, ids), ref, rtol=0, atol=0)


def _metric_raising_after(n, exc):
    calls = [0]

    def metric(logits):
        calls[0] += 1
        if calls[0] > n:
            raise exc("injected fault in the metric")
        return logits[:, -1, 0]
    return metric


def _in_session(lm, ids, ops):
    with lm.applied(ops):
        for _ in range(3):
            lm.model(ids)


def _body_raises(lm, ids, site, exc):
    with lm.applied([Replace(site, lambda x: x)]):
        lm.model(ids)
        raise exc("injected fault in the body")


def _generate(lm, ids, site, fn):
    with lm.applied([Replace(site, fn, where=at(pos="generated"))]):
        lm.model.generate(ids[:1], max_new_tokens=6, do_sample=False, pad_token_id=0)


@pytest.fixture(scope="module")
def sd():
    from interp.zoo.architectures import build_diffusion_pipeline

    pipe = build_diffusion_pipeline(0, width=8)
    pipe.set_progress_bar_config(disable=True)
    return interp.attach(pipe)


@pytest.mark.parametrize("exc", FAULTS)
def test_faults_during_sampling_leave_no_hooks_and_no_forward_override(sd, exc):
    from interp.diffusion import Sampling

    spec = Sampling("a red circle", seed=2, steps=3, guidance=2.0)
    ref = sd.run(spec, capture="unet.mid").cache["unet.mid"]
    for n in (0, 1, 2):  # the fault at the first, second and third denoising step
        _expect_fault(exc, lambda n=n: sd.run(spec, ops=[Replace("unet.mid", raising_after(n, exc))]))
        assert hooks_left(sd.model) == []
        _expect_fault(exc, lambda n=n: _pipeline_session(sd, raising_after(n, exc)))
        assert hooks_left(sd.model) == []
    torch.testing.assert_close(sd.run(spec, capture="unet.mid").cache["unet.mid"], ref, rtol=0, atol=0)


def _pipeline_session(sd, fn):
    with sd.applied([Replace("unet.mid", fn)], steps_from="unet"):
        sd.model("a red circle", num_inference_steps=3, generator=torch.Generator().manual_seed(2), output_type="np")
