"""Randomly initialised copies of a model: the baseline every probe map and IIA is reported beside."""
from __future__ import annotations

import copy

import torch
from torch import nn


def random_copy(model: nn.Module, seed: int = 0) -> nn.Module:
    """The same architecture with freshly initialised weights; the original is untouched.

    Hugging Face models are rebuilt from their config (their own initialisation scheme); other
    modules are deep-copied and every submodule's `reset_parameters()` is called; parameters no
    such method covers are redrawn from N(0, std) with the original tensor's std. The copy keeps
    the original's `tokenizer` attribute, dtype, device and eval/train mode.
    """
    inner = getattr(model, "model", model) if hasattr(model, "adapter") else model  # an Instrumented
    ref = next(inner.parameters(), None)
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        config = getattr(inner, "config", None)
        if config is not None and hasattr(type(inner), "_from_config") and hasattr(config, "to_dict"):
            fresh = type(inner)(config)
        else:
            fresh = copy.deepcopy(inner)
            covered: set[int] = set()
            for m in fresh.modules():
                if hasattr(m, "reset_parameters") and callable(m.reset_parameters):
                    m.reset_parameters()
                    covered |= {id(p) for p in m.parameters(recurse=False)}
            with torch.no_grad():
                for p in fresh.parameters():
                    if id(p) not in covered:
                        std = float(p.float().std()) if p.numel() > 1 else 1.0
                        p.normal_(0.0, std if std > 0 else 1.0)
    finally:
        torch.random.set_rng_state(gen_state)
    if ref is not None:
        fresh = fresh.to(device=ref.device, dtype=ref.dtype)
    fresh.train(inner.training)
    if getattr(inner, "tokenizer", None) is not None:
        fresh.tokenizer = inner.tokenizer
    return fresh


__all__ = ["random_copy", "random_pipeline"]


NEURAL_COMPONENTS = ("text_encoder", "text_encoder_2", "text_encoder_3", "unet", "transformer")


def random_pipeline(pipe, seed: int = 0):
    """A diffusers pipeline whose text encoders and denoiser are randomly initialised copies (VAE,
    tokenizers and scheduler shared with the original, which is untouched)."""
    comps = dict(pipe.components)
    for i, name in enumerate(NEURAL_COMPONENTS):
        if comps.get(name) is not None:
            comps[name] = random_copy(comps[name], seed + i)
    try:
        fresh = type(pipe)(**comps)
    except TypeError:
        fresh = type(pipe)(**comps, requires_safety_checker=False)
    if hasattr(fresh, "set_progress_bar_config"):
        fresh.set_progress_bar_config(disable=True)
    return fresh
