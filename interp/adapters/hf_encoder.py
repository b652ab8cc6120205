"""Hugging Face encoders (BERT family, e.g. all-MiniLM-L6-v2).

BERT is post-norm: `attn.out` is the attention output projection (before the residual add and
LayerNorm), `resid_mid` the normalised state after attention, `mlp.out` the output projection of
the feed-forward part, `resid_post` the block output.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..sites import Site, SiteTable
from .base import LM_KEYS, Adapter, Prepared, module_paths, prepare_token_inputs

ENCODER_KEYS = (*LM_KEYS, "token_type_ids")
ENCODER_LISTS = ("encoder.layer", "bert.encoder.layer", "roberta.encoder.layer", "model.encoder.layer")


def find_encoder_blocks(model: nn.Module) -> str | None:
    for p in ENCODER_LISTS:
        try:
            m = model.get_submodule(p)
        except AttributeError:
            continue
        if isinstance(m, nn.ModuleList):
            return p
    return None


class HFEncoderAdapter(Adapter):
    family = "hf_encoder"

    def __init__(self, model: nn.Module, tokenizer=None):
        super().__init__(model, tokenizer)
        self.blocks = find_encoder_blocks(model)
        self.prefix = self.blocks[: -len("encoder.layer")]
        self.n_layers = len(model.get_submodule(self.blocks))
        self.n_heads = model.config.num_attention_heads
        self.block_paths = [f"{self.blocks}.{i}" for i in range(self.n_layers)]
        self._table = None

    def site_table(self) -> SiteTable:
        if self._table is None:
            p = self.prefix
            sites = [Site("embed", f"{p}embeddings.word_embeddings", layer=-1, kind="embed"),
                     Site("embed.out", f"{p}embeddings", layer=-1, kind="embed")]
            for i in range(self.n_layers):
                bp, n = f"{self.blocks}.{i}", f"blocks.{i}."
                sites += [
                    Site(n + "resid_pre", bp, io="input", slot=0, arg_name="hidden_states", layer=i, kind="resid_pre"),
                    Site(n + "attn.z", f"{bp}.attention.output.dense", io="input", slot=0, arg_name="input",
                         axes=("batch", "pos", "head", "d_head"), heads=self.n_heads, layer=i, kind="attn.z"),
                    Site(n + "attn.out", f"{bp}.attention.output.dense", layer=i, kind="attn.out"),
                    Site(n + "resid_mid", f"{bp}.attention", slot=0, layer=i, kind="resid_mid"),
                    Site(n + "mlp.out", f"{bp}.output.dense", layer=i, kind="mlp.out"),
                    Site(n + "resid_post", bp, slot=0, layer=i, kind="resid_post"),
                ]
            self._table = SiteTable(sites, module_names=module_paths(self.model), block_paths=self.block_paths)
        return self._table

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
