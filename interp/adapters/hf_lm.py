"""Hugging Face decoder-only language models (GPT-2, Llama/SmolLM2, Qwen2, Gemma, GPT-NeoX, ...).

Data-driven: the adapter finds the block list, attention, MLP, output projection and norms by
probing module names, so a new family with the usual layout needs no code.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..sites import Site, SiteTable
from .base import Adapter, Prepared, first_attr, module_paths, prepare_token_inputs

BLOCK_LISTS = ("model.layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers",
               "transformer.layers", "layers", "h", "model.language_model.layers")
EMBEDS = ("model.embed_tokens", "transformer.wte", "gpt_neox.embed_in", "model.decoder.embed_tokens",
          "embed_tokens", "wte", "model.language_model.embed_tokens")
FINAL_NORMS = ("model.norm", "transformer.ln_f", "gpt_neox.final_layer_norm", "model.decoder.final_layer_norm",
               "norm", "ln_f", "model.language_model.norm")
HEADS = ("lm_head", "embed_out")
ATTNS = ("self_attn", "attn", "attention")
MLPS = ("mlp", "feed_forward")
O_PROJS = ("o_proj", "c_proj", "dense", "out_proj")
QKV = {"q": ("q_proj", "query"), "k": ("k_proj", "key"), "v": ("v_proj", "value")}


def _cfg(model, *names, default=None):
    cfg = getattr(model, "config", None)
    cfg = getattr(cfg, "text_config", None) or cfg
    for n in names:
        v = getattr(cfg, n, None)
        if v is not None:
            return v
    return default


def find_blocks(model: nn.Module) -> str | None:
    for p in BLOCK_LISTS:
        try:
            m = model.get_submodule(p)
        except AttributeError:
            continue
        if isinstance(m, nn.ModuleList) and len(m) > 0:
            return p
    return None


def block_sites(model: nn.Module, blocks: str, n_heads: int, n_kv: int, prefix: str = "",
                parallel: bool = False) -> list[Site]:
    """Canonical per-block sites for a pre-norm transformer block list."""
    out = []
    layers = model.get_submodule(blocks)
    for i, blk in enumerate(layers):
        bp = f"{blocks}.{i}"
        n = f"{prefix}blocks.{i}."
        attn = first_attr(blk, ATTNS)
        mlp = first_attr(blk, MLPS)
        out.append(Site(n + "resid_pre", bp, io="input", slot=0, arg_name="hidden_states", layer=i, kind="resid_pre"))
        if attn:
            out.append(Site(n + "attn.out", f"{bp}.{attn}", slot=0, layer=i, kind="attn.out"))
            a = blk.get_submodule(attn)
            o = first_attr(a, O_PROJS)
            if o:
                out.append(Site(n + "attn.z", f"{bp}.{attn}.{o}", io="input", slot=0, arg_name="input",
                                axes=("batch", "pos", "head", "d_head"), heads=n_heads, layer=i, kind="attn.z"))
            for short, names in QKV.items():
                q = first_attr(a, names)
                if q:
                    out.append(Site(n + f"attn.{short}", f"{bp}.{attn}.{q}", slot=0,
                                    axes=("batch", "pos", "head", "d_head"),
                                    heads=n_heads if short == "q" else n_kv, layer=i, kind=f"attn.{short}"))
        mid = first_attr(blk, ("pre_feedforward_layernorm",) if hasattr(blk, "pre_feedforward_layernorm")
                         else ("post_attention_layernorm", "ln_2"))
        if mid and not parallel:
            out.append(Site(n + "resid_mid", f"{bp}.{mid}", io="input", slot=0, arg_name="hidden_states",
                            layer=i, kind="resid_mid", inplace=True))
        if mlp:
            out.append(Site(n + "mlp.out", f"{bp}.{mlp}", slot=0, layer=i, kind="mlp.out"))
        out.append(Site(n + "resid_post", bp, slot=0, layer=i, kind="resid_post"))
    return out


class HFCausalLMAdapter(Adapter):
    family = "hf_lm"

    def __init__(self, model: nn.Module, tokenizer=None):
        super().__init__(model, tokenizer)
        self.blocks = find_blocks(model)
        if self.blocks is None:
            raise TypeError(f"no transformer block list found in {type(model).__name__}")
        self.n_layers = len(model.get_submodule(self.blocks))
        self.n_heads = _cfg(model, "num_attention_heads", "n_head")
        self.n_kv = _cfg(model, "num_key_value_heads", default=self.n_heads)
        self.embed = first_attr(model, EMBEDS)
        self.final = first_attr(model, FINAL_NORMS)
        self.head = first_attr(model, HEADS)
        self.parallel = bool(_cfg(model, "use_parallel_residual", "parallel_attn", default=False))
        self.block_paths = [f"{self.blocks}.{i}" for i in range(self.n_layers)]
        self._table = None

    def site_table(self) -> SiteTable:
        if self._table is None:
            sites = []
            if self.embed:
                sites.append(Site("embed", self.embed, layer=-1, kind="embed"))
            sites += block_sites(self.model, self.blocks, self.n_heads, self.n_kv, parallel=self.parallel)
            if self.final:
                sites.append(Site("final", self.final, layer=self.n_layers, kind="final"))
            if self.head:
                sites.append(Site("logits", self.head, axes=("batch", "pos", "vocab"), layer=self.n_layers, kind="logits"))
            self._table = SiteTable(sites, module_names=module_paths(self.model), block_paths=self.block_paths)
        return self._table

    def prepare(self, inputs: Any, pad: bool = False) -> Prepared:
        if isinstance(inputs, Prepared):
            return inputs
        return prepare_token_inputs(self.model, self.tokenizer, inputs, pad)

    def forward(self, prepared: Prepared, last_only: bool = False):
        kw = dict(prepared.kwargs)
        kw["use_cache"] = False
        if last_only:
            kw["logits_to_keep"] = 1
        try:
            return self.model(**kw)
        except TypeError as e:
            if "logits_to_keep" not in str(e):
                raise
            kw.pop("logits_to_keep")
            return self.model(**kw)

    def main_output(self, output) -> torch.Tensor:
        return output.logits if hasattr(output, "logits") else super().main_output(output)

    def tail(self, hidden: torch.Tensor, last_only: bool) -> torch.Tensor:
        if last_only:
            hidden = hidden[:, -1:]
        if self.final:
            hidden = self.model.get_submodule(self.final)(hidden)
        logits = self.model.get_submodule(self.head)(hidden)
        cap = _cfg(self.model, "final_logit_softcapping")
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return self._to_output_device(logits)

    def tail_columns(self, hidden: torch.Tensor, columns) -> torch.Tensor | None:
        """Logits of the given vocabulary columns only ([..., len(columns)]): final norm, then only those
        rows of the unembedding. None when the head is not a plain Linear (then callers use `tail`)."""
        head = self.model.get_submodule(self.head)
        if type(head) is not nn.Linear or head._forward_hooks or head._forward_pre_hooks:
            return None  # anything hooked on the head must see the full logits
        if self.final:
            hidden = self.model.get_submodule(self.final)(hidden)
        idx = torch.as_tensor(columns, device=head.weight.device)
        # a per-row product and sum: each logit's rounding is the same whatever the batch (a matmul
        # picks kernels by shape), so a grid split over processes or chunks gives bitwise equal values
        logits = (hidden.to(head.weight.device)[..., None, :] * head.weight.index_select(0, idx)).sum(-1)
        if head.bias is not None:
            logits = logits + head.bias.index_select(0, idx)
        cap = _cfg(self.model, "final_logit_softcapping")
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return self._to_output_device(logits)

    def _to_output_device(self, logits: torch.Tensor) -> torch.Tensor:
        from ..sharding import output_device

        dev = output_device(self.model)  # accelerate: a full forward returns on the input device; replays must too
        return logits if dev is None else logits.to(dev)


def is_causal_lm(model: nn.Module) -> bool:
    return find_blocks(model) is not None and first_attr(model, HEADS) is not None
