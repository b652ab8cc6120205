"""Hugging Face decoder-only language models (GPT-2, Llama/SmolLM2, Qwen2, Gemma, GPT-NeoX, ...).

Data-driven: the adapter finds the block list, attention, MLP, output projection and norms by
probing module names, so a new family with the usual layout needs no code.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn

from ..errors import UnsupportedModelError
from ..sites import Site, SiteTable
from .base import Adapter, Prepared, first_attr, module_paths, prepare_token_inputs

BLOCK_LISTS = ("model.layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers",
               "transformer.layers", "layers", "h", "model.language_model.layers", "backbone.layers")
EMBEDS = ("model.embed_tokens", "transformer.wte", "gpt_neox.embed_in", "model.decoder.embed_tokens",
          "transformer.word_embeddings", "embed_tokens", "wte", "model.language_model.embed_tokens",
          "backbone.embeddings")
FINAL_NORMS = ("model.norm", "transformer.ln_f", "gpt_neox.final_layer_norm", "model.decoder.final_layer_norm",
               "model.final_layernorm", "norm", "ln_f", "model.language_model.norm", "backbone.norm_f")
HEADS = ("lm_head", "embed_out")
ATTNS = ("self_attn", "attn", "attention", "self_attention")
MLPS = ("mlp", "feed_forward", "block_sparse_moe")
O_PROJS = ("o_proj", "c_proj", "dense", "out_proj")
# the pre-MLP norm of sequential blocks (its input is resid_mid)
MID_NORMS = ("post_attention_layernorm", "ln_2", "final_layer_norm", "layer_norm2")
MLP_LAST = ("down_proj", "c_proj", "dense_4h_to_h", "fc2", "fc_out", "w2")
MIXERS = ("mixer",)  # state-space sequence mixers
QKV = {"q": ("q_proj", "query"), "k": ("k_proj", "key"), "v": ("v_proj", "value")}
PARALLEL_FLAGS = ("use_parallel_residual", "parallel_attn")


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


def _adds_residual(module: nn.Module) -> bool:
    """Bloom-style modules take the residual and return residual + their output."""
    try:
        return "residual" in inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return False


@dataclass
class BlockLayout:
    """Where one block's canonical tensors live (module paths relative to the block), and its residual form."""

    attn: str | None
    mlp: str | None        # module whose output is what the MLP adds to the residual stream
    attn_out: str | None   # module whose output is what attention adds to the residual stream
    o_proj: str | None     # attention output projection (its input is attn.z)
    mid: str | None        # module whose input is the residual stream between attention and MLP
    mid_inplace: bool      # that input tensor is also the residual the block adds back to
    parallel: bool
    mid_io: str = "input"  # resid_mid is the input of `mid` (pre-norm) or its output (post-norm blocks)
    mid_norm: str | None = None   # post-norm: resid_mid = mid_norm(resid_pre + attn.out)
    post_norm: str | None = None  # post-norm: resid_post = post_norm(resid_mid + mlp.out)
    flat: bool = False     # mlp / mid run on tokens flattened to [batch*pos, d] (Site.meta["unflat"])


def _opt_layout(blk: nn.Module, attn: str | None, attn_out: str | None, o_proj: str | None) -> BlockLayout:
    """OPT: fc1/fc2 sit in the layer, which flattens the tokens to [batch*pos, d] around them (the sites
    view them as [batch, pos, d]). Pre-LN (do_layer_norm_before): resid_mid is final_layer_norm's input.
    Post-LN (OPT-350m): resid_mid is self_attn_layer_norm's output and the block ends in final_layer_norm."""
    if getattr(blk, "do_layer_norm_before", True):
        return BlockLayout(attn, "fc2", attn_out, o_proj, "final_layer_norm", True, False, flat=True)
    return BlockLayout(attn, "fc2", attn_out, o_proj, "self_attn_layer_norm", False, False, mid_io="output",
                       mid_norm="self_attn_layer_norm", post_norm="final_layer_norm", flat=True)


