"""ROME / MEMIT / AlphaEdit: ground truth on a constructed key-value memory, then Conv1D and Linear models."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import interp
from interventions.editing import (
    EditError,
    Fact,
    SolverConfig,
    Targets,
    ValueConfig,
    compute_keys,
    compute_targets,
    current_outputs,
    down_proj,
    edit,
    key_stats,
)
from interventions.editing.evaluate import edited

sys.path.insert(0, str(Path(__file__).parent))
from editing_models import (  # noqa: E402
    C_VAL,
    OBJECTS,
    SUBJECTS,
    constructed_llama,
    key_scale,
    obj_dir,
    stats_text,
    tiny_gpt2,
    tiny_llama,
)

CTX = ["{}", "The weather is nice today. {}", "We talked. {}"]


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("INTERP_CACHE", str(tmp_path / "cache"))


def _probs(model, tok, text):
    ids = tok(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return model(ids).logits[0, -1].softmax(-1)


def _mlp0_outputs(lm):
    """Block 0's MLP output at each subject's token (prompt 'capital of <subject>')."""
    facts = [Fact("capital of{}", s, " x") for s in SUBJECTS]
    return current_outputs(lm, "blocks.0.mlp.out", facts)


def _known_target(lm, subject: int, new_obj: int, layer: int = 0) -> Targets:
    """The value the constructed memory stores for subject -> new_obj: residual + C_VAL (u_new - u_old)."""
    f = Fact("capital of{}", SUBJECTS[subject], OBJECTS[new_obj])
    z0 = current_outputs(lm, f"blocks.{layer}.resid_post", [f])
    d = (C_VAL * (obj_dir(new_obj) - obj_dir(subject))).double()[None]
    return Targets(layer, [f], d, z0 + d, [{}])


def test_rome_key_is_the_stored_key(gpt2_tokenizer):
    lm = interp.attach(constructed_llama(gpt2_tokenizer))
    keys = compute_keys(lm, down_proj(lm, 0), [Fact("capital of{}", s, " x") for s in SUBJECTS], CTX)
    want = key_scale() * torch.eye(len(SUBJECTS), keys.shape[1], dtype=torch.float64)
    torch.testing.assert_close(keys, want, rtol=1e-5, atol=1e-4)


def test_rome_recovers_the_constructed_fact_exactly(gpt2_tokenizer):
    """Given the stored value of the new fact, ROME writes exactly the weights of a model built to store it,
    and every other subject's MLP output is unchanged."""
    tok = gpt2_tokenizer
    model = constructed_llama(tok)
    lm = interp.attach(model)
    stats = key_stats(lm, [down_proj(lm, 0)], text=stats_text(), n_tokens=200, length=8, progress=False)
    before = _mlp0_outputs(lm)
    e = edit(lm, [_known_target(lm, 2, 4).facts[0]], "rome", [0], targets=_known_target(lm, 2, 4), stats=stats,
             context=CTX, progress=False)
    truth = constructed_llama(tok, facts={0: 0, 1: 1, 2: 4, 3: 3, 4: 4, 5: 5})
    torch.testing.assert_close(e.tensors["model.layers.0.mlp.down_proj.weight"],
                               truth.model.layers[0].mlp.down_proj.weight, rtol=0, atol=1e-6)
    assert e.info["per_layer"][0]["update_rank"] == 1
    with edited(model, e):
        after = _mlp0_outputs(lm)
        p = _probs(model, tok, "capital of Spain")
    others = [i for i in range(len(SUBJECTS)) if i != 2]
    torch.testing.assert_close(after[others], before[others], rtol=0, atol=1e-6)
    assert float(p[tok(OBJECTS[4])["input_ids"][0]]) > 0.99
    torch.testing.assert_close(model.model.layers[0].mlp.down_proj.weight,  # restored after the block
                               constructed_llama(tok).model.layers[0].mlp.down_proj.weight)


