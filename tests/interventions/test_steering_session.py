"""interp's `applied` sessions (ops across many forward calls) and spatial Add, on tiny models.

The references are plain torch: a cache-less forward of the whole generated sequence with the
same Add at the same absolute positions, and hand-written norm-relative additions.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

import interp
from interp import Add, OpNeverFiredError, PositionError, SiteShapeError, Tokens, at

SITE = "blocks.1.resid_post"


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg).eval()
    return model, interp.attach(model), torch.randint(1, 64, (2, 6), generator=torch.Generator().manual_seed(1))


def _gen(model, ids, n=6, **kw):
    out = model.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=0, output_scores=True,
                         return_dict_in_generate=True, **kw)
    return out.sequences, torch.stack(out.scores, 1)


def test_alpha_zero_generation_is_bitwise_identical(tiny):
    model, lm, ids = tiny
    seq, scores = _gen(model, ids)
    v = torch.randn(32)
    with lm.applied([Add(SITE, v, alpha=0.0, norm="relative")]):
        seq0, scores0 = _gen(model, ids)
    assert torch.equal(seq, seq0) and torch.equal(scores, scores0)
    assert interp.hook_count(model) == 0


@pytest.mark.parametrize("use_cache", [True, False])
def test_generated_only_matches_full_sequence_reference(tiny, use_cache):
    """Positions are absolute in the full sequence: steering generated tokens through the KV cache
    equals one cache-less forward of the final sequence with the Add at positions >= prompt length."""
    model, lm, ids = tiny
    P = ids.shape[1]
    v = torch.randn(32, generator=torch.Generator().manual_seed(3))
    op = Add(SITE, v, alpha=1.5, norm="relative", where=at(pos="generated"))
    with lm.applied([op]) as s:
        seq, scores = _gen(model, ids, use_cache=use_cache)
    assert s.edits == [5]  # 6 calls: the prompt (nothing generated yet) + 5 with a new token
    ref = lm.run(seq, ops=[Add(SITE, v, alpha=1.5, norm="relative", where=at(pos=slice(P, None)))]).logits
    torch.testing.assert_close(scores, ref[:, P - 1:-1], atol=2e-5, rtol=1e-4)
    base = lm.run(seq).logits  # the steering changed the logits of generated positions only
    assert torch.equal(base[:, :P], ref[:, :P]) and (base[:, P:] - ref[:, P:]).abs().max() > 1e-2


def test_absolute_and_token_positions_across_cached_calls(tiny):
    model, lm, ids = tiny
    P = ids.shape[1]
    v = torch.randn(32)
    tok = {int(i): f"t{int(i)}" for i in range(64)}

    class Tok:
        def decode(self, ids):
            return " " + tok[int(ids[0])]

    lm2 = interp.attach(model, tokenizer=Tok())
    word = tok[int(ids[0, 2])]
    for pos, want in [([2, P + 1], [2, P + 1]), (-1, None), (Tokens(word), [2])]:
        with lm2.applied([Add(SITE, v, alpha=2.0, norm="relative", where=at(pos=pos, items=0))]):
            seq, _ = _gen(model, ids[:1])
        if want is None:  # -1 = the prompt's last token, as in `run` (the same with and without a KV cache)
            want = [P - 1]
        ref = lm.run(seq, ops=[Add(SITE, v, alpha=2.0, norm="relative", where=at(pos=sorted(set(want)), items=0))])
        ref_seq = ref.logits[0, P - 1:-1].argmax(-1)
        assert torch.equal(seq[0, P:], ref_seq), pos


def test_unfired_ops_raise_and_hooks_are_removed(tiny):
    model, lm, ids = tiny
    with pytest.raises(OpNeverFiredError, match="generated"):
        with lm.applied([Add(SITE, torch.ones(32), alpha=1.0, where=at(pos="generated"))]):
            model.generate(ids, max_new_tokens=1, do_sample=False, pad_token_id=0)
    with pytest.raises(RuntimeError, match="boom"):
        with lm.applied([Add(SITE, torch.ones(32), alpha=1.0)]):
            raise RuntimeError("boom")
    assert interp.hook_count(model) == 0
    with pytest.raises(PositionError, match="only string position"):
        lm.applied([Add(SITE, torch.ones(32), where=at(pos="prompt"))]).__enter__()
    assert interp.hook_count(model) == 0


class Stepper(nn.Module):
    """x_{t+1} = block(x_t): a rollout loop that calls the root once per step."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([nn.Linear(8, 8) for _ in range(2)])

    def forward(self, x):
        for b in self.blocks:
            x = x + torch.tanh(b(x))
        return x


