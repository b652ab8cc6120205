"""The engine on a GPU: runs, grids and sweeps on CUDA equal the same on CPU, through the compiled kernels.

Skipped without CUDA. On a GPU machine run

    INTERP_TEST_DEVICE=cuda pytest tests/interp/test_cuda.py tests/kernels/test_kernels_triton.py

(INTERP_TEST_DEVICE=cuda leaves TRITON_INTERPRET unset, so the Triton kernels are compiled for the GPU
instead of being run by the CPU interpreter.) Tiny GPT-2 and grouped-query Llama with random weights;
fp32 on both devices (TF32 off), so CUDA and CPU agree to float rounding.
"""
from __future__ import annotations

import copy
import os

import pytest
import torch

import interp
import interp.kernels as K
from interp import Ablate, Add, Noise, Patch, Project, at
from interp.metrics import logit_diff

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

T, V = 8, 61
METRIC = logit_diff(5, 9)


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_layer=3, n_embd=64, n_head=4, vocab_size=V, n_positions=32)).eval()


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1)
    cfg = LlamaConfig(num_hidden_layers=3, hidden_size=48, intermediate_size=96, num_attention_heads=6,
                      num_key_value_heads=2, vocab_size=V, max_position_embeddings=32)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module", params=["gpt2", "llama-gqa"])