@pytest.mark.parametrize("method,layers,cfg", [("rome", [0], SolverConfig()), ("memit", [0, 1], SolverConfig(lam=1e-3)),
                                                ("alphaedit", [0, 1], SolverConfig(l2=1e-3))])
def test_optimised_value_edits_only_that_key(gpt2_tokenizer, method, layers, cfg):
    """With the value found by gradient descent: the model says the new object for the edited subject only."""
    tok = gpt2_tokenizer
    model = constructed_llama(tok)
    lm = interp.attach(model)
    # AlphaEdit's preserved keys: every subject but the edited one (its key must lie in the null space)
    subjects = [s for i, s in enumerate(SUBJECTS) if i != 2] if method == "alphaedit" else SUBJECTS
    stats = key_stats(lm, [down_proj(lm, l) for l in layers], text=stats_text(subjects), n_tokens=200, length=8,
                      progress=False)
    f = Fact("capital of{}", SUBJECTS[2], OBJECTS[4])
    before = [_probs(model, tok, f"capital of{s}") for s in SUBJECTS]
    e = edit(lm, [f], method, layers, stats=stats, context=CTX, solver_cfg=cfg, value_cfg=ValueConfig(clamp=4.0),
             progress=False)
    assert e.info["values"][0]["exp_neg_nll"] > 0.9
    with edited(model, e):
        after = [_probs(model, tok, f"capital of{s}") for s in SUBJECTS]
    assert float(after[2][tok(OBJECTS[4])["input_ids"][0]]) > 0.9
    for i in range(len(SUBJECTS)):
        if i != 2:
            torch.testing.assert_close(after[i], before[i], rtol=0, atol=1e-5)


def test_alphaedit_cannot_move_a_preserved_key(gpt2_tokenizer):
    """If the edited subject's key is among the preserved keys, AlphaEdit's update leaves it (the null space)."""
    tok = gpt2_tokenizer
    lm = interp.attach(constructed_llama(tok))
    stats = key_stats(lm, [down_proj(lm, 0)], text=stats_text(), n_tokens=200, length=8, progress=False)
    t = _known_target(lm, 2, 4)
    e = edit(lm, t.facts, "alphaedit", [0], targets=t, stats=stats, context=CTX, solver_cfg=SolverConfig(l2=1e-3),
             progress=False)
    assert e.info["per_layer"][0]["relative_miss"] > 0.999
    r = edit(lm, t.facts, "rome", [0], targets=t, stats=stats, context=CTX, progress=False)
    assert r.info["per_layer"][0]["relative_miss"] < 1e-9


