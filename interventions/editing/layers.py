"""Where an LM keeps its key-value memories: the MLP down-projection (and attention out-projection) of each block.

GPT-2's `Conv1D` stores its weight as [in, out] (y = x W + b); `nn.Linear` as [out, in] (y = W x + b). Every
function here speaks [out, in] ("W") and converts at the boundary, so the solvers never see the difference.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from interp.errors import InterpError

DOWN_NAMES = ("down_proj", "c_proj", "fc2", "dense_4h_to_h", "fc_out", "w2")
OUT_NAMES = ("o_proj", "c_proj", "dense", "out_proj")


class EditError(InterpError, ValueError):
    """An edit request the model or the solver cannot carry out (the message says what to change)."""


def is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


@dataclass(frozen=True)
class Projection:
    """One linear map whose output is written into the residual stream: path, parameter name and layout."""

    layer: int
    path: str          # module path from the model root
    kind: str          # "mlp.down" | "attn.out"
    transposed: bool   # True for GPT-2 Conv1D ([in, out] storage)

    @property
    def weight_name(self) -> str:
        return f"{self.path}.weight"

    @property
    def bias_name(self) -> str:
        return f"{self.path}.bias"

    @property
    def key_site(self) -> str:
        """The engine's raw site of this projection's input (the keys)."""
        return f"module:{self.path}:input"

    @property
    def out_site(self) -> str:
        return f"blocks.{self.layer}.{'mlp' if self.kind == 'mlp.down' else 'attn'}.out"

    def module(self, model: nn.Module) -> nn.Module:
        return model.get_submodule(self.path)

    def weight(self, model: nn.Module) -> torch.Tensor:
        """W as [out, in] (a view of the parameter; transposed for Conv1D)."""
        w = self.module(model).weight
        return w.T if self.transposed else w

    def stored(self, W: torch.Tensor) -> torch.Tensor:
        """[out, in] -> the parameter's own layout."""
        return W.T.contiguous() if self.transposed else W.contiguous()


def _projection(lm, layer: int, kind: str) -> Projection:
    ad = lm.adapter
    blocks = getattr(ad, "blocks", None)
    n = getattr(ad, "n_layers", 0)
    if blocks is None:
        raise EditError(f"editing needs a decoder-only HF language model (family 'hf_lm'); this is {lm.family!r}")
    if not 0 <= layer < n:
        raise EditError(f"layer {layer} is out of range: the model has {n} blocks (0..{n - 1})")
    parent_names = ("mlp", "feed_forward") if kind == "mlp.down" else ("self_attn", "attn", "attention")
    names = DOWN_NAMES if kind == "mlp.down" else OUT_NAMES
    block = lm.model.get_submodule(f"{blocks}.{layer}")
    for pn in parent_names:
        parent = getattr(block, pn, None)
        if parent is None:
            continue
        for cn in names:
            m = getattr(parent, cn, None)
            if isinstance(m, nn.Linear) or is_conv1d(m):
                return Projection(layer, f"{blocks}.{layer}.{pn}.{cn}", kind, is_conv1d(m))
    raise EditError(f"block {layer} has no {kind} projection named one of {names} under {parent_names} "
                    f"(module {type(block).__name__}); editing supports Linear / Conv1D output projections")


def down_proj(lm, layer: int) -> Projection:
    """The MLP down-projection of block `layer` (ROME's and MEMIT's key-value memory)."""
    return _projection(lm, layer, "mlp.down")


def out_proj(lm, layer: int) -> Projection:
    """The attention output projection of block `layer`."""
    return _projection(lm, layer, "attn.out")


__all__ = ["Projection", "down_proj", "out_proj", "EditError", "is_conv1d"]
