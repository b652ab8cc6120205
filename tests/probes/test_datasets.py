"""Activation datasets: batched capture equals single runs, disk equals memory, interrupted runs resume."""
import json

import pytest
import torch

import interp
from probes import ActivationDataset, SubjectOf, collect
from probes.datasets import lm_runner


def test_memory_collection_equals_direct_capture(toy):
    m, lm = toy
    X, lab = m.dataset()
    ds = collect(lm, list(X), ["blocks.1.resid_post", "blocks.2.resid_post"], labels=lab,
                 positions={"a": 0, "last": -1}, batch_size=10, progress=False)
    assert len(ds) == len(X) and ds.coords == ["a", "last"] and ds.labels["V"] == lab["V"]
    full = lm.run(X, capture="blocks.2.resid_post").cache["blocks.2.resid_post"]
    assert torch.equal(ds.X("blocks.2.resid_post", "last"), full[:, -1])
    assert torch.equal(ds.X("blocks.2.resid_post", 0), full[:, 0])
    with pytest.raises(KeyError, match="not in this dataset"):
        ds.X("blocks.2.resid_post", "b")
    with pytest.raises(KeyError, match="was not collected"):
        ds.X("blocks.4.resid_post", "a")


def test_disk_collection_equals_memory_and_resumes_after_an_interruption(toy, tmp_path):
    m, lm = toy
    X, lab = m.dataset()
    inputs = list(X)
    mem = collect(lm, inputs, "blocks.*.resid_post", labels=lab, positions=[0, -1], batch_size=8, progress=False)

    sites = lm.site_names("blocks.*.resid_post")
    inner = lm_runner(lm, sites, {"0": 0, "-1": -1})
    calls = []

    def failing(batch, start):
        calls.append(start)
        if len(calls) == 4:
            raise KeyboardInterrupt("simulated stop")
        return inner(batch, start)

    # the same collection through a custom runner (same coords) so that it can be interrupted
    kw = dict(labels=lab, batch_size=8, coords=["0", "-1"], progress=False, path=tmp_path / "acts")
    with pytest.raises(KeyboardInterrupt):
        collect(None, inputs, "resid", runner=failing, **kw)
    assert json.loads((tmp_path / "acts" / "progress.json").read_text())["done"] == 24
    with pytest.raises(ValueError, match="incomplete"):
        ActivationDataset.load(tmp_path / "acts")
    calls.clear()
    def counting(batch, start):
        calls.append(start)
        return inner(batch, start)

    disk = collect(None, inputs, "resid", runner=counting, **kw)
    assert calls[0] == 24 and len(calls) == (len(inputs) - 24 + 7) // 8          # only the unfinished batches
    assert disk.path == tmp_path / "acts"
    for site in sites:
        for pos in ("0", "-1"):
            assert torch.equal(disk.X(site, pos), mem.X(site, pos))
    again = ActivationDataset.load(tmp_path / "acts", mmap=False)
    assert torch.equal(again.X(sites[2], "-1"), mem.X(sites[2], "-1")) and again.labels == mem.labels
    with pytest.raises(ValueError, match="different inputs"):
        collect(None, inputs[:-1], "resid", runner=inner, **{**kw, "labels": {k: v[:-1] for k, v in lab.items()}})


def test_saved_dataset_loads_memory_mapped(toy, tmp_path):
    m, lm = toy
    X, lab = m.dataset()
    ds = collect(lm, list(X), "blocks.3.resid_pre", labels={"V": lab["V"]}, progress=False)
    back = ActivationDataset.load(ds.save(tmp_path / "saved"))
    assert torch.equal(back.X("blocks.3.resid_pre"), ds.X("blocks.3.resid_pre"))
    assert back.labels == {"V": lab["V"]}


def test_input_errors(toy):
    m, lm = toy
    X, lab = m.dataset()
    with pytest.raises(ValueError, match="one per input"):
        collect(lm, list(X), "embed", labels={"V": lab["V"][:3]}, progress=False)
    with pytest.raises(ValueError, match="no inputs"):
        collect(lm, [], "embed", progress=False)
    with pytest.raises(interp.UnknownSiteError, match="Did you mean"):
        collect(lm, list(X), "blocks.1.resid_poost", progress=False)


@pytest.fixture(scope="module")
def tiny_llama(tiny_llama_dir):
    from recipes.models import load

    return interp.attach(load(str(tiny_llama_dir)))


def test_padded_batches_equal_single_prompt_runs_at_subject_positions(tiny_llama):
    lm = tiny_llama
    subjects = ["Eiffel Tower", "Leaning Tower of Pisa", "Big Ben", "Great Pyramid of Giza", "Louvre"]
    prompts = [f"The {s} is located in the country of" for s in subjects]
    pos = {"subject_first": SubjectOf("first"), "subject_last": SubjectOf("last"), "last": -1}
    ds = collect(lm, prompts, "blocks.1.resid_post", positions=pos, subjects=subjects, batch_size=5, progress=False)
    assert len({len(lm.tokens(p)) for p in prompts}) > 1                     # the batch really was padded
    from interp.engine import subject_positions

    for i, (p, s) in enumerate(zip(prompts, subjects)):
        out = lm.run(p, capture="blocks.1.resid_post")
        h, toks = out.cache["blocks.1.resid_post"][0], out.tokens[0]
        sp = subject_positions(toks, s)
        assert "".join(toks[sp[0]:sp[-1] + 1]).strip() == s
        for name, want in (("subject_first", h[sp[0]]), ("subject_last", h[sp[-1]]), ("last", h[-1])):
            assert torch.allclose(ds.X("blocks.1.resid_post", name)[i], want, atol=1e-5), (p, name)
