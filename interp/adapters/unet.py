"""diffusers UNet2DConditionModel (SD 1.x / 2.x / SDXL), UNet2DModel (DDPM-style, no text) and what every
denoiser adapter shares.

Site grammar (the same names whether the UNet is attached alone or inside a pipeline):

  unet.conv_in                      conv_in output                       [batch, channel, height, width]
  unet.time_embed                   time_embedding output                [batch, d]
  unet.add_embed                    SDXL added conditioning (pooled text + size/crop ids) embedding [batch, d]
  unet.context                      encoder_hidden_states input: the text conditioning [batch, token, d_text]
  unet.down.{i}                     down block i output (hidden states, without the skip tuple)
  unet.down.{i}.resnet.{j}          ResnetBlock2D j output               [batch, channel, height, width]
  unet.down.{i}.attn.{j}            Transformer2DModel j output (spatial map, residual included)
  unet.down.{i}.attn.{j}.self.out   self-attention (attn1) output        [batch, pos, d] (pos = height*width)
  unet.down.{i}.attn.{j}.self.z     attn1 per-head output before to_out  [batch, pos, head, d_head]
  unet.down.{i}.attn.{j}.cross.out  cross-attention (attn2) output       [batch, pos, d]
  unet.down.{i}.attn.{j}.cross.z    attn2 per-head output before to_out
  unet.down.{i}.attn.{j}.cross.k/v  attn2 key / value projections of the text [batch, token, head, d_head]
  unet.down.{i}.attn.{j}.ff.out     feed-forward output                  [batch, pos, d]
  unet.down.{i}.downsample          downsampler output
  unet.mid, unet.mid.resnet.{j}, unet.mid.attn.{j}[...]      the mid block ("h-space")
  unet.up.{i}, unet.up.{i}.resnet.{j}, unet.up.{i}.attn.{j}[...], unet.up.{i}.upsample
  unet.out                          conv_out output: the noise (or v) prediction

When a Transformer2DModel holds several transformer blocks (SDXL: 2 or 10), the per-block sites carry
the block index: `unet.down.2.attn.0.block.3.cross.out`; with one block (SD 1.x/2.x) it is omitted.
Positions (`where=at(pos=...)`) index axis 1 of each site's own tensor: channels for conv maps,
spatial tokens for attention sites, text tokens for `context` / `cross.k` / `cross.v`.
"""
from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, cast

import torch
from torch import nn

from ..sites import Site, SiteTable
from .base import Adapter, Prepared, module_paths

MAP = ("batch", "channel", "height", "width")
SEQ = ("batch", "pos", "d_model")
HEADS = ("batch", "pos", "head", "d_head")
TEXT = ("batch", "token", "d_model")
TEXT_HEADS = ("batch", "token", "head", "d_head")
VEC = ("batch", "d_model")

# denoiser call arguments that carry the batch axis (the others, e.g. Flux's img_ids, do not)
BATCHED = ("sample", "hidden_states", "timestep", "encoder_hidden_states", "pooled_projections", "guidance",
           "encoder_attention_mask", "timestep_cond", "class_labels", "added_cond_kwargs")


def is_unet(obj: Any) -> bool:
    return isinstance(obj, nn.Module) and type(obj).__name__ in ("UNet2DConditionModel", "UNet2DModel")


class _Namer:
    """Builds sites with a name prefix, a module prefix and a running forward-order index."""

    def __init__(self, prefix: str, module_prefix: str):
        self.prefix, self.module_prefix, self.order = prefix, module_prefix, 0
        self.sites: list[Site] = []

    def path(self, p: str) -> str:
        return (self.module_prefix + p) if p else self.module_prefix.rstrip(".")

    def add(self, name: str, module: str, axes=SEQ, kind: str = "", **kw) -> Site:
        meta = kw.pop("meta", {})
        s = Site(self.prefix + name, self.path(module), axes=axes, layer=self.order, kind=kind,
                 meta={"component": self.prefix.rstrip("."), **meta}, **kw)
        self.order += 1
        self.sites.append(s)
        return s


