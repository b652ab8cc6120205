"""TransformerLens models: TransformerBridge (TL >= 4) and HookedTransformer (TL <= 3.9).

Every TL hook point is a site under its TL name; the canonical names (DESIGN.md) are the primary
names where TL has the same concept, and TL names are accepted as aliases for them.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..sites import Site, SiteTable
from .base import Adapter, Prepared, ids_tokens, module_paths

PER_LAYER = {
    "resid_pre": "hook_resid_pre", "attn.out": "hook_attn_out", "resid_mid": "hook_resid_mid",
    "mlp.out": "hook_mlp_out", "resid_post": "hook_resid_post", "attn.z": "attn.hook_z",
    "attn.q": "attn.hook_q", "attn.k": "attn.hook_k", "attn.v": "attn.hook_v",
}
HEAD_KINDS = {"attn.z", "attn.q", "attn.k", "attn.v"}


def is_transformer_lens(obj: Any) -> bool:
    return type(obj).__module__.startswith("transformer_lens") and hasattr(obj, "hook_dict")


class TransformerLensAdapter(Adapter):
    family = "transformer_lens"
    model: Any  # a HookedTransformer / TransformerBridge: cfg, hook_dict and to_tokens are not nn.Module attributes

    def __init__(self, model: nn.Module, tokenizer=None):
        super().__init__(model, tokenizer or getattr(model, "tokenizer", None))
        self.n_layers: int = self.model.cfg.n_layers
        # the bridge's per-head hook points carry [batch, pos, heads * d_head]; HookedTransformer's are split
        self.flat_heads = type(model).__name__ != "HookedTransformer"
        self._table: SiteTable | None = None

    def site_table(self) -> SiteTable:
        if self._table is not None:
            return self._table
        path_of: dict[int, str] = {}
        for name, mod in self.model.named_modules(remove_duplicate=False):
            path_of.setdefault(id(mod), name)
        hooks = self.model.hook_dict
        sites: list[Site] = []
        aliases: dict[str, str] = {}

        def add(canonical: str, tl_name: str, layer: int, kind: str):
            if tl_name not in hooks:
                return
            heads = kind in HEAD_KINDS
            cfg = self.model.cfg
            n = (cfg.n_key_value_heads or cfg.n_heads) if kind in ("attn.k", "attn.v") else cfg.n_heads
            sites.append(Site(canonical, path_of[id(hooks[tl_name])], layer=layer, kind=kind,
                              heads=n if heads and self.flat_heads else None,
                              axes=("batch", "pos", "head", "d_head") if heads else ("batch", "pos", "d_model"),
                              meta=self._identity(canonical, layer, kind)))
            aliases[tl_name] = canonical

        add("embed", "hook_embed", -1, "embed")
        for i in range(self.n_layers):
            for canon, tl in PER_LAYER.items():
                add(f"blocks.{i}.{canon}", f"blocks.{i}.{tl}", i, canon)
        add("final", "ln_final.hook_normalized", self.n_layers, "final")
        sites.append(Site("logits", "", layer=self.n_layers, kind="logits", axes=("batch", "pos", "vocab")))
        known = set(aliases)
        for tl_name, hp in hooks.items():  # every other TL hook point, under its own name
            if tl_name not in known:
                layer = int(tl_name.split(".")[1]) if tl_name.startswith("blocks.") else None
                sites.append(Site(tl_name, path_of[id(hp)], layer=layer, kind="tl", axes=("batch", "pos")))
        self._table = SiteTable(sites, aliases, module_names=module_paths(self.model))
        return self._table

    def _identity(self, name: str, layer: int, kind: str) -> dict:
        """The residual identity a resid_mid / resid_post site satisfies (checked by interp.check)."""
        n = f"blocks.{layer}."
        parallel = bool(getattr(self.model.cfg, "parallel_attn_mlp", False))
        if kind == "resid_mid" and not parallel:
            return {"sum": ((n + "resid_pre", 1.0), (n + "attn.out", 1.0))}
        if kind == "resid_post" and f"blocks.{layer}.hook_mlp_out" in self.model.hook_dict:
            return {"sum": ((n + "resid_pre", 1.0), (n + "attn.out", 1.0), (n + "mlp.out", 1.0)) if parallel
                    else ((n + "resid_mid", 1.0), (n + "mlp.out", 1.0))}
        return {}

    def prepare(self, inputs: Any, pad: bool = False) -> Prepared:
        if isinstance(inputs, Prepared):
            return inputs
        if isinstance(inputs, (str, list)):
            ids = self.model.to_tokens(inputs)
        elif isinstance(inputs, torch.Tensor):
            ids = inputs if inputs.dim() == 2 else inputs[None]
        else:
            raise TypeError(f"TransformerLens models take prompts or a [batch, pos] tensor of ids, "
                            f"not {type(inputs).__name__}")
        return Prepared({}, ids.shape[0], ids.shape[1], ids_tokens(self.tokenizer, ids), (ids,))

    def forward(self, prepared: Prepared, last_only: bool = False):
        return self.model(*prepared.args)
