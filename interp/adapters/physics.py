"""The zoo's physics surrogate (interp.zoo.physics.PhysicsSurrogate): canonical transformer sites.

Its residual stream is [batch, 1 + n_grid, d_model]: position 0 is the regime token (kappa,
velocity), positions 1.. are the grid points. Sites: `blocks.{i}.resid_pre`, `.attn.z`, `.attn.out`,
`.resid_mid`, `.mlp.out`, `.resid_post`, and `final` (ln_f output, grid points only). Inputs: a tuple
(u [batch, n_grid], kappa, velocity) or a dict with those keys. Raw `module:` paths still work.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..sites import Site, SiteTable
from .base import Adapter, Prepared, module_paths


def is_physics(model: Any) -> bool:
    return type(model).__name__ == "PhysicsSurrogate" and isinstance(model, nn.Module) and hasattr(model, "blocks") \
        and hasattr(model, "cond")


class PhysicsAdapter(Adapter):
    family = "physics"

    def __init__(self, model: nn.Module, tokenizer=None):
        super().__init__(model, tokenizer)
        blocks: Any = model.blocks  # the surrogate's nn.ModuleList; its blocks carry attn.heads
        self.n_layers = len(blocks)
        self.n_heads = blocks[0].attn.heads
        self.block_paths = [f"blocks.{i}" for i in range(self.n_layers)]
        self._table: SiteTable | None = None

    def site_table(self) -> SiteTable:
        if self._table is None:
            sites = []
            for i in range(self.n_layers):
                bp, n = f"blocks.{i}", f"blocks.{i}."
                # meta: the residual identities and the attn.z -> attn.out projection that interp.check verifies
                sites += [
                    Site(n + "resid_pre", bp, io="input", slot=0, arg_name="x", layer=i, kind="resid_pre"),
                    Site(n + "attn.z", f"{bp}.attn.out", io="input", slot=0, arg_name="input",
                         axes=("batch", "pos", "head", "d_head"), heads=self.n_heads, layer=i, kind="attn.z",
                         meta={"proj": f"{bp}.attn.out", "out": n + "attn.out"}),
                    Site(n + "attn.out", f"{bp}.attn", layer=i, kind="attn.out"),
                    Site(n + "resid_mid", f"{bp}.ln2", io="input", slot=0, arg_name="input", layer=i,
                         kind="resid_mid", inplace=True, meta={"sum": ((n + "resid_pre", 1.0), (n + "attn.out", 1.0))}),
                    Site(n + "mlp.out", f"{bp}.mlp", layer=i, kind="mlp.out"),
                    Site(n + "resid_post", bp, layer=i, kind="resid_post",
                         meta={"sum": ((n + "resid_mid", 1.0), (n + "mlp.out", 1.0))}),
                ]
            sites.append(Site("final", "ln_f", layer=self.n_layers, kind="final"))
            self._table = SiteTable(sites, module_names=module_paths(self.model), block_paths=self.block_paths)
        return self._table

    def prepare(self, inputs: Any, pad: bool = False) -> Prepared:
        if isinstance(inputs, Prepared):
            return inputs
        if isinstance(inputs, dict):
            inputs = (inputs["u"], inputs["kappa"], inputs["velocity"])
        if not (isinstance(inputs, tuple) and len(inputs) == 3 and isinstance(inputs[0], torch.Tensor)):
            raise TypeError("the physics surrogate runs on (u [batch, n_grid], kappa, velocity) or a dict with "
                            f"keys u, kappa, velocity; got {type(inputs).__name__}")
        u = inputs[0] if inputs[0].dim() == 2 else inputs[0][None]
        return Prepared({}, u.shape[0], u.shape[1] + 1, [], (u, *inputs[1:]))


__all__ = ["PhysicsAdapter", "is_physics"]