def _attention_sites(nm: _Namer, name: str, path: str, attn: nn.Module, what: str) -> None:
    heads = getattr(attn, "heads", None)
    nm.add(f"{name}.{what}.out", path, SEQ, f"{what}.out")
    if heads and hasattr(attn, "to_out"):
        nm.add(f"{name}.{what}.z", f"{path}.to_out.0", HEADS, f"{what}.z", io="input", slot=0, arg_name="input",
               heads=heads)
    if what == "cross" and heads:
        for q in ("k", "v"):
            nm.add(f"{name}.cross.{q}", f"{path}.to_{q}", TEXT_HEADS, f"cross.{q}", heads=heads,
                   meta={"token_axis": True})


def _transformer2d_sites(nm: _Namer, name: str, path: str, t2d: nn.Module) -> None:
    if hasattr(t2d, "to_q") and not hasattr(t2d, "transformer_blocks"):  # UNet2DModel: a bare Attention on the map
        heads = getattr(t2d, "heads", None)
        if heads and hasattr(t2d, "to_out"):
            nm.add(f"{name}.self.z", f"{path}.to_out.0", HEADS, "self.z", io="input", slot=0, arg_name="input",
                   heads=heads)
        nm.add(name, path, MAP, "attn", slot=0)  # its output: the map with the residual added back
        return
    blocks = getattr(t2d, "transformer_blocks", [])
    for k, blk in enumerate(blocks):
        bn = name if len(blocks) == 1 else f"{name}.block.{k}"
        bp = f"{path}.transformer_blocks.{k}"
        if getattr(blk, "attn1", None) is not None:
            kind1 = "cross" if getattr(blk, "only_cross_attention", False) else "self"
            _attention_sites(nm, bn, f"{bp}.attn1", blk.attn1, kind1)
        if getattr(blk, "attn2", None) is not None:
            _attention_sites(nm, bn, f"{bp}.attn2", blk.attn2, "cross" if blk.attn2.is_cross_attention else "self2")
        if getattr(blk, "ff", None) is not None:
            nm.add(f"{bn}.ff.out", f"{bp}.ff", SEQ, "ff.out")
    nm.add(name, path, MAP, "attn", slot=0)


def _block_sites(nm: _Namer, name: str, path: str, block: nn.Module, sampler: str | None) -> None:
    resnets = list(getattr(block, "resnets", []))
    attns = list(getattr(block, "attentions", []) or [])
    if type(block).__name__.startswith("UNetMidBlock") and attns:  # mid: resnet 0, then (attn j, resnet j+1)
        nm.add(f"{name}.resnet.0", f"{path}.resnets.0", MAP, "resnet")
        for j, a in enumerate(attns):
            _transformer2d_sites(nm, f"{name}.attn.{j}", f"{path}.attentions.{j}", a)
            nm.add(f"{name}.resnet.{j + 1}", f"{path}.resnets.{j + 1}", MAP, "resnet")
    else:
        for j in range(len(resnets)):
            nm.add(f"{name}.resnet.{j}", f"{path}.resnets.{j}", MAP, "resnet")
            if j < len(attns):
                _transformer2d_sites(nm, f"{name}.attn.{j}", f"{path}.attentions.{j}", attns[j])
    if sampler and getattr(block, f"{sampler}rs", None):
        for k in range(len(getattr(block, f"{sampler}rs"))):
            nm.add(f"{name}.{sampler}" + (f".{k}" if k else ""), f"{path}.{sampler}rs.{k}", MAP, sampler)
    nm.add(name, path, MAP, "block", slot=0)


