"""Every sweep kind equals one reference run per cell (lm.run with one Patch), on tiny GPT-2 (sdpa and
eager attention) and a tiny grouped-query Llama; the positional prefix reuse and the exact no-op skip
are in use while they agree."""
from __future__ import annotations

import pytest
import torch

import interp
from interp import Patch, Result, at
from interp.metrics import kl_to, logit_diff, normalized, prob
from interventions.patching import head_sweep, layer_window, make_metric, patch_sweep, sweep_all

T = 6


def tiny_gpt2(attn="sdpa"):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=3, n_embd=32, n_head=4, vocab_size=61, n_positions=16, attn_implementation=attn)
    return GPT2LMHeadModel(cfg).eval()


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1)
    cfg = LlamaConfig(num_hidden_layers=3, hidden_size=48, intermediate_size=96, num_attention_heads=6,
                      num_key_value_heads=2, vocab_size=61, max_position_embeddings=32)
    return LlamaForCausalLM(cfg).eval()



MODELS = {"gpt2": tiny_gpt2, "gpt2-eager": lambda: tiny_gpt2("eager"), "llama-gqa": tiny_llama}


_CACHE: dict = {}


def attached(name):
    if name not in _CACHE:
        _CACHE[name] = interp.attach(MODELS[name]())
    return _CACHE[name]


@pytest.fixture(params=["gpt2", "llama-gqa"])
def lm(request):
    return attached(request.param)


def pair(differ=(2,)):
    g = torch.Generator().manual_seed(3)
    clean = torch.randint(0, 61, (1, T), generator=g)
    corrupted = clean.clone()
    for p in differ:
        corrupted[0, p] = (corrupted[0, p] + 7) % 61
    return clean, corrupted


METRIC = logit_diff(5, 9)


def reference(lm, base, source_input, cells, metric):
    """One lm.run per cell: cells are lists of (site, where-kwargs); returns normalised effects."""
    src = lm.run(source_input, capture=sorted({s for c in cells for s, _ in c}))
    m_base = metric(lm.run(base).logits).mean()
    m_src = metric(src.logits).mean()
    vals = torch.stack([metric(lm.run(base, ops=[Patch(s, src.cache[s], where=at(**w)) for s, w in c]).logits).mean()
                        for c in cells])
    return normalized(vals, m_src, m_base)


CASES = [(m, k, "denoise") for m in ("gpt2", "llama-gqa") for k in ("resid_pre", "resid_mid", "resid_post",
                                                                    "attn.out", "mlp.out")]
CASES += [("gpt2-eager", "resid_pre", "denoise"), ("gpt2", "attn.out", "noise"), ("llama-gqa", "resid_post", "noise")]


@pytest.mark.parametrize("model,kind,direction", CASES)
def test_sweep_equals_per_cell_reference(model, kind, direction):
    lm = attached(model)
    clean, corrupted = pair()
    res = patch_sweep(lm, clean, corrupted, kind, METRIC, direction=direction, progress=False)
    base, source = (corrupted, clean) if direction == "denoise" else (clean, corrupted)
    cells = [[(f"blocks.{l}.{kind}", {"pos": p})] for l in range(3) for p in range(T)]
    want = reference(lm, base, source, cells, METRIC).reshape(3, T)
    assert res.axes == ("layer", "pos") and res.shape == (3, T)
    torch.testing.assert_close(res.values, want, atol=2e-4, rtol=1e-3)
    stats = res.attrs["grid"]
    # positions before the first differing token are exact no-ops; later cells are packed by position
    assert stats["skipped_cells"] >= 3 * 2
    assert stats["positional_reuse"] and stats["packed_rows"] > 0
    assert stats["forward_equivalents"] < 3 * T / 2


def test_window_of_layers_patches_all_layers_at_once(lm):
    clean, corrupted = pair(differ=(1, 4))
    res = patch_sweep(lm, clean, corrupted, "mlp.out", METRIC, window=2, progress=False, skip_equal=False)
    cells = [[(f"blocks.{j}.mlp.out", {"pos": p}) for j in layer_window(l, 2, 3)] for l in range(3) for p in range(T)]
    torch.testing.assert_close(res.values, reference(lm, corrupted, clean, cells, METRIC).reshape(3, T),
                               atol=2e-4, rtol=1e-3)
    assert layer_window(1, 2, 3) == [0, 1] and layer_window(0, 10, 30) == list(range(0, 5))
    assert layer_window(29, 10, 30) == list(range(24, 30))


