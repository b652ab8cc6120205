"""run / run_grid semantics on tiny GPT-2: identities, equivalence with per-row runs, selectors."""
import torch

import interp
from interp import Add, Noise, Patch, Subject, Tokens, at

CLEAN = "The Eiffel Tower is located in the city of"
CORRUPT = "The Colosseum is located in the city of"


def test_clean_into_clean_is_bitwise_identity(gpt2):
    lm = interp.attach(gpt2)
    clean = lm.run(CLEAN, capture="blocks.*.resid_pre")
    for site in ["blocks.0.resid_pre", "blocks.1.resid_pre"]:
        out = lm.run(CLEAN, ops=[Patch(site, clean.cache[site])])
        assert torch.equal(out.logits, clean.logits)


def test_add_alpha_zero_is_bitwise_identity(gpt2):
    lm = interp.attach(gpt2)
    base = lm.run(CLEAN)
    v = torch.randn(64)
    out = lm.run(
        CLEAN, ops=[Add("blocks.1.resid_pre", v, alpha=0.0), Add("blocks.0.mlp.out", v, alpha=0.0, norm="relative")]
    )
    assert torch.equal(out.logits, base.logits)
    moved = lm.run(CLEAN, ops=[Add("blocks.1.resid_pre", v, alpha=1.0)])
    assert not torch.equal(moved.logits, base.logits)


def test_patch_changes_only_later_positions(gpt2):
    lm = interp.attach(gpt2)
    clean = lm.run(CLEAN, capture="blocks.0.resid_pre")
    out = lm.run(CORRUPT, ops=[Patch("blocks.0.resid_pre", clean.cache["blocks.0.resid_pre"], where=at(pos=4))],
                 capture="blocks.1.resid_pre")
    base = lm.run(CORRUPT, capture="blocks.1.resid_pre")
    a, b = out.cache["blocks.1.resid_pre"][0], base.cache["blocks.1.resid_pre"][0]
    assert torch.equal(a[:4], b[:4])          # causal attention: earlier positions untouched
    assert (a[4:] - b[4:]).abs().amax(-1).min() > 0  # position 4 and later all moved


def test_grid_equals_per_row_runs_with_and_without_prefix_reuse(gpt2):
    lm = interp.attach(gpt2)
    clean = lm.run(CLEAN, capture=["blocks.*.resid_pre", "blocks.*.attn.z", "blocks.*.mlp.out"])
    rows = []
    for l in range(2):
        rows.append([Patch(f"blocks.{l}.resid_pre", clean.cache[f"blocks.{l}.resid_pre"], where=at(pos=3))])
        rows.append([Patch(f"blocks.{l}.attn.z", clean.cache[f"blocks.{l}.attn.z"], where=at(pos=[2, 9], heads=[1]))])
        rows.append([Patch(f"blocks.{l}.mlp.out", clean.cache[f"blocks.{l}.mlp.out"], where=at(pos=-1), alpha=0.5)])
        rows.append([Noise("embed", std=0.5, seed=l), Add(f"blocks.{l}.resid_pre", torch.ones(64), alpha=2.0)])
    metric = lambda logits: logits[:, -1, :50].float()
    ref = torch.stack([metric(lm.run(CORRUPT, ops=r).logits) for r in rows])
    for reuse in (True, False):
        for chunk in (1, 3, None):
            g = lm.run_grid(CORRUPT, rows, metric, reuse_prefix=reuse, chunk_rows=chunk, progress=False)
            assert g.values.shape == ref.shape
            torch.testing.assert_close(g.values, ref, rtol=1e-5, atol=1e-5)
    assert g.stats["rows"] == len(rows)
    assert interp.hook_count(gpt2) == 0


def test_prefix_reuse_does_less_work(gpt2):
    lm = interp.attach(gpt2)
    clean = lm.run(CLEAN, capture="blocks.*.resid_pre")
    rows = [[Patch(f"blocks.{l}.resid_pre", clean.cache[f"blocks.{l}.resid_pre"], where=at(pos=p))]
            for l in range(2) for p in range(10)]
    fast = lm.run_grid(CORRUPT, rows, progress=False)
    slow = lm.run_grid(CORRUPT, rows, progress=False, reuse_prefix=False)
    # layer reuse alone: 10 full + 10 half = 15; positional reuse (interp.prefix) does less again
    assert fast.stats["prefix_reuse"] and fast.stats["forward_equivalents"] <= 15.0
    assert slow.stats["forward_equivalents"] == 20.0
    torch.testing.assert_close(fast.values, slow.values, rtol=1e-5, atol=1e-5)


def test_shared_ops_apply_to_every_row_and_batch_items(gpt2):
    lm = interp.attach(gpt2)
    batch = [CORRUPT, CLEAN]
    shared = [Noise("embed", std=1.0, seed=7, where=at(pos=Subject("Colosseum", "all"), items=[0]))]
    clean = lm.run(batch, capture="blocks.1.resid_pre")
    rows = [[Patch("blocks.1.resid_pre", clean.cache["blocks.1.resid_pre"], where=at(pos=p))] for p in (2, 5)]
    g = lm.run_grid(batch, rows, lambda lg: lg[:, -1, :20], shared=shared, progress=False)
    for i, r in enumerate(rows):
        ref = lm.run(batch, ops=[*shared, *r]).logits[:, -1, :20]
        torch.testing.assert_close(g.values[i], ref, rtol=1e-5, atol=1e-5)
    noisy = lm.run(batch, ops=shared).logits
    plain = lm.run(batch).logits
    assert not torch.equal(noisy[0], plain[0]) and torch.equal(noisy[1], plain[1])  # items=[0] only


