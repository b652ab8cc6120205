"""Prompt-pair datasets: per-item answers through run_grid's packing, the mean equals one sweep per pair, bootstrap
intervals, files and templates, one-line errors."""
from __future__ import annotations

import json

import pytest
import torch

import interp
from interp.metrics import logit_diff, prob
from interventions import pairs as P
from interventions.patching import head_sweep, pair_sweep, patch_sweep

from ..conftest import tiny_gpt2

PAIRS = [("The capital of France is", "The capital of Italy is", " Paris", " Rome"),
         ("The capital of Spain is", "The capital of Japan is", " Madrid", " Tokyo"),
         ("The capital of Egypt is", "The capital of Peru is", " Cairo", " Lima")]


@pytest.fixture(scope="module")
def lm(gpt2_tokenizer):
    return interp.attach(tiny_gpt2(n_layer=3, n_embd=64, seed=3), tokenizer=gpt2_tokenizer)


def _lengths_ok(lm):
    lens = {lm.adapter.prepare(t).seq_len for p in PAIRS for t in p[:2]}
    assert len(lens) == 1, lens


@pytest.mark.parametrize("name", ["logit_diff", "prob"])
def test_mean_over_pairs_equals_one_sweep_per_pair(lm, name):
    """Packed rows x items with per-item answers == looping over the pairs with each pair's own metric."""
    _lengths_ok(lm)
    res = pair_sweep(lm, PAIRS, "resid_pre", name, progress=False)
    per = []
    for clean, corr, t, f in PAIRS:
        tid, fid = (lm.tokenizer(w)["input_ids"][0] for w in (t, f))
        m = logit_diff(tid, fid) if name == "logit_diff" else prob(tid)
        per.append(patch_sweep(lm, clean, corr, "resid_pre", m, progress=False, skip_equal=False).values)
    torch.testing.assert_close(res.values, torch.stack(per).mean(0), rtol=1e-4, atol=1e-5)
    assert res.attrs["n_items"] == 3 and res.axes == ("layer", "pos")
    lo, hi = torch.as_tensor(res.attrs["ci_low"]), torch.as_tensor(res.attrs["ci_high"])
    assert bool((lo <= res.values + 1e-6).all() and (res.values <= hi + 1e-6).all())
    spread = torch.stack(per).std(0)
    assert bool(((hi - lo) > 0)[spread > 1e-3].all())  # where items disagree the interval has width


def test_a_custom_metric_gets_each_rows_answer(lm):
    seen = []

    def target_logit(logits, answers):
        seen.append(answers["target"].clone())
        return logits[:, -1].float()[torch.arange(logits.shape[0]), answers["target"]]

    res = pair_sweep(lm, PAIRS, "mlp.out", target_logit, layers=[0, 2], progress=False)
    ids = torch.tensor([lm.tokenizer(p[2])["input_ids"][0] for p in PAIRS])
    assert res.shape == (2, 5) and torch.isfinite(res.values).all()
    for got in seen:  # every call, whatever its chunk: items in order, tiled over the packed rows
        assert torch.equal(got, ids.repeat(len(got) // 3))


def test_identical_items_give_a_zero_width_interval(lm):
    res = pair_sweep(lm, [PAIRS[0]] * 4, "resid_pre", "logit_diff", layers=[1], progress=False)
    torch.testing.assert_close(torch.as_tensor(res.attrs["ci_low"]), res.values, rtol=0, atol=1e-6)
    torch.testing.assert_close(torch.as_tensor(res.attrs["ci_high"]), res.values, rtol=0, atol=1e-6)


def test_heads_over_pairs_of_different_lengths(lm):
    mixed = [PAIRS[0], ("The Eiffel Tower is located in Paris and in", "The Colosseum is located in Rome and in",
                        " France", " Italy")]
    res = pair_sweep(lm, mixed, "attn.z", "logit_diff", progress=False)
    one = [head_sweep(lm, c, k, logit_diff(*(lm.tokenizer(w)["input_ids"][0] for w in (t, f))), progress=False,
                      skip_equal=False).values for c, k, t, f in mixed]
    torch.testing.assert_close(res.values, torch.stack(one).mean(0), rtol=1e-4, atol=1e-5)
    with pytest.raises(interp.errors.InterpError, match="different token lengths"):
        pair_sweep(lm, mixed, "resid_pre", progress=False)


def test_files_and_templates(tmp_path):
    jl = tmp_path / "p.jsonl"
    jl.write_text("\n".join(json.dumps(dict(zip(("clean", "corrupted", "target", "foil"), p))) for p in PAIRS))
    csv_path = tmp_path / "p.csv"
    csv_path.write_text("clean,corrupted,target,foil,group\n" + "\n".join(",".join([*p, "g"]) for p in PAIRS))
    a, b = P.load_pairs(jl), P.load_pairs(csv_path)
    assert a == b == P.load_pairs(PAIRS) and b[0].meta == {"group": "g"}
    t = P.from_template("The capital of {x} is", [("France", " Paris"), ("Italy", " Rome"), ("Spain", " Madrid")])
    assert t[0] == P.Pair("The capital of France is", "The capital of Italy is", " Paris", " Rome")
    assert t[2].corrupted == "The capital of France is" and t[2].foil == " Paris"


def test_bad_datasets_are_one_line_errors(tmp_path, lm):
    with pytest.raises(P.PairsError, match="needs 'clean' and 'corrupted'"):
        P.load_pairs([{"clean": "a"}])
    with pytest.raises(P.PairsError, match="no pairs file"):
        P.load_pairs(tmp_path / "missing.jsonl")
    with pytest.raises(P.PairsError, match="empty"):
        P.load_pairs([])
    (tmp_path / "bad.jsonl").write_text("{not json}\n")
    with pytest.raises(P.PairsError, match="bad.jsonl:1"):
        P.load_pairs(tmp_path / "bad.jsonl")
    with pytest.raises(interp.errors.InterpError, match="pair 0"):
        pair_sweep(lm, [("The capital of France is", "Rome is", " Paris", " Rome")], progress=False)
    with pytest.raises(ValueError, match="needs a foil"):
        pair_sweep(lm, [p[:3] for p in PAIRS], progress=False)


def test_bootstrap_interval_covers_the_mean_of_a_known_distribution():
    g = torch.Generator().manual_seed(0)
    hits = 0
    for trial in range(200):
        x = torch.randn(30, generator=g) + 2.0
        _, lo, hi = P.bootstrap_ci(x, 0.9, n_boot=400, seed=trial)
        hits += int(lo <= 2.0 <= hi)
    assert 0.8 <= hits / 200 <= 0.97  # a 90 % interval covers the true mean about 90 % of the time