def test_heads_over_all_positions_and_by_position(lm):
    clean, corrupted = pair(differ=(3,))
    H = lm.site("blocks.0.attn.z").heads
    assert H == lm.model.config.num_attention_heads  # query heads, also for grouped-query attention
    res = head_sweep(lm, clean, corrupted, METRIC, progress=False)
    cells = [[(f"blocks.{l}.attn.z", {"heads": h})] for l in range(3) for h in range(H)]
    assert res.axes == ("layer", "head")
    torch.testing.assert_close(res.values, reference(lm, corrupted, clean, cells, METRIC).reshape(3, H),
                               atol=2e-4, rtol=1e-3)
    res = head_sweep(lm, clean, corrupted, METRIC, by_position=True, progress=False)
    cells = [[(f"blocks.{l}.attn.z", {"pos": p, "heads": h})] for l in range(3) for h in range(H) for p in range(T)]
    assert res.axes == ("layer", "head", "pos")
    torch.testing.assert_close(res.values, reference(lm, corrupted, clean, cells, METRIC).reshape(3, H, T),
                               atol=2e-4, rtol=1e-3)


@pytest.mark.parametrize("name", ["prob", "kl", "logit_diff"])
def test_metrics_and_normalised_effect(name):
    lm = interp.attach(tiny_gpt2())
    clean, corrupted = pair()
    metric = {"prob": prob(5), "kl": kl_to(lm.run(clean).logits[:, -1]), "logit_diff": METRIC}[name]
    raw = patch_sweep(lm, clean, corrupted, "resid_post", metric, normalize=False, progress=False, layers=[2])
    norm = patch_sweep(lm, clean, corrupted, "resid_post", metric, progress=False, layers=[2])
    m_c = float(metric(lm.run(clean).logits))
    m_k = float(metric(lm.run(corrupted).logits))
    assert norm.attrs["clean_metric"] == pytest.approx(m_c, abs=1e-5)
    assert norm.attrs["corrupted_metric"] == pytest.approx(m_k, abs=1e-5)
    torch.testing.assert_close(norm.values * (m_c - m_k) + m_k, raw.values, atol=1e-6, rtol=1e-4)
    # the last layer's output at the last position is all the last logits see: patching it is complete
    assert float(raw.values[0, -1]) == pytest.approx(m_c, abs=1e-5)
    assert all(float(v) == pytest.approx(m_k, abs=1e-5) for v in raw.values[0, :-1])  # no attention after it


def test_make_metric_by_name(gpt2):
    lm = interp.attach(gpt2)
    clean = "The Eiffel Tower is in"
    logits = lm.run(clean).logits
    paris, rome = (lm.tokenizer(w)["input_ids"][0] for w in (" Paris", " Rome"))
    assert float(make_metric("logit_diff", lm, clean, " Paris", " Rome")(logits)) == pytest.approx(
        float(logits[0, -1, paris] - logits[0, -1, rome]), abs=1e-5)
    assert float(make_metric("prob", lm, clean, paris)(logits)) == pytest.approx(
        float(logits[0, -1].softmax(-1)[paris]), abs=1e-6)
    assert float(make_metric("kl", lm, clean)(logits)) == pytest.approx(0.0, abs=1e-5)
    with pytest.raises(ValueError, match="foil"):
        make_metric("logit_diff", lm, clean, " Paris")
    with pytest.raises(ValueError, match="unknown metric"):
        make_metric("accuracy", lm, clean)


def test_all_differing_prompts_skip_nothing_and_still_match():
    lm = interp.attach(tiny_llama())
    g = torch.Generator().manual_seed(5)
    clean, corrupted = torch.randint(0, 61, (1, T), generator=g), torch.randint(0, 61, (1, T), generator=g)
    res = patch_sweep(lm, clean, corrupted, "resid_pre", METRIC, progress=False)
    assert res.attrs["grid"]["skipped_cells"] == 0
    cells = [[(f"blocks.{l}.resid_pre", {"pos": p})] for l in range(3) for p in range(T)]
    torch.testing.assert_close(res.values, reference(lm, corrupted, clean, cells, METRIC).reshape(3, T),
                               atol=2e-4, rtol=1e-3)


