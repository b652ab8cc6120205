"""Text encoders of diffusion pipelines: CLIP (CLIPTextModel, CLIPTextModelWithProjection) and T5
(T5EncoderModel, UMT5EncoderModel).

Sites (canonical, as for language models):
  embed                 token embedding output (before position embeddings): where word embeddings are
                        corrupted in Diff-QuickFix-style tracing
  embed.out             CLIP only: token + position embeddings (the input of block 0)
  blocks.{i}.resid_pre  block input
  blocks.{i}.attn.z     per-head attention output before the output projection [batch, pos, head, d_head]
  blocks.{i}.attn.q/k/v per-head projections
  blocks.{i}.attn.out   self-attention output (before the residual add)
  blocks.{i}.resid_mid  residual stream between attention and MLP
  blocks.{i}.mlp.out    MLP output (before the residual add)
  blocks.{i}.resid_post block output
  final                 final layer norm output (CLIP: last_hidden_state)
Inside a pipeline every name is prefixed by the component (`text_encoder.blocks.0.attn.out`).
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any, cast

import torch
from torch import nn

from ..sites import Site, SiteTable
from .base import Adapter, Prepared, ids_tokens, module_paths, tokenize
from .base import has_submodule as _has
from .hf_lm import block_sites

T5_BLOCKS = "encoder.block"


def clip_prefix(model: nn.Module) -> str:
    """'text_model.' (CLIPTextModelWithProjection; CLIPTextModel in transformers < 5) or ''."""
    return "text_model." if _has(model, "text_model.encoder.layers") else ""


def text_encoder_kind(model: Any) -> str | None:
    """'clip', 't5' or None."""
    if not isinstance(model, nn.Module):
        return None
    clip = clip_prefix(model) + "encoder.layers"
    if not _has(model, clip_prefix(model) + "embeddings.token_embedding"):
        clip = "-"
    for path, kind in ((clip, "clip"), (T5_BLOCKS, "t5")):
        try:
            blocks = model.get_submodule(path)
        except (AttributeError, ValueError):
            continue
        if isinstance(blocks, nn.ModuleList) and len(blocks) and not hasattr(model, "decoder") \
                and not hasattr(model, "lm_head"):
            return kind
    return None


def is_text_encoder(model: Any) -> bool:
    return text_encoder_kind(model) is not None


def text_encoder_sites(model: nn.Module, prefix: str = "", module_prefix: str = "") -> list[Site]:
    """Sites of a CLIP or T5 text encoder; names get `prefix`, module paths `module_prefix`."""
    kind = text_encoder_kind(model)
    cfg: Any = model.config  # CLIPTextConfig or T5Config
    n_heads: int = getattr(cfg, "num_attention_heads", None) or cfg.num_heads
    sites: list[Site] = []
    if kind == "clip":
        cp = clip_prefix(model)
        blocks = cp + "encoder.layers"
        sites += [Site("embed", cp + "embeddings.token_embedding", layer=-1, kind="embed"),
                  Site("embed.out", cp + "embeddings", layer=-1, kind="embed")]
        sites += block_sites(model, blocks, n_heads, n_heads)  # pre-norm: layer_norm2's input is resid_mid
        n = len(cast(nn.ModuleList, model.get_submodule(blocks)))
        sites.append(Site("final", cp + "final_layer_norm", layer=n, kind="final"))
    elif kind == "t5":
        sites.append(Site("embed", "encoder.embed_tokens" if _has(model, "encoder.embed_tokens") else "shared",
                          layer=-1, kind="embed"))
        n_t5 = len(cast(nn.ModuleList, model.get_submodule(T5_BLOCKS)))
        for i in range(n_t5):
            bp, nm = f"{T5_BLOCKS}.{i}", f"blocks.{i}."
            att = f"{bp}.layer.0.SelfAttention"
            sites += [
                Site(nm + "resid_pre", bp, io="input", slot=0, arg_name="hidden_states", layer=i, kind="resid_pre"),
                *[Site(nm + f"attn.{q}", f"{att}.{q}", axes=("batch", "pos", "head", "d_head"), heads=n_heads,
                       layer=i, kind=f"attn.{q}") for q in ("q", "k", "v")],
                Site(nm + "attn.z", f"{att}.o", io="input", slot=0, arg_name="input",
                     axes=("batch", "pos", "head", "d_head"), heads=n_heads, layer=i, kind="attn.z",
                     meta={"proj": f"{att}.o", "out": nm + "attn.out"}),
                Site(nm + "attn.out", att, slot=0, layer=i, kind="attn.out"),
                Site(nm + "resid_mid", f"{bp}.layer.1", io="input", slot=0, arg_name="hidden_states", layer=i,
                     kind="resid_mid", inplace=True, meta={"sum": ((nm + "resid_pre", 1.0), (nm + "attn.out", 1.0))}),
                Site(nm + "mlp.out", f"{bp}.layer.1.DenseReluDense", slot=0, layer=i, kind="mlp.out"),
                Site(nm + "resid_post", bp, slot=0, layer=i, kind="resid_post",
                     meta={"sum": ((nm + "resid_mid", 1.0), (nm + "mlp.out", 1.0))}),
            ]
        sites.append(Site("final", "encoder.final_layer_norm", layer=n_t5, kind="final"))
    else:
        raise TypeError(f"{type(model).__name__} is not a CLIP or T5 text encoder")
    if not prefix and not module_prefix:
        return sites
    return [replace(s, name=prefix + s.name, module=module_prefix + s.module,
                    meta={**s.meta, "component": prefix.rstrip(".")}) for s in sites]


class TextEncoderAdapter(Adapter):
    """A CLIP or T5 text encoder on its own (prompts, token ids or tokenizer dicts as inputs)."""

    family = "text_encoder"

    def __init__(self, model: nn.Module, tokenizer=None):
        super().__init__(model, tokenizer)
        self.kind = text_encoder_kind(model)
        self.blocks = clip_prefix(model) + "encoder.layers" if self.kind == "clip" else T5_BLOCKS
        self.n_layers = len(cast(nn.ModuleList, model.get_submodule(self.blocks)))
        self._table: SiteTable | None = None

    def site_table(self) -> SiteTable:
        if self._table is None:
            self._table = SiteTable(text_encoder_sites(self.model), module_names=module_paths(self.model),
                                    block_paths=[f"{self.blocks}.{i}" for i in range(self.n_layers)])
        return self._table

    def prepare(self, inputs: Any, pad: bool = False) -> Prepared:
        if isinstance(inputs, Prepared):
            return inputs
        dev = next(self.model.parameters()).device
        if isinstance(inputs, str) or (isinstance(inputs, (list, tuple)) and inputs and isinstance(inputs[0], str)):
            kw, tokens = tokenize(self.tokenizer, inputs, pad)
        elif isinstance(inputs, torch.Tensor):
            ids = inputs if inputs.dim() == 2 else inputs[None]
            kw, tokens = {"input_ids": ids}, ids_tokens(self.tokenizer, ids)
        elif isinstance(inputs, dict) or hasattr(inputs, "keys"):
            kw = {k: v for k, v in dict(inputs).items() if k in ("input_ids", "attention_mask")}
            tokens = ids_tokens(self.tokenizer, kw["input_ids"])
        else:
            raise TypeError(f"a text encoder takes prompts, a [batch, pos] tensor of token ids or a tokenizer dict, "
                            f"not {type(inputs).__name__}")
        kw = {k: v.to(dev) for k, v in kw.items() if isinstance(v, torch.Tensor)}
        return Prepared(kw, kw["input_ids"].shape[0], kw["input_ids"].shape[1], tokens)

    def forward(self, prepared: Prepared, last_only: bool = False):
        return self.model(**prepared.kwargs)

    def describe(self) -> str:
        return f"text_encoder/{self.kind} ({type(self.model).__name__}, {self.n_layers} layers)"