def block_layout(blk: nn.Module, parallel_flag: bool) -> BlockLayout:
    """Probe one block's module names for the canonical sites (see the module docstring)."""
    attn = first_attr(blk, ATTNS)
    mlp = first_attr(blk, MLPS)
    a = blk.get_submodule(attn) if attn else None
    o = first_attr(a, O_PROJS) if a is not None else None
    o_proj = f"{attn}.{o}" if o else None
    attn_out = o_proj if (a is not None and _adds_residual(a)) else attn
    if mlp and _adds_residual(blk.get_submodule(mlp)):
        last = first_attr(blk.get_submodule(mlp), MLP_LAST)
        mlp = f"{mlp}.{last}" if last else None
    elif mlp is None and first_attr(blk, ("fc2",)):
        return _opt_layout(blk, attn, attn_out, o_proj)
    post_ff = first_attr(blk, ("post_feedforward_layernorm",))
    if post_ff:  # post-norm sublayers (Gemma 2/3, OLMo 2): the norms' outputs are what is added back
        attn_out = first_attr(blk, ("post_attention_layernorm",)) or attn_out
        mlp_in = first_attr(blk, ("pre_feedforward_layernorm",)) or first_attr(blk, MLPS)
        return BlockLayout(attn, post_ff, attn_out, o_proj, mlp_in, True, False)
    mid = first_attr(blk, MID_NORMS)
    parallel = parallel_flag or mid is None
    return BlockLayout(attn, mlp, attn_out, o_proj, None if parallel else mid, True, parallel)


def block_sites(model: nn.Module, blocks: str, n_heads: int, n_kv: int, prefix: str = "",
                parallel: bool = False, residual_scale: float = 1.0) -> list[Site]:
    """Canonical per-block sites; `meta["sum"]` on resid_mid / resid_post states the residual identity
    (weighted terms) that interp.check verifies, `meta["proj"]` on attn.z the path to attn.out."""
    out = []
    layers = cast(nn.ModuleList, model.get_submodule(blocks))
    w = float(residual_scale)
    for i, blk in enumerate(layers):
        bp = f"{blocks}.{i}"
        n = f"{prefix}blocks.{i}."
        lay = block_layout(blk, parallel)
        out.append(Site(n + "resid_pre", bp, io="input", slot=0, arg_name="hidden_states", layer=i, kind="resid_pre"))
        if lay.attn:
            post = lay.attn_out if lay.attn_out not in (lay.attn, lay.o_proj) else None
            out.append(Site(n + "attn.out", f"{bp}.{lay.attn_out}", slot=0, layer=i, kind="attn.out"))
            if lay.o_proj:
                out.append(Site(n + "attn.z", f"{bp}.{lay.o_proj}", io="input", slot=0, arg_name="input",
                                axes=("batch", "pos", "head", "d_head"), heads=n_heads, layer=i, kind="attn.z",
                                meta={"proj": f"{bp}.{lay.o_proj}", "post": post and f"{bp}.{post}",
                                      "out": n + "attn.out"}))
            a = blk.get_submodule(lay.attn)
            for short, names in QKV.items():
                q = first_attr(a, names)
                if q:
                    out.append(Site(n + f"attn.{short}", f"{bp}.{lay.attn}.{q}", slot=0,
                                    axes=("batch", "pos", "head", "d_head"),
                                    heads=n_heads if short == "q" else n_kv, layer=i, kind=f"attn.{short}"))
        flat = {"unflat": bp} if lay.flat else {}
        if lay.mid:
            mid_in = lay.mid_io == "input"
            out.append(Site(n + "resid_mid", f"{bp}.{lay.mid}", io=lay.mid_io, slot=0,
                            arg_name="hidden_states" if mid_in else None, layer=i, kind="resid_mid",
                            inplace=lay.mid_inplace and mid_in,
                            meta={"sum": ((n + "resid_pre", 1.0), (n + "attn.out", w)),
                                  **({"norm": f"{bp}.{lay.mid_norm}"} if lay.mid_norm else {}),
                                  **(flat if mid_in else {})}))
        if lay.mlp:
            out.append(Site(n + "mlp.out", f"{bp}.{lay.mlp}", slot=0, layer=i, kind="mlp.out", meta=dict(flat)))
        terms: tuple[tuple[str, float], ...] | None = None
        mixer = None if lay.attn else first_attr(blk, MIXERS)
        if mixer:  # state-space blocks (Mamba, Mamba 2): resid_post = resid_pre + mixer(norm(resid_pre))
            out.append(Site(n + "mixer.out", f"{bp}.{mixer}", slot=0, layer=i, kind="mixer.out"))
            terms = ((n + "resid_pre", 1.0), (n + "mixer.out", 1.0))
        if lay.attn and lay.mlp:
            terms = ((n + "resid_pre", 1.0), (n + "attn.out", w), (n + "mlp.out", w)) if lay.parallel else \
                ((n + "resid_mid", 1.0), (n + "mlp.out", w)) if lay.mid else None
        normed = {"norm": f"{bp}.{lay.post_norm}"} if lay.post_norm else {}
        out.append(Site(n + "resid_post", bp, slot=0, layer=i, kind="resid_post",
                        meta={"sum": terms, **normed} if terms else {}))
    return out