def pair_of_models(request):
    """(lm on CPU, lm on CUDA) with the same weights."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    hf = {"gpt2": _gpt2, "llama-gqa": _llama}[request.param]()
    return interp.attach(hf), interp.attach(copy.deepcopy(hf).cuda())


def _tokens(differ=(2, 5)):
    g = torch.Generator().manual_seed(3)
    clean = torch.randint(0, V, (1, T), generator=g)
    corrupted = clean.clone()
    for p in differ:
        corrupted[0, p] = (corrupted[0, p] + 7) % V
    return clean, corrupted


def _close(a, b, what, tol=2e-4):
    a, b = a.detach().float().cpu(), b.detach().float().cpu()
    err = (a - b).abs().max().item() / max(b.abs().max().item(), 1e-6)
    assert err < tol, f"{what}: CUDA and CPU differ by {err:.2e} (relative to the largest value)"


def test_cuda_tensors_dispatch_to_compiled_triton():
    probe = torch.zeros(4, 4, device="cuda", dtype=torch.float16)
    assert K.backend(probe) == "triton"
    if os.environ.get("INTERP_TEST_DEVICE") == "cuda":
        from interp.kernels import triton as tk

        assert not tk.INTERPRETED, "kernels run in Triton's interpreter: unset TRITON_INTERPRET"


def _ops(lm, clean_cache, F):
    g = torch.Generator().manual_seed(4)
    dev = next(lm.model.parameters()).device
    L, R = torch.randn(F, 3, generator=g) / F**0.5, torch.randn(3, F, generator=g) / F**0.5
    mu = torch.randn(F, generator=g)
    return {
        "patch": [Patch("blocks.1.resid_pre", clean_cache["blocks.1.resid_pre"], where=at(pos=[2, 5]))],
        "blend heads": [Patch("blocks.0.attn.z", clean_cache["blocks.0.attn.z"], where=at(pos=-1, heads=[1]),
                              alpha=0.5)],
        "add relative (CPU vector)": [Add("blocks.2.resid_pre", torch.randn(F, generator=g), alpha=0.8,
                                          norm="relative")],
        "add renorm (device vector)": [Add("blocks.1.mlp.out", torch.randn(F, generator=g).to(dev), alpha=2.0,
                                           renorm=True, where=at(pos=[0, 3, 7]))],
        "noise": [Noise("embed", std=0.7, seed=11, where=at(pos=[1, 2, 3]))],
        "mean ablation": [Ablate("blocks.1.mlp.out", mode="mean", values=clean_cache["blocks.1.mlp.out"][0].mean(0))],
        "project": [Project("blocks.2.resid_pre", eraser=(L, R, mu))],
    }


def test_run_with_every_op_matches_cpu(pair_of_models, monkeypatch):
    cpu, gpu = pair_of_models
    clean, corrupted = _tokens()
    sites = ["blocks.1.resid_pre", "blocks.0.attn.z", "blocks.1.mlp.out"]
    caches = {lm: lm.run(clean, capture=sites).cache for lm in (cpu, gpu)}
    F = caches[cpu]["blocks.1.resid_pre"].shape[-1]
    for name in _ops(cpu, caches[cpu], F):
        want = cpu.run(corrupted, ops=_ops(cpu, caches[cpu], F)[name]).logits
        for backend in ("triton", "torch"):
            monkeypatch.setenv("INTERP_KERNELS", backend)
            got = gpu.run(corrupted, ops=_ops(gpu, caches[gpu], F)[name]).logits
            assert got.is_cuda
            _close(got, want, f"{name} ({backend} on CUDA)")
        monkeypatch.delenv("INTERP_KERNELS")
    assert interp.hook_count(gpu.model) == 0


def test_grid_of_mixed_rows_matches_cpu(pair_of_models):
    cpu, gpu = pair_of_models
    clean, corrupted = _tokens()
    sites = ["blocks.1.resid_pre", "blocks.0.attn.z", "blocks.1.mlp.out"]
    out = {}
    for lm in (cpu, gpu):
        cache = lm.run(clean, capture=sites).cache
        F = cache["blocks.1.resid_pre"].shape[-1]
        rows = list(_ops(lm, cache, F).values())
        out[lm] = lm.run_grid(corrupted, rows, METRIC, progress=False).values
    _close(out[gpu], out[cpu], "run_grid of mixed op rows")


@pytest.mark.parametrize("kind", ["resid_pre", "attn.out", "mlp.out"])
def test_patch_sweep_matches_cpu_with_the_same_work(pair_of_models, kind):
    from interventions.patching import patch_sweep

    cpu, gpu = pair_of_models
    clean, corrupted = _tokens()
    res = {lm: patch_sweep(lm, clean, corrupted, kind, METRIC, normalize=False, progress=False) for lm in (cpu, gpu)}
    _close(res[gpu].values, res[cpu].values, f"patch_sweep {kind}")
    a, b = res[gpu].attrs["grid"], res[cpu].attrs["grid"]
    # the same exact-no-op skips and packing on both devices
    for key in ("rows", "skipped_cells", "forward_equivalents"):
        assert a.get(key) == b.get(key), (key, a.get(key), b.get(key))


def test_head_sweep_matches_cpu(pair_of_models):
    from interventions.patching import head_sweep

    cpu, gpu = pair_of_models
    clean, corrupted = _tokens()
    res = {lm: head_sweep(lm, clean, corrupted, METRIC, normalize=False, progress=False) for lm in (cpu, gpu)}
    _close(res[gpu].values, res[cpu].values, "head_sweep")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_sweep_tracks_fp32(pair_of_models, dtype):
    from interventions.patching import patch_sweep

    cpu, _ = pair_of_models
    half = interp.attach(copy.deepcopy(cpu.model).to("cuda", dtype))
    clean, corrupted = _tokens()
    want = patch_sweep(cpu, clean, corrupted, "resid_pre", METRIC, normalize=False, progress=False).values
    got = patch_sweep(half, clean, corrupted, "resid_pre", METRIC, normalize=False, progress=False).values
    assert torch.isfinite(got).all()
    _close(got, want, f"patch_sweep in {dtype}", tol=5e-2 if dtype == torch.float16 else 1e-1)


def test_mediation_matches_cpu(pair_of_models):
    from interventions.mediation import mediation

    cpu, gpu = pair_of_models
    clean, corrupted = _tokens()
    meds = ["blocks.1.mlp.out", "blocks.2.attn.out", "blocks.0.resid_post"]
    res = {lm: mediation(lm, clean, corrupted, meds, METRIC, progress=False) for lm in (cpu, gpu)}
    assert res[gpu].values.device.type == "cpu"
    _close(res[gpu].values, res[cpu].values, "mediation TE/NIE/NDE")


@pytest.mark.parametrize("reduce", ["last", "mean", "keep"])
def test_steering_vectors_and_their_injection_match_cpu(pair_of_models, reduce):
    from interventions import steering as S

    cpu, gpu = pair_of_models
    g = torch.Generator().manual_seed(9)
    pos, neg = torch.randint(0, V, (6, T), generator=g), torch.randint(0, V, (6, T), generator=g)
    vec = {lm: S.extract(lm, pos, neg, "blocks.1.resid_pre", reduce=reduce, batch_size=4) for lm in (cpu, gpu)}
    assert vec[gpu].vector.shape == vec[cpu].vector.shape
    _close(vec[gpu].vector, vec[cpu].vector, f"steering vector ({reduce})")
    tokens = _tokens()[0]
    alpha, norm = (0.7, "relative") if reduce != "keep" else (0.3, None)
    out = {lm: lm.run(tokens, ops=[vec[cpu].op(alpha, norm=norm)]).logits for lm in (cpu, gpu)}
    _close(out[gpu], out[cpu], f"steered run ({reduce})")