def test_packed_and_full_replays_agree_on_a_batch_of_pairs():
    lm = interp.attach(tiny_gpt2())
    g = torch.Generator().manual_seed(9)
    clean = torch.randint(0, 61, (3, T), generator=g)
    corrupted = clean.clone()
    corrupted[:, 2] = (corrupted[:, 2] + 1) % 61
    fast = patch_sweep(lm, clean, corrupted, "resid_post", METRIC, progress=False)
    slow = patch_sweep(lm, clean, corrupted, "resid_post", METRIC, progress=False, reuse_prefix=False,
                       skip_equal=False)
    assert fast.attrs["grid"]["packed_rows"] > 0 and not slow.attrs["grid"]["prefix_reuse"]
    torch.testing.assert_close(fast.values, slow.values, atol=2e-4, rtol=1e-3)


def test_result_round_trip_and_heatmap(tmp_path):
    lm = interp.attach(tiny_gpt2())
    clean, corrupted = pair()
    res = sweep_all(lm, clean, corrupted, METRIC, progress=False)
    assert set(res) == {"resid_pre", "resid_mid", "resid_post", "attn.out", "mlp.out", "attn.z"}
    r = res["attn.out"]
    back = Result.load(r.save(tmp_path / "attn_out"))
    assert back.axes == r.axes and back.coords == r.coords and torch.equal(back.values, r.values)
    png = r.plot(tmp_path / "attn_out.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_input_errors():
    lm = interp.attach(tiny_gpt2())
    clean, corrupted = pair()
    with pytest.raises(ValueError, match="unknown sweep kind"):
        patch_sweep(lm, clean, corrupted, "resid", METRIC)
    with pytest.raises(ValueError, match="direction"):
        patch_sweep(lm, clean, corrupted, "resid_pre", METRIC, direction="sideways")
    with pytest.raises(ValueError, match="window"):
        patch_sweep(lm, clean, corrupted, "resid_pre", METRIC, window=0)
    with pytest.raises(interp.PositionError, match="out of range"):
        patch_sweep(lm, clean, corrupted, "resid_pre", METRIC, positions=[T + 3])


def test_positional_reuse_falls_back_when_its_validation_fails(monkeypatch):
    import interp.prefix as prefix

    # a cache stand-in that forgets the base keys: packed replays would be wrong, and must not be used
    monkeypatch.setattr(prefix._Prefixed, "update", lambda self, k, v, *a, **kw: (k, v))
    lm = interp.attach(tiny_gpt2())
    clean, corrupted = pair()
    res = patch_sweep(lm, clean, corrupted, "resid_pre", METRIC, progress=False)
    assert not res.attrs["grid"]["positional_reuse"] and res.attrs["grid"]["prefix_reuse"]
    cells = [[(f"blocks.{l}.resid_pre", {"pos": p})] for l in range(3) for p in range(T)]
    torch.testing.assert_close(res.values, reference(lm, corrupted, clean, cells, METRIC).reshape(3, T),
                               atol=2e-4, rtol=1e-3)


def test_shared_ops_inside_the_blocks_keep_grids_exact():
    from interp import Noise

    lm = interp.attach(tiny_llama())
    clean, corrupted = pair()
    src = lm.run(clean, capture="blocks.2.resid_pre")
    shared = [Noise("blocks.1.resid_pre", std=0.5, seed=3, where=at(pos=[1, 4]))]
    rows = [[Patch("blocks.2.resid_pre", src.cache["blocks.2.resid_pre"], where=at(pos=p))] for p in range(T)]
    g = lm.run_grid(corrupted, rows, METRIC, shared=shared, progress=False)
    want = torch.stack([METRIC(lm.run(corrupted, ops=[*shared, *r]).logits) for r in rows])
    torch.testing.assert_close(g.values, want, atol=1e-5, rtol=1e-4)
    assert not g.stats["positional_reuse"]
    # a packed grid afterwards still uses positional reuse on this model
    assert patch_sweep(lm, clean, corrupted, "resid_pre", METRIC, progress=False).attrs["grid"]["positional_reuse"]
