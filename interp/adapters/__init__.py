"""Adapter registry: attach() asks each registered matcher in order; the first that accepts wins.

Adapters for other families (diffusers pipelines and denoisers) register themselves here with
`register(matcher, factory)`; the engine core never changes for a new family.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from ..errors import UnsupportedModelError
from .base import Adapter, Prepared, PromptLengthError

_REGISTRY: list[tuple[str, Callable[[Any], bool], Callable[..., Adapter]]] = []


def register(name: str, matcher: Callable[[Any], bool], factory: Callable[..., Adapter], first: bool = True) -> None:
    """Add an adapter family; `first` puts it ahead of the built-in ones."""
    entry = (name, matcher, factory)
    _REGISTRY.insert(0, entry) if first else _REGISTRY.append(entry)


def _builtin() -> None:
    from .generic import GenericAdapter
    from .hf_encoder import HFEncoderAdapter, find_encoder_blocks
    from .hf_lm import HFCausalLMAdapter, is_causal_lm
    from .transformer_lens import TransformerLensAdapter, is_transformer_lens

    register("transformer_lens", is_transformer_lens, TransformerLensAdapter, first=False)
    register("hf_lm", lambda m: isinstance(m, nn.Module) and is_causal_lm(m), HFCausalLMAdapter, first=False)
    register("hf_encoder", lambda m: isinstance(m, nn.Module) and find_encoder_blocks(m) is not None,
             HFEncoderAdapter, first=False)
    from .dit import DiTAdapter, is_dit
    from .pipeline import PipelineAdapter, is_pipeline
    from .text_encoder import TextEncoderAdapter, is_text_encoder
    from .unet import UNetAdapter, is_unet

    register("pipeline", is_pipeline, PipelineAdapter, first=False)
    register("unet", is_unet, UNetAdapter, first=False)
    register("dit", is_dit, DiTAdapter, first=False)
    register("text_encoder", is_text_encoder, TextEncoderAdapter, first=False)
    from .physics import PhysicsAdapter, is_physics

    register("physics", is_physics, PhysicsAdapter, first=False)
    register("generic", lambda m: isinstance(m, nn.Module), GenericAdapter, first=False)


_builtin()


def families() -> list[str]:
    return [name for name, _, _ in _REGISTRY]


def pick(obj: Any, tokenizer=None, family: str | None = None) -> Adapter:
    for name, matcher, factory in _REGISTRY:
        if (family is None and matcher(obj)) or family == name:
            return factory(obj, tokenizer)
    raise UnsupportedModelError(
        f"interp cannot attach to a {type(obj).__module__}.{type(obj).__name__}: it is not a torch nn.Module, "
        f"a TransformerLens model, an nnsight-wrapped model or a diffusers pipeline. Known families: "
        f"{', '.join(families())}. Wrap the model in an nn.Module or pass family=... explicitly.")


__all__ = ["Adapter", "Prepared", "PromptLengthError", "register", "pick", "families"]
