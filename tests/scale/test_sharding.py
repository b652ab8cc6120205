"""Models dispatched with accelerate: a sweep on a model split over two device-map parts, and on one
with blocks (and the embeddings) offloaded to disk, equals the sweep on the unsplit model bit for bit."""
from __future__ import annotations

import pytest
import torch
from accelerate import dispatch_model
from transformers import LlamaForCausalLM

import interp
from interp import Ablate, Project, at
from interp.metrics import logit_diff
from interp.sharding import block_map, input_device, output_device, placement

from .conftest import W


@pytest.fixture(scope="module")
def ref(model_dir):
    return interp.attach(LlamaForCausalLM.from_pretrained(model_dir).eval())


def rows_for(lm):
    """Every op kind, on both sides of the part boundary (blocks 0-1 | 2-3): patches (also per head and
    over a window of layers), relative adds, noise, zero / mean ablation, LEACE-style projections."""
    clean, _ = W.prompts()
    cache = lm.run(clean, capture="blocks.*.resid_post").cache
    g = torch.Generator().manual_seed(0)
    L, R = torch.randn(64, 2, generator=g) * 0.1, torch.randn(2, 64, generator=g) * 0.1
    mu = torch.randn(64, generator=g)
    rows = [r for i, r in enumerate(W.mixed_rows(lm)) if (i // 9) in (1, 3) and i % 9 in (1, 3, 4, 5, 6, 7, 8)]
    for l in (1, 2):
        rows.append([Project(f"blocks.{l}.resid_post", {"L": L, "R": R, "mu": mu}, where=at(pos=[1, 6]))])
        rows.append([Ablate(f"blocks.{l}.resid_post", "mean", values=cache[f"blocks.{l}.resid_post"].mean((0, 1)),
                            where=at(pos=4))])
    kinds = {type(op).__name__ for row in rows for op in row}
    assert kinds == {"Patch", "Add", "Noise", "Ablate", "Project"} and len(rows) == 18
    return rows


def sweep(lm):
    base = W.prompts()[1]
    out = lm.run_grid(base, rows_for(lm), W.last_logits, progress=False)
    assert out.stats["prefix_reuse"] and out.stats["positional_reuse"]  # the block-replay paths are exercised
    return out.values


def patching(lm):
    from interventions.patching import patch_sweep

    clean, corrupted = W.prompts()
    return patch_sweep(lm, clean, corrupted, "resid_pre", metric=logit_diff(5, 9), layers=[1, 3],
                       progress=False).values


@pytest.fixture(scope="module")
def want(ref):
    """The unsplit model's sweep values and patching map."""
    return sweep(ref), patching(ref)


def test_two_device_map_parts_equal_the_unsplit_model(model_dir, ref, want):
    model = LlamaForCausalLM.from_pretrained(model_dir).eval()
    dmap = block_map(model, ["cpu", "cpu"])
    assert dmap["model.layers.0"] == dmap["model.layers.1"] and dmap["lm_head"] == "cpu"
    model = dispatch_model(model, dmap, force_hooks=True)  # accelerate's device hooks on every part
    assert hasattr(model.model.layers[3], "_hf_hook")
    lm = interp.attach(model)
    assert lm.site_names() == ref.site_names()
    assert torch.equal(sweep(lm), want[0])
    assert torch.equal(patching(lm), want[1])
    got = lm.run(W.prompts()[0], capture="blocks.2.attn.z")
    assert torch.equal(
        got.cache["blocks.2.attn.z"], ref.run(W.prompts()[0], capture="blocks.2.attn.z").cache["blocks.2.attn.z"]
    )
    assert interp.hook_count(model) == 0


def test_disk_offload_equals_the_unsplit_model(model_dir, ref, want, tmp_path):
    """Blocks 0-1 and the embeddings live on disk (meta tensors in memory, loaded per call), blocks 2-3 on CPU."""
    dmap = block_map(LlamaForCausalLM.from_pretrained(model_dir), ["disk", "cpu"])
    dmap["model.embed_tokens"] = "disk"
    model = LlamaForCausalLM.from_pretrained(model_dir, device_map=dmap, offload_folder=str(tmp_path)).eval()
    assert model.model.embed_tokens.weight.device.type == "meta"
    assert model.model.layers[0].mlp.up_proj.weight.device.type == "meta"
    assert model.model.layers[3].mlp.up_proj.weight.device.type == "cpu"
    lm = interp.attach(model)
    assert input_device(model) == torch.device("cpu")  # not the meta device of the first parameter
    assert output_device(model) == torch.device("cpu") and output_device(ref.model) is None
    where = placement(lm)
    assert where["model.layers.0"] == "cpu (offloaded)" and where["model.layers.3"] == "cpu"
    assert torch.equal(sweep(lm), want[0])
    assert torch.equal(patching(lm), want[1])
    assert interp.hook_count(model) == 0


def test_block_map_covers_every_parameter_and_checks_its_input(model_dir):
    from accelerate.utils import check_device_map

    model = LlamaForCausalLM.from_pretrained(model_dir)
    dmap = block_map(model, [0, 1, "cpu"])
    check_device_map(model, dmap)  # raises if a parameter is not covered
    assert [dmap[f"model.layers.{i}"] for i in range(4)] == [0, 0, 1, "cpu"]
    assert dmap["model.embed_tokens"] == 0 and dmap["model.norm"] == "cpu" and dmap["lm_head"] == "cpu"
    with pytest.raises(ValueError, match="5 parts for 4 blocks"):
        block_map(model, ["cpu"] * 5)
    with pytest.raises(ValueError, match="block list"):
        block_map(torch.nn.Linear(3, 3), ["cpu"])
