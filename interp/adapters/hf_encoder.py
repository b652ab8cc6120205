"""Hugging Face encoders: BERT / RoBERTa (e.g. all-MiniLM-L6-v2), DistilBERT, ModernBERT.

BERT, RoBERTa and DistilBERT are post-norm: `attn.out` is what attention adds (the output projection
before the residual add and LayerNorm), `resid_mid` the normalised state after attention, `mlp.out`
the feed-forward output before its residual add, `resid_post` the block output; each `resid_*` site
states its identity (norm of a sum) in `meta` for interp.check. ModernBERT is pre-norm:
`resid_mid = resid_pre + attn.out`, `resid_post = resid_mid + mlp.out`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn

from ..errors import UnsupportedModelError
from ..sites import Site, SiteTable
from .base import LM_KEYS, Adapter, Prepared, module_paths, prepare_token_inputs
from .base import has_submodule as _has

ENCODER_KEYS = (*LM_KEYS, "token_type_ids")


@dataclass(frozen=True)
class EncoderLayout:
    """Module paths (relative to one block) of an encoder family's canonical tensors."""

    lists: tuple[str, ...]     # where the block list may sit
    embed: str                 # token embedding, relative to the prefix in front of the block list
    embed_out: str | None      # embeddings module (token + position + norm)
    attn: str                  # attention module; attn.out is its output unless attn_out is set
    z: str                     # output projection: its input is attn.z
    attn_out: str | None       # post-norm families: the projection whose output is added to the residual
    mid: str                   # resid_mid: this module's output (post-norm) or input (pre-norm)
    mlp: str                   # mlp.out: this module's output
    post_norm: str | None      # post-norm: norm applied to resid_mid + mlp.out to give resid_post
    pre_norm: bool = False     # ModernBERT: pre-norm blocks, resid_mid is the MLP norm's input
    final: str | None = None


LAYOUTS = (
    EncoderLayout(("encoder.layer", "bert.encoder.layer", "roberta.encoder.layer", "model.encoder.layer"),
                  "embeddings.word_embeddings", "embeddings", "attention", "attention.output.dense",
                  "attention.output.dense", "attention", "output.dense", "output.LayerNorm"),
    EncoderLayout(("transformer.layer", "distilbert.transformer.layer"), "embeddings.word_embeddings", "embeddings",
                  "attention", "attention.out_lin", None, "sa_layer_norm", "ffn", "output_layer_norm"),
    EncoderLayout(("layers", "model.layers"), "embeddings.tok_embeddings", "embeddings", "attn", "attn.Wo", None,
                  "mlp_norm", "mlp", None, pre_norm=True, final="final_norm"),
)
ENCODER_LISTS = tuple(p for lay in LAYOUTS for p in lay.lists)


def _find(model: nn.Module) -> tuple[str, EncoderLayout] | None:
    for lay in LAYOUTS:
        for p in lay.lists:
            try:
                m = model.get_submodule(p)
            except AttributeError:
                continue
            if isinstance(m, nn.ModuleList) and len(m) and _has(m[0], lay.z) and _has(m[0], lay.mlp):
                return p, lay
    return None


def find_encoder_blocks(model: nn.Module) -> str | None:
    found = _find(model)
    return found[0] if found else None


class HFEncoderAdapter(Adapter):
    family = "hf_encoder"

    def __init__(self, model: nn.Module, tokenizer=None):
        super().__init__(model, tokenizer)
        found = _find(model)
        if found is None:
            raise UnsupportedModelError(f"no encoder block list found in {type(model).__name__} (looked for "
                                        f"{', '.join(ENCODER_LISTS)})")
        self.blocks, self.layout = found
        self.prefix = self.blocks[: self.blocks.rfind(self.layout.lists[0])]
        self.n_layers = len(cast(nn.ModuleList, model.get_submodule(self.blocks)))
        cfg: Any = model.config  # a transformers PretrainedConfig: fields differ per family
        self.n_heads = getattr(cfg, "num_attention_heads", None) or cfg.n_heads
        self.block_paths = [f"{self.blocks}.{i}" for i in range(self.n_layers)]
        self._table: SiteTable | None = None

    def site_table(self) -> SiteTable:
        if self._table is None:
            p, lay = self.prefix, self.layout
            sites = [Site("embed", f"{p}{lay.embed}", layer=-1, kind="embed")]
            if lay.embed_out:
                sites.append(Site("embed.out", f"{p}{lay.embed_out}", layer=-1, kind="embed.out"))
            for i in range(self.n_layers):
                sites += self._block(i)
            if lay.final and _has(self.model, f"{p}{lay.final}"):
                sites.append(Site("final", f"{p}{lay.final}", layer=self.n_layers, kind="final"))
            self._table = SiteTable(sites, module_names=module_paths(self.model), block_paths=self.block_paths)
        return self._table

    def _block(self, i: int) -> list[Site]:
        lay, bp, n = self.layout, f"{self.blocks}.{i}", f"blocks.{i}."
        out_mod = lay.attn_out or lay.attn
        sites = [Site(n + "resid_pre", bp, io="input", slot=0, arg_name="hidden_states", layer=i, kind="resid_pre"),
                 Site(n + "attn.z", f"{bp}.{lay.z}", io="input", slot=0, arg_name="input",
                      axes=("batch", "pos", "head", "d_head"), heads=self.n_heads, layer=i, kind="attn.z",
                      meta={"proj": f"{bp}.{lay.z}", "out": n + "attn.out"}),
                 Site(n + "attn.out", f"{bp}.{out_mod}", slot=0, layer=i, kind="attn.out")]
        if lay.pre_norm:
            sites.append(Site(n + "resid_mid", f"{bp}.{lay.mid}", io="input", slot=0, layer=i, kind="resid_mid",
                              inplace=True, meta={"sum": ((n + "resid_pre", 1.0), (n + "attn.out", 1.0))}))
        else:
            norm = f"{bp}.{lay.mid}" if lay.attn_out is None else f"{bp}.{lay.attn}.output.LayerNorm"
            sites.append(Site(n + "resid_mid", f"{bp}.{lay.mid}", slot=0, layer=i, kind="resid_mid",
                              meta={"sum": ((n + "resid_pre", 1.0), (n + "attn.out", 1.0)), "norm": norm}))
        sites.append(Site(n + "mlp.out", f"{bp}.{lay.mlp}", slot=0, layer=i, kind="mlp.out"))
        post: dict[str, Any] = {"sum": ((n + "resid_mid", 1.0), (n + "mlp.out", 1.0))}
        if lay.post_norm:
            post["norm"] = f"{bp}.{lay.post_norm}"
        sites.append(Site(n + "resid_post", bp, slot=0, layer=i, kind="resid_post", meta=post))
        return sites

    def prepare(self, inputs: Any, pad: bool = False) -> Prepared:
        if isinstance(inputs, Prepared):
            return inputs
        return prepare_token_inputs(self.model, self.tokenizer, inputs, pad, keys=ENCODER_KEYS, with_mask=True)

    def forward(self, prepared: Prepared, last_only: bool = False):
        return self.model(**prepared.kwargs)

    def main_output(self, output) -> torch.Tensor:
        for key in ("logits", "last_hidden_state"):
            v = getattr(output, key, None)
            if v is not None:
                return v
        return super().main_output(output)
