"""Models dispatched with accelerate (`device_map=...`, CPU and disk offload) under interp.

interp needs nothing special from such a model: accelerate wraps each dispatched module's forward so
its inputs move to the module's execution device (and disk-offloaded weights are loaded for the call),
interp's torch hooks run inside that call, and the engine moves sources, vectors, eraser factors and
seeded noise to the tensor it edits. Prefix replay calls the blocks directly, which goes through the
same wrapped forward. These helpers find where inputs must go, build explicit maps, and report
where each block runs.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .errors import InterpError


def _device(d) -> torch.device:
    return torch.device("cuda", d) if isinstance(d, int) else torch.device(d)


def input_device(model: nn.Module) -> torch.device:
    """Where a model's inputs should be: accelerate's execution device for a dispatched model (its
    parameters may sit on the meta device when offloaded), else the first real parameter's device."""
    hook = getattr(model, "_hf_hook", None)
    dev = getattr(hook, "execution_device", None)
    if dev is not None:
        return _device(dev)
    for t in model.parameters():
        if t.device.type != "meta":
            return t.device
    if any(True for _ in model.parameters()):
        raise MetaWeightsError(
            f"every parameter of {type(model).__name__} is on the meta device, so it has no weights to run: it is "
            "an nnsight model that was never dispatched (e.g. one meant for nnsight's remote=True backend) or a model "
            "built under init_empty_weights. interp runs models locally through torch hooks, which a remote backend "
            "does not execute: load the weights here (nnsight: model.dispatch(), then interp.attach(model) again; "
            "accelerate: load_checkpoint_and_dispatch / from_pretrained(device_map=...)), or run the experiment "
            "with nnsight's own trace(remote=True) API "
            "(lm.site(name).module gives the module path of each interp site)")
    for b in model.buffers():
        if b.device.type != "meta":
            return b.device
    return torch.device("cpu")


def output_device(model: nn.Module) -> torch.device | None:
    """Where an accelerate-dispatched model's forward returns its outputs (its inputs' device, which
    interp puts at `input_device`), or None for a model that is not dispatched."""
    hook = getattr(model, "_hf_hook", None)
    return input_device(model) if getattr(hook, "io_same_device", False) else None


class MetaWeightsError(InterpError, RuntimeError):
    """A model whose weights are not loaded (meta tensors) was asked to run."""


def _hooks(module: nn.Module) -> list:
    hook = getattr(module, "_hf_hook", None)
    return list(getattr(hook, "hooks", None) or ([hook] if hook is not None else []))


def execution_device(module: nn.Module) -> tuple[torch.device | None, bool]:
    """(device a module computes on, whether its weights are offloaded to CPU or disk) under accelerate
    (accelerate marks offloading on the leaf modules, so every submodule is looked at)."""
    offloaded = any(getattr(h, "offload", False) for m in module.modules() for h in _hooks(m))
    for h in _hooks(module):
        dev = getattr(h, "execution_device", None)
        if dev is not None:
            return _device(dev), offloaded
    p = next((t for t in module.parameters() if t.device.type != "meta"), None)
    return (p.device if p is not None else None), offloaded


def placement(lm) -> dict[str, str]:
    """Block path -> where it runs, e.g. {'model.layers.0': 'cuda:0', 'model.layers.9': 'cpu (offloaded)'}."""
    ad = getattr(lm, "adapter", None)
    root = ad.root if ad is not None else lm
    paths = list(getattr(ad, "block_paths", []) or [])
    out = {}
    for path in paths:
        dev, off = execution_device(root.get_submodule(path))
        out[path] = f"{dev}{' (offloaded)' if off else ''}"
    return out


def block_map(lm, parts: Sequence[Any]) -> dict[str, Any]:
    """An explicit accelerate device map: the transformer blocks split evenly, in order, over `parts`
    (devices such as 0, "cuda:1", "cpu", or "disk"); embeddings and other modules go with the first
    part, the final norm and the output head with the last. Pass it to accelerate.dispatch_model or
    from_pretrained(device_map=...)."""
    from .attach import attach

    lm = attach(lm)
    ad = lm.adapter
    blocks = getattr(ad, "blocks", None)
    if not blocks or not parts:
        raise ValueError("block_map needs a model with a transformer block list (an HF language model or "
                         f"encoder) and at least one part; got {type(lm.model).__name__} and parts={list(parts)!r}")
    n = len(ad.block_paths)
    if len(parts) > n:
        raise ValueError(f"{len(parts)} parts for {n} blocks: pass at most {n} parts")
    last = {p for p in (getattr(ad, "final", None), getattr(ad, "head", None)) if p}
    out: dict[str, Any] = {}

    def visit(prefix: str, module: nn.Module) -> None:
        for name, child in module.named_children():
            path = f"{prefix}{name}"
            if path == blocks:
                for i in range(n):
                    out[f"{blocks}.{i}"] = parts[i * len(parts) // n]
            elif blocks.startswith(path + "."):
                visit(path + ".", child)
            else:
                out[path] = parts[-1] if path in last else parts[0]
    visit("", ad.root)
    return out


__all__ = ["MetaWeightsError", "input_device", "output_device", "execution_device", "placement", "block_map"]