def unet_sites(unet: nn.Module, prefix: str = "unet.", module_prefix: str = "") -> list[Site]:
    """Every site of a UNet2DConditionModel in forward order (see the module docstring)."""
    nm = _Namer(prefix, module_prefix)
    if "encoder_hidden_states" in inspect.signature(unet.forward).parameters:  # UNet2DModel has no text input
        nm.add("context", "", TEXT, "context", io="input", slot=2, arg_name="encoder_hidden_states",
               meta={"token_axis": True})
    nm.add("conv_in", "conv_in", MAP, "conv_in")
    nm.add("time_embed", "time_embedding", VEC, "time_embed")
    if getattr(unet, "add_embedding", None) is not None:
        nm.add("add_embed", "add_embedding", VEC, "add_embed")
    for i, blk in enumerate(cast(nn.ModuleList, unet.down_blocks)):
        _block_sites(nm, f"down.{i}", f"down_blocks.{i}", blk, "downsample")
    if unet.mid_block is not None:
        _block_sites(nm, "mid", "mid_block", cast(nn.Module, unet.mid_block), None)
    for i, blk in enumerate(cast(nn.ModuleList, unet.up_blocks)):
        _block_sites(nm, f"up.{i}", f"up_blocks.{i}", blk, "upsample")
    nm.add("out", "conv_out", MAP, "out")
    return nm.sites


# ---------------------------------------------------------------------------------------------
# a denoiser attached on its own
# ---------------------------------------------------------------------------------------------

class DenoiserPrepared(Prepared):
    """Keyword inputs of one denoiser call; every site resolves positions on its own tensor."""

    def site_view(self, site: Site):
        return [None]

    def repeat(self, n: int) -> DenoiserPrepared:
        if n == 1:
            return self
        kw = {k: (_repeat(v, self.batch, n) if k in BATCHED else v) for k, v in self.kwargs.items()}
        return DenoiserPrepared(kw, self.batch * n, self.seq_len, self.tokens * n)


def _repeat(v, b: int, n: int):
    if isinstance(v, torch.Tensor):
        return v.repeat(n, *([1] * (v.dim() - 1))) if v.dim() > 0 and v.shape[0] == b else v
    if isinstance(v, dict):
        return {k: _repeat(x, b, n) for k, x in v.items()}
    return v


def denoiser_kwargs(model: nn.Module, args: tuple, kwargs: dict) -> dict:
    """A denoiser call's positional + keyword arguments as keywords (return_dict dropped)."""
    bound = inspect.signature(model.forward).bind_partial(*args, **kwargs)
    out = dict(bound.arguments)
    extra = out.pop("kwargs", None)
    if isinstance(extra, dict):
        out.update(extra)
    out.pop("return_dict", None)
    return out


class DenoiserAdapter(Adapter):
    """Shared by the UNet and DiT adapters: inputs are the denoiser's call arguments (a dict, or a tuple
    of positional arguments); the main output is the prediction (`.sample`)."""

    site_fn: Callable[..., list[Site]] = staticmethod(unet_sites)
    prefix = "unet."

    def __init__(self, model: nn.Module, tokenizer=None):
        super().__init__(model, tokenizer)
        self._table: SiteTable | None = None

    def site_table(self) -> SiteTable:
        if self._table is None:
            self._table = SiteTable(self.site_fn(self.model, self.prefix), module_names=module_paths(self.model))
        return self._table

    def prepare(self, inputs: Any, pad: bool = False) -> Prepared:
        if isinstance(inputs, Prepared):
            return inputs
        if isinstance(inputs, tuple):
            kw = denoiser_kwargs(self.model, inputs, {})
        elif isinstance(inputs, dict):
            kw = denoiser_kwargs(self.model, (), dict(inputs))
        else:
            raise TypeError(f"a {type(self.model).__name__} takes its call arguments as a dict (sample/hidden_states, "
                            f"timestep, encoder_hidden_states, ...) or a tuple, not {type(inputs).__name__}")
        x = kw.get("sample", kw.get("hidden_states"))
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"the inputs of {type(self.model).__name__} need the noisy latents as 'sample' / "
                            "'hidden_states'")
        ctx = kw.get("encoder_hidden_states")
        return DenoiserPrepared(kw, x.shape[0], ctx.shape[1] if isinstance(ctx, torch.Tensor) else None)

    def forward(self, prepared: Prepared, last_only: bool = False):
        return self.model(**prepared.kwargs, return_dict=False)[0]

    def describe(self) -> str:
        n_blocks = sum(1 for s in self.site_table() if s.kind == "block")
        return f"{self.family} ({type(self.model).__name__}, {n_blocks} blocks)"


class UNetAdapter(DenoiserAdapter):
    family = "unet"