def test_step_windows_in_a_rollout_loop():
    torch.manual_seed(0)
    model = Stepper().eval()
    lm = interp.attach(model)
    v = torch.randn(8)
    x0 = torch.randn(3, 5, 8)

    def rollout(edit_steps=()):
        xs, x = [], x0
        for t in range(5):
            a = model.blocks[0](x)  # the site: the first Linear's output
            if t in edit_steps:
                a = a + 0.5 * v * a.norm(dim=-1, keepdim=True) / v.norm()
            h = x + torch.tanh(a)
            x = h + torch.tanh(model.blocks[1](h))
            xs.append(x)
        return torch.stack(xs)

    with torch.no_grad():
        xs, x = [], x0
        with lm.applied([Add("module:blocks.0", v, alpha=0.5, norm="relative", where=at(steps=(1, 3)))],
                        steps_from="") as sess:
            for _ in range(5):
                x = model(x)
                xs.append(x)
        assert sess.ctx.step == 4 and sess.edits == [2]
        torch.testing.assert_close(torch.stack(xs), rollout((1, 2)), atol=1e-6, rtol=1e-6)
        assert not torch.allclose(torch.stack(xs), rollout(()), atol=1e-3)
        with lm.applied([Add("module:blocks.0", v, alpha=0.0, norm="relative")], steps_from=""):
            x = x0
            for _ in range(5):
                x = model(x)
        assert torch.equal(x, rollout(())[-1])
        with pytest.raises(OpNeverFiredError, match="steps"):
            with lm.applied([Add("module:blocks.0", v, where=at(steps=(7, 9)))], steps_from=""):
                model(x0)


class Conv(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


@pytest.mark.parametrize("mode", ["average", "keep"])
def test_spatial_add_on_grid_activations(mode):
    torch.manual_seed(0)
    model = Conv().eval()
    lm = interp.attach(model)
    x = torch.randn(2, 3, 5, 6)
    h = model.a(x).detach()
    if mode == "average":
        v = torch.randn(4)
        edited = h + 0.3 * v[None, :, None, None] * h.norm(dim=1, keepdim=True) / v.norm()
    else:
        v = torch.randn(4, 5, 6)
        edited = h + 0.3 * v[None] * h.flatten(1).norm(dim=1)[:, None, None, None] / v.norm()
    want = model.b(torch.relu(edited))
    op = Add("module:a", v, alpha=0.3, norm="relative", spatial=mode)
    torch.testing.assert_close(lm.run(x, ops=[op]).logits, want, atol=1e-5, rtol=1e-5)
    with lm.applied([op]):  # the same op inside a session (e.g. a denoising loop)
        torch.testing.assert_close(model(x), want, atol=1e-5, rtol=1e-5)
    only1 = lm.run(x, ops=[Add("module:a", v, alpha=0.3, norm="relative", spatial=mode, where=at(items=1))]).logits
    torch.testing.assert_close(only1[0], model(x)[0])
    torch.testing.assert_close(only1[1], want[1], atol=1e-5, rtol=1e-5)
    with pytest.raises(SiteShapeError, match="spatial"):
        lm.run(x, ops=[Add("module:a", torch.randn(7), alpha=0.3, spatial=mode)])
    with pytest.raises(ValueError, match="spatial"):
        Add("module:a", v, spatial="sum")