class HFCausalLMAdapter(Adapter):
    family = "hf_lm"

    def __init__(self, model: nn.Module, tokenizer=None):
        super().__init__(model, tokenizer)
        blocks = find_blocks(model)
        if blocks is None:
            raise UnsupportedModelError(f"no transformer block list found in {type(model).__name__} "
                                        f"(looked for {', '.join(BLOCK_LISTS)}); attach(model, family='generic') "
                                        "gives raw module:... sites")
        self.blocks: str = blocks
        self.n_layers = len(cast(nn.ModuleList, model.get_submodule(self.blocks)))
        self.n_heads = _cfg(model, "num_attention_heads", "n_head")
        kv = _cfg(model, "num_key_value_heads", "num_kv_heads")
        self.n_kv = kv if kv is not None else (1 if _cfg(model, "multi_query", default=False) else self.n_heads)
        self.embed = first_attr(model, EMBEDS)
        self.final = first_attr(model, FINAL_NORMS)
        self.head = first_attr(model, HEADS)
        self.project_out = first_attr(model, ("model.decoder.project_out",))  # OPT-350m: final width -> head width
        self.parallel = bool(_cfg(model, *PARALLEL_FLAGS, default=False))
        self.residual_scale = float(_cfg(model, "residual_multiplier", default=1.0))
        self.block_paths = [f"{self.blocks}.{i}" for i in range(self.n_layers)]
        self._table: SiteTable | None = None

    def site_table(self) -> SiteTable:
        if self._table is None:
            sites = []
            if self.embed:
                sites.append(Site("embed", self.embed, layer=-1, kind="embed"))
            sites += block_sites(self.model, self.blocks, self.n_heads, self.n_kv, parallel=self.parallel,
                                 residual_scale=self.residual_scale)
            if self.final:
                sites.append(Site("final", self.final, layer=self.n_layers, kind="final"))
            if self.head:
                sites.append(Site("logits", self.head, axes=("batch", "pos", "vocab"), layer=self.n_layers,
                                  kind="logits", meta={"of": "final" if self.final else None,
                                                       "via": self.project_out}))
            self._table = SiteTable(sites, module_names=module_paths(self.model), block_paths=self.block_paths,
                                    missing=self._missing(sites))
        return self._table

    def _missing(self, sites: list[Site]) -> dict[str, str]:
        """Canonical names this model lacks -> what was looked for and which raw path serves instead."""
        have = {s.name for s in sites}
        out = {}
        for i in range(self.n_layers):
            bp, n = f"{self.blocks}.{i}", f"blocks.{i}."
            blk = self.model.get_submodule(bp)
            kids = ", ".join(f"module:{bp}.{c}" for c, _ in blk.named_children()) or "(none)"
            looked = {"attn.out": f"an attention module ({', '.join(ATTNS)})",
                      "attn.z": f"an attention output projection ({', '.join(O_PROJS)})",
                      "mlp.out": f"an MLP module ({', '.join(MLPS)}) or fc2",
                      "resid_mid": f"a norm between attention and MLP ({', '.join(MID_NORMS)}) in a sequential block",
                      "attn.q": "a query projection (q_proj, query)", "attn.k": "a key projection (k_proj, key)",
                      "attn.v": "a value projection (v_proj, value)"}
            lay = block_layout(blk, self.parallel)
            for short, what in looked.items():
                if n + short in have:
                    continue
                if lay.attn is None and first_attr(blk, MIXERS):
                    out[n + short] = (f"{bp} is a state-space block ({type(blk).__name__}): it has no attention or "
                                      f"MLP, so no {short} site; its sites are {n}resid_pre, {n}mixer.out and "
                                      f"{n}resid_post, and its submodules serve as raw sites: {kids}")
                elif lay.parallel and short == "resid_mid":
                    out[n + short] = (f"{bp} is a parallel block (attention and MLP both read resid_pre and are "
                                      "added together), so no residual stream exists between them; use "
                                      f"{n}resid_pre, {n}attn.out and {n}mlp.out (raw sites: {kids})")
                else:
                    out[n + short] = (f"{bp} ({type(blk).__name__}) has no {short} site: interp looked for {what} "
                                      f"and did not find one (fused or absent in this family). Its submodules "
                                      f"serve as raw sites: {kids}")
        for name, what, names in (("embed", "token embedding", EMBEDS), ("final", "final norm", FINAL_NORMS)):
            if name not in have:
                out[name] = (f"{type(self.model).__name__} has no {name!r} site: interp looked for a {what} at "
                             f"{', '.join(names)} and found none; use a raw module:... path "
                             "(`interp sites MODEL --modules` lists them)")
        return out

    def finish_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """What the model does to its head's output before returning it (scales, soft-capping)."""
        scale = getattr(self.model, "logit_scale", None)  # Cohere
        if isinstance(scale, (int, float)) and not isinstance(scale, bool):
            logits = logits * scale
        div = _cfg(self.model, "logits_scaling")  # Granite
        if div and div != 1:
            logits = logits / div
        cap = _cfg(self.model, "final_logit_softcapping")
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits

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
        if self.project_out:
            hidden = self.model.get_submodule(self.project_out)(hidden)
        logits = self.model.get_submodule(self.head)(hidden)
        return self._to_output_device(self.finish_logits(logits))

    def tail_columns(self, hidden: torch.Tensor, columns) -> torch.Tensor | None:
        """Logits of the given vocabulary columns only ([..., len(columns)]): final norm, then only those
        rows of the unembedding. None when the head is not a plain Linear (then callers use `tail`)."""
        head = self.model.get_submodule(self.head)
        if type(head) is not nn.Linear or head._forward_hooks or head._forward_pre_hooks or self.project_out:
            return None  # anything hooked on the head must see the full logits
        if self.final:
            hidden = self.model.get_submodule(self.final)(hidden)
        idx = torch.as_tensor(columns, device=head.weight.device)
        # a per-row product and sum: each logit's rounding is the same whatever the batch (a matmul
        # picks kernels by shape), so a grid split over processes or chunks gives bitwise equal values
        logits = (hidden.to(head.weight.device)[..., None, :] * head.weight.index_select(0, idx)).sum(-1)
        if head.bias is not None:
            logits = logits + head.bias.index_select(0, idx)
        return self._to_output_device(self.finish_logits(logits))

    def _to_output_device(self, logits: torch.Tensor) -> torch.Tensor:
        from ..sharding import output_device

        dev = output_device(self.model)  # accelerate: a full forward returns on the input device; replays must too
        return logits if dev is None else logits.to(dev)


def is_causal_lm(model: nn.Module) -> bool:
    return find_blocks(model) is not None and first_attr(model, HEADS) is not None