def test_noise_is_seeded_and_reproducible(gpt2):
    lm = interp.attach(gpt2)
    a = lm.run(CLEAN, ops=[Noise("embed", std=0.3, seed=1)]).logits
    b = lm.run(CLEAN, ops=[Noise("embed", std=0.3, seed=1)]).logits
    c = lm.run(CLEAN, ops=[Noise("embed", std=0.3, seed=2)]).logits
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_token_selectors(gpt2):
    lm = interp.attach(gpt2)
    # GPT-2 BPE: ['The', ' E', 'iff', 'el', ' Tower', ' is', ' located', ' in', ' the', ' city', ' of']
    assert lm.positions(CLEAN, Subject("Eiffel Tower")) == [4]
    assert lm.positions(CLEAN, Subject("Eiffel Tower", "all")) == [1, 2, 3, 4]
    assert lm.positions(CLEAN, Subject("Eiffel", "first")) == [1]
    assert lm.positions(CLEAN, Tokens("city")) == [9]
    assert lm.positions(CLEAN, -1) == [10]


def test_capture_dtype_offload_and_memory_report(gpt2):
    lm = interp.attach(gpt2)
    cache = lm.capture(CLEAN, ["blocks.*.resid_post", "blocks.0.attn.z"], capture_dtype=torch.float16, offload="cpu")
    assert set(cache) == {"blocks.0.resid_post", "blocks.1.resid_post", "blocks.0.attn.z"}
    assert cache["blocks.0.attn.z"].shape == (1, 11, 4, 16) and cache["blocks.0.attn.z"].dtype == torch.float16
    assert cache.memory_bytes == 3 * 11 * 64 * 2
    assert "MiB" in cache.report()


def test_residual_stream_bookkeeping(gpt2):
    lm = interp.attach(gpt2)
    c = lm.capture(
        CLEAN,
        ["blocks.*.resid_pre", "blocks.*.resid_mid", "blocks.*.resid_post", "blocks.*.attn.out", "blocks.*.mlp.out"],
    )
    for l in range(2):
        torch.testing.assert_close(c[f"blocks.{l}.resid_pre"] + c[f"blocks.{l}.attn.out"], c[f"blocks.{l}.resid_mid"])
        torch.testing.assert_close(c[f"blocks.{l}.resid_mid"] + c[f"blocks.{l}.mlp.out"], c[f"blocks.{l}.resid_post"])
    torch.testing.assert_close(c["blocks.0.resid_post"], c["blocks.1.resid_pre"])


def test_patching_resid_mid_edits_the_residual_stream(gpt2):
    """resid_mid is both the MLP's norm input and the residual added back: a patch must reach both."""
    lm = interp.attach(gpt2)
    clean = lm.capture(CLEAN, ["blocks.0.resid_mid", "blocks.0.resid_post"])
    out = lm.run(CORRUPT, ops=[Patch("blocks.0.resid_mid", clean["blocks.0.resid_mid"])], capture="blocks.0.resid_post")
    torch.testing.assert_close(out.cache["blocks.0.resid_post"], clean["blocks.0.resid_post"], rtol=0, atol=1e-6)


def test_column_metric_head_computes_only_its_columns(gpt2, monkeypatch):
    from interp import metrics

    lm = interp.attach(gpt2)
    clean = lm.run(CLEAN, capture=["blocks.*.resid_pre", "blocks.*.attn.z"])
    rows = [[Patch(f"blocks.{l}.resid_pre", clean.cache[f"blocks.{l}.resid_pre"], where=at(pos=p))]
            for l in range(2) for p in (0, 4, 9)]                                   # packed rows
    rows += [[Patch(f"blocks.{l}.attn.z", clean.cache[f"blocks.{l}.attn.z"], where=at(heads=[h]))]
             for l in range(2) for h in (0, 3)]                                       # full-length replays
    rows += [[Add("logits", torch.ones(50257), alpha=0.5)]]                           # an op on the head itself
    col = metrics.logit_diff(11, 22)
    plain = lambda logits: logits[:, -1, 11].float() - logits[:, -1, 22].float()
    torch.testing.assert_close(col(clean.logits), plain(clean.logits))
    ref = torch.stack([plain(lm.run(CORRUPT, ops=r).logits) for r in rows])

    full_rows = []
    tail = lm.adapter.tail
    monkeypatch.setattr(lm.adapter, "tail", lambda h, last: (full_rows.append(h.shape[0]), tail(h, last))[1])
    for metric in (plain, col):
        full_rows.clear()
        g = lm.run_grid(CORRUPT, rows, metric, progress=False)
        torch.testing.assert_close(g.values, ref, rtol=1e-5, atol=1e-5)
        n_full = sum(full_rows)
        if metric is plain:
            assert n_full >= len(rows)
    # the column metric needs the full head only for the recording replay and the row that edits the logits
    assert n_full <= 2
    assert g.stats["positional_reuse"]
    assert interp.hook_count(gpt2) == 0


def test_add_at_a_repeated_position_adds_once_per_listing(gpt2):
    """pos=[3, 3] adds v twice at position 3, as alpha=2 at pos=[3] does: the ops' distinct-destinations shortcut
    (no duplicate check in the kernel) must not collapse a repeated listing into one."""
    lm = interp.attach(gpt2)
    v = torch.randn(64)
    twice = lm.run(CLEAN, ops=[Add("blocks.1.resid_pre", v, where=at(pos=[3, 3]))])
    doubled = lm.run(CLEAN, ops=[Add("blocks.1.resid_pre", v, alpha=2.0, where=at(pos=[3]))])
    once = lm.run(CLEAN, ops=[Add("blocks.1.resid_pre", v, where=at(pos=[3]))])
    torch.testing.assert_close(twice.logits, doubled.logits, rtol=0, atol=1e-5)
    assert not torch.allclose(once.logits, twice.logits, atol=1e-4)