@pytest.mark.parametrize("build", [tiny_gpt2, tiny_llama], ids=["gpt2-conv1d", "llama-linear"])
@pytest.mark.parametrize("method", ["rome", "memit", "alphaedit"])
def test_edit_on_conv1d_and_linear(gpt2_tokenizer, build, method):
    """The written weights (Conv1D stored [in, out], Linear [out, in]) move the averaged key's output by exactly
    the solved residual (ROME), make the target the answer (ROME, MEMIT), and AlphaEdit's update is zero on
    the preserved key space."""
    tok = gpt2_tokenizer
    model = build(tok)
    lm = interp.attach(model)
    layers = [1] if method == "rome" else [0, 1]
    stats = key_stats(lm, [down_proj(lm, l) for l in layers], text="licenses", n_tokens=3000, length=32, progress=False)
    f = Fact("I visited the {}", "Eiffel Tower", " Rome")
    rome = tok(" Rome")["input_ids"][0]
    p0 = float(_probs(model, tok, f.text())[rome])
    targets = compute_targets(lm, [f], layers[-1], CTX, ValueConfig(clamp=4.0, steps=40), progress=False)
    scfg = SolverConfig(lam=1e-2, l2=1e-2, null_energy=0.05)
    e = edit(lm, [f], method, layers, targets=targets, stats=stats, context=CTX, solver_cfg=scfg, progress=False)
    proj = down_proj(lm, layers[-1])
    assert proj.transposed == (build is tiny_gpt2)
    k = compute_keys(lm, proj, [f], CTX).float()
    mod = proj.module(model)
    with torch.no_grad():
        y0 = mod(k)
        with edited(model, e):
            y1 = mod(k)
            p1 = float(_probs(model, tok, f.text())[rome])
    if method == "rome":
        cur = current_outputs(lm, f"blocks.{layers[-1]}.resid_post", [f])
        torch.testing.assert_close((y1 - y0).double(), (targets.z - cur), rtol=1e-3, atol=1e-4)
    if method in ("rome", "memit"):
        assert p0 < 1e-3 and p1 > 0.9, (p0, p1)
        assert max(x["relative_miss"] for x in e.info["per_layer"]) < 1e-3
    else:
        P, info = stats[layers[-1]].null_cache[(scfg.null_threshold, scfg.null_energy)]
        W0 = proj.weight(model).detach().double()
        dW = proj.weight(e.applied(model)).detach().double() - W0
        eye = torch.eye(P.shape[0], dtype=P.dtype)
        assert info["null_dim"] < P.shape[0] and float(dW.norm()) > 0
        assert float((dW @ (eye - P)).norm()) < 1e-5 * float(dW.norm())  # preserved keys' outputs do not move


def test_key_stats_are_cached_and_recorded(gpt2_tokenizer, tmp_path):
    lm = interp.attach(tiny_llama(gpt2_tokenizer))
    p = [down_proj(lm, 0)]
    a = key_stats(lm, p, text="licenses", n_tokens=512, length=32, progress=False)[0]
    b = key_stats(lm, p, text="licenses", n_tokens=512, length=32, progress=False)[0]
    assert b.record["cached"] and not a.record.get("cached")
    torch.testing.assert_close(a.C, b.C, rtol=0, atol=0)
    assert a.n_tokens == 512 and a.record["source"].endswith("common-licenses") and len(a.record["sha256"]) == 16
    c = key_stats(lm, p, text="licenses", n_tokens=512, length=32, seed=1, progress=False)[0]
    assert not c.record.get("cached")  # another seed is another sample
    # streaming: any batching gives the same C
    d = key_stats(lm, p, text="licenses", n_tokens=512, length=32, batch=3, cache=False, progress=False)[0]
    torch.testing.assert_close(a.C, d.C, rtol=1e-10, atol=1e-12)
    # C is E[k k^T] of the keys the engine captures
    from interventions.editing.stats import chunks, read_texts
    docs, _ = read_texts("licenses")
    ids = torch.stack(chunks(lm.tokenizer, docs, 512, 32, 0))
    k = lm.run(ids, capture=[p[0].key_site]).cache[p[0].key_site].reshape(-1, 96).double()
    torch.testing.assert_close(a.C, k.T @ k / k.shape[0], rtol=1e-9, atol=1e-12)


def test_bad_requests_say_what_to_do(gpt2_tokenizer):
    lm = interp.attach(tiny_llama(gpt2_tokenizer))
    f = Fact("The {} is in", "Eiffel Tower", " Rome")
    with pytest.raises(EditError, match="ROME edits one layer"):
        edit(lm, [f], "rome", [0, 1])
    with pytest.raises(EditError, match="out of range"):
        edit(lm, [f], "memit", [7])
    with pytest.raises(EditError, match="no '\\{\\}'"):
        edit(lm, [Fact("The Eiffel Tower is in", "Eiffel Tower", " Rome")], "memit", [0])
    with pytest.raises(EditError, match="unknown editing method"):
        edit(lm, [f], "fine-tune", [0])
    with pytest.raises(EditError, match="does not exist"):
        key_stats(lm, [down_proj(lm, 0)], text="/nonexistent/text")
