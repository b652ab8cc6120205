"""interp.collect against plain torch hooks: every position spec, padded batches, tensors, dicts, errors."""
import pytest
import torch

import interp
from interp.collect import EmptyInputsError, batches, collect
from interp.errors import InterpError, PositionError

PROMPTS = ["The Eiffel Tower is in Paris", "A cat", "The Colosseum stands in the city of Rome", "Paris is big"]
SITE = "blocks.1.resid_post"


def _hooked(model, ids: torch.Tensor) -> torch.Tensor:
    """blocks.1 output [T, d] of one unpadded prompt, read with a plain torch forward hook."""
    got = []
    h = model.transformer.h[1].register_forward_hook(lambda m, a, o: got.append(o[0] if isinstance(o, tuple) else o))
    try:
        with torch.no_grad():
            model(ids[None])
    finally:
        h.remove()
    return got[0][0].float()


@pytest.fixture
def setup(gpt2):
    lm = interp.attach(gpt2, tokenizer=gpt2.tokenizer)
    tok = gpt2.tokenizer
    ref = []
    for p in PROMPTS:
        ids = torch.tensor(tok(p)["input_ids"])
        ref.append((_hooked(gpt2, ids), tok.convert_ids_to_tokens(ids.tolist())))
    return lm, ref


def _expect(ref, pick):
    return torch.stack([pick(i, x, toks) for i, (x, toks) in enumerate(ref)])


@pytest.mark.parametrize("batch_size", [1, 3, 4])
def test_every_position_spec_matches_unpadded_hooks(setup, batch_size):
    lm, ref = setup
    cases = [
        ("last", lambda i, x, t: x[-1]),
        ("mean", lambda i, x, t: x.mean(0)),
        (0, lambda i, x, t: x[0]),
        (-2, lambda i, x, t: x[-2]),
        (slice(1, None), lambda i, x, t: x[1:].mean(0)),
        ([0, 1], lambda i, x, t: x[:2].mean(0)),
        (interp.Subject("Paris"), None),
        (lambda i, toks: [0, len(toks) - 1], lambda i, x, t: (x[0] + x[-1]) / 2),
    ]
    for spec, pick in cases:
        if isinstance(spec, interp.Subject):
            prompts = [p for p in PROMPTS if "Paris" in p]
            sub = [r for r, p in zip(ref, PROMPTS) if "Paris" in p]
            got = collect(lm, prompts, SITE, spec, batch_size=batch_size)[SITE]
            want = torch.stack([x[[k for k, s in enumerate(t) if "Paris" in s][-1]] for x, t in sub])
        else:
            got = collect(lm, PROMPTS, SITE, spec, batch_size=batch_size)[SITE]
            want = _expect(ref, pick)
        assert got.shape == want.shape, spec
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, msg=f"spec {spec!r}")


def test_named_positions_stack_on_axis_one_and_tokens_spec(setup):
    lm, ref = setup
    prompts = [PROMPTS[0], PROMPTS[3]]
    got = collect(lm, prompts, [SITE, "blocks.0.resid_post"], {"paris": interp.Tokens("Paris"), "end": -1},
                  batch_size=2)
    assert got[SITE].shape == (2, 2, ref[0][0].shape[-1])
    for j, i in enumerate((0, 3)):
        x, toks = ref[i]
        k = [n for n, s in enumerate(toks) if s.strip("Ġ ") == "Paris"][0]
        torch.testing.assert_close(got[SITE][j, 0], x[k], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got[SITE][j, 1], x[-1], atol=1e-5, rtol=1e-5)


def test_tensor_inputs_keep_every_position_dtype_and_device(gpt2, setup):
    lm, _ = setup
    ids = torch.randint(0, 1000, (5, 7), generator=torch.Generator().manual_seed(0))
    got = collect(lm, ids, SITE, None, batch_size=2, dtype=torch.float64, progress=True)[SITE]
    want = torch.stack([_hooked(gpt2, r) for r in ids]).double()
    assert got.dtype == torch.float64 and got.device.type == "cpu" and got.shape == (5, 7, want.shape[-1])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    kept = collect(lm, ids, SITE, -1, batch_size=5, dtype=None, device=None)[SITE]
    assert kept.dtype == torch.float32
    torch.testing.assert_close(kept, want[:, -1].float(), atol=1e-5, rtol=1e-5)


def test_batches_cut_dicts_tuples_and_pass_ready_batches():
    d = {"x": torch.arange(10), "scale": torch.tensor(2.0), "y": torch.arange(10) * 2}
    cut = list(batches(d, 4))
    assert [b["x"].tolist() for b, _ in cut] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert all(b["scale"].item() == 2.0 for b, _ in cut) and [s for _, s in cut] == [0, 4, 8]
    only_x = list(batches(d, 4, split_keys=["x"]))
    assert only_x[0][0]["y"].shape[0] == 10
    tup = list(batches((torch.zeros(5, 2), 3), 2))
    assert [b[0].shape[0] for b, _ in tup] == [2, 2, 1] and all(b[1] == 3 for b, _ in tup)
    ready = list(batches([torch.zeros(3, 2), torch.zeros(2, 2)], 100))
    assert [s for _, s in ready] == [0, 3]


def test_bad_specs_and_inputs_fail_with_one_line_errors(setup, gpt2):
    lm, _ = setup
    with pytest.raises(PositionError, match="cannot select positions"):
        collect(lm, PROMPTS, SITE, "first")
    with pytest.raises(PositionError, match="out of range"):
        collect(lm, PROMPTS, SITE, 5)                 # "A cat" has 2 tokens
    with pytest.raises(EmptyInputsError):
        collect(lm, torch.zeros(0, 3, dtype=torch.long), SITE, "last")
    with pytest.raises(interp.UnknownSiteError):
        collect(lm, PROMPTS, "blocks.9.resid_post", "last")
    with pytest.raises(InterpError, match="batch_size"):
        collect(lm, PROMPTS, SITE, "last", batch_size=0)
    assert interp.hook_count(gpt2) == 0
