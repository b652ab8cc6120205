"""Steering and capture inside `generate`: the same with and without the KV cache, for every position spec.

Greedy `generate` under `lm.applied([Add(...)])` must give the same tokens with `use_cache=True` and
`use_cache=False`, and both must equal a hand-written greedy loop that runs the full sequence at every
step with a plain torch forward hook adding the vector at the spec's absolute positions (resolved on
the prompt; None, "generated" and open slices reach into generated tokens).
"""
from __future__ import annotations

import pytest
import torch

import interp
from interp import Add, Subject, Tokens, at

from .test_properties import tiny_llama

PROMPT = "The cat sat on the mat and the dog"
SPECS = [None, 3, [1, 4], -1, -3, slice(2, 5), slice(4, None), slice(-3, None), Tokens(" the"),
         Tokens(" the", occurrence=-1), Subject("the dog", "all"), Subject("cat sat"), "generated"]


def ref_positions(spec, prompt_tokens: list[str], P: int, T: int) -> list[int]:
    """Absolute positions < T that `spec` selects in a sequence whose first P tokens are the prompt."""
    if spec is None:
        return list(range(T))
    if spec == "generated":
        return list(range(P, T))
    if isinstance(spec, int):
        p = spec + P if spec < 0 else spec
        return [p] if p < T else []
    if isinstance(spec, list):
        return [p for s in spec for p in ref_positions(s, prompt_tokens, P, T)]
    if isinstance(spec, slice):
        open_end = spec.stop is None and (spec.start is None or spec.start >= 0)
        return list(range(T if open_end else P))[spec]
    if isinstance(spec, Tokens):
        hits = [i for i, t in enumerate(prompt_tokens) if t.strip() == spec.text.strip()]
        return hits if spec.occurrence is None else [hits[spec.occurrence]]
    full = "".join(prompt_tokens)
    a = full.find(spec.text) if spec.occurrence == 0 else full.rfind(spec.text)
    starts = [sum(len(t) for t in prompt_tokens[:i]) for i in range(len(prompt_tokens))]
    pos = [i for i, (s, t) in enumerate(zip(starts, prompt_tokens)) if s < a + len(spec.text) and s + len(t) > a]
    return {"last": pos[-1:], "first": pos[:1], "all": pos}[spec.which]


def ref_generate(model, block, ids, vector, alpha, spec, n_new, tokens):
    """Greedy decoding without a cache; a plain pre-hook adds alpha * vector at the absolute positions."""
    P = ids.shape[1]
    seq = ids
    for _ in range(n_new):
        pos = ref_positions(spec, tokens, P, seq.shape[1])

        def pre(m, args, kwargs, pos=pos):
            h = (args[0] if args else kwargs["hidden_states"]).clone()
            h[:, pos] += alpha * vector
            return ((h, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": h})
        handle = block.register_forward_pre_hook(pre, with_kwargs=True)
        try:
            with torch.no_grad():
                nxt = model(input_ids=seq).logits[:, -1].argmax(-1, keepdim=True)
        finally:
            handle.remove()
        seq = torch.cat([seq, nxt], 1)
    return seq


def _generate(model, lm, ids, ops, n_new, cache):
    with torch.no_grad(), lm.applied(ops):
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n_new, do_sample=False,
                              use_cache=cache, pad_token_id=0)


@pytest.fixture(scope="module")
def llama(gpt2_tokenizer):
    m = tiny_llama()
    m.tokenizer = gpt2_tokenizer
    m.generation_config.pad_token_id = 0
    return m, interp.attach(m)


@pytest.mark.parametrize("spec", SPECS, ids=repr)
def test_steering_under_generate_is_independent_of_the_kv_cache_on_a_gqa_model(llama, spec):
    model, lm = llama
    ids = torch.tensor([model.tokenizer(PROMPT)["input_ids"]])
    tokens = [model.tokenizer.decode([int(t)]) for t in ids[0]]
    v = torch.randn(64, generator=torch.Generator().manual_seed(1))
    ops = [Add("blocks.1.resid_pre", v, alpha=6.0, where=at(pos=spec))]
    with_cache = _generate(model, lm, ids, ops, 6, True)
    without = _generate(model, lm, ids, ops, 6, False)
    want = ref_generate(model, model.model.layers[1], ids, v, 6.0, spec, 6, tokens)
    assert with_cache.tolist() == without.tolist() == want.tolist()
    assert interp.hook_count(model) == 0


def test_the_steering_in_these_tests_changes_the_tokens(llama):
    """Guards the test above against a vector too weak to matter."""
    model, lm = llama
    ids = torch.tensor([model.tokenizer(PROMPT)["input_ids"]])
    v = torch.randn(64, generator=torch.Generator().manual_seed(1))
    plain = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False)
    changed = [spec for spec in (None, -1, "generated", Tokens(" the"))
               if _generate(model, lm, ids, [Add("blocks.1.resid_pre", v, alpha=6.0, where=at(pos=spec))], 6,
                            True).tolist() != plain.tolist()]
    assert len(changed) >= 3, changed


def test_capture_around_generate_is_the_whole_sequence_with_and_without_the_cache(llama):
    model, lm = llama
    ids = torch.tensor([model.tokenizer(PROMPT)["input_ids"]])
    got = {}
    for cache in (True, False):
        with torch.no_grad(), lm.applied(capture=["blocks.0.resid_post", "blocks.1.attn.k"]) as s:
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False,
                                 use_cache=cache)
        got[cache] = s.cache
    full = lm.run(out[:, :-1], capture=["blocks.0.resid_post", "blocks.1.attn.k"]).cache
    for name in ("blocks.0.resid_post", "blocks.1.attn.k"):
        assert got[True][name].shape == got[False][name].shape == full[name].shape
        torch.testing.assert_close(got[True][name], full[name], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(got[False][name], full[name], rtol=1e-4, atol=1e-5)


def test_repeated_calls_of_one_shape_stack_in_linear_time():
    """A session around many equal-shape calls (a rollout): calls stack on axis 0, in call order."""
    net = torch.nn.Sequential(torch.nn.Linear(4, 4))
    lm = interp.attach(net)
    xs = [torch.randn(2, 4, generator=torch.Generator().manual_seed(i)) for i in range(37)]
    site = "module:0"
    with torch.no_grad(), lm.applied(capture=site) as s:
        outs = [net(x) for x in xs]
    assert s.cache[site].shape == (37, 2, 4) and s.cache.axes[site][0] == "call"
    assert torch.equal(s.cache[site], torch.stack(outs))


@pytest.fixture(scope="module")
def smol():
    return interp.attach(interp.zoo.load("smollm2"))


def test_steering_smollm2_under_generate_is_independent_of_the_kv_cache(smol):
    """Before the fix, pos=-1 gave " Paris, Italy." with the cache and " Paris, France." without it."""
    model = smol.model
    ids = smol.tokenizer("The Eiffel Tower is in the city of", return_tensors="pt")["input_ids"]
    acts = [smol.run(w, capture="blocks.10.resid_pre").cache["blocks.10.resid_pre"][0, -1] for w in (" Rome", " Paris")]
    v = acts[0] - acts[1]
    for spec in (None, 2, -1, slice(1, 4), Tokens(" Tower"), Subject("Eiffel Tower"), "generated"):
        ops = [Add("blocks.10.resid_pre", v, alpha=1.0, norm="relative", where=at(pos=spec))]
        with_cache = _generate(model, smol, ids, ops, 6, True)
        without = _generate(model, smol, ids, ops, 6, False)
        assert with_cache.tolist() == without.tolist(), spec
