"""diffusers diffusion transformers: SD3Transformer2DModel (MMDiT), FluxTransformer2DModel, and the others
by module names (PixArt, Sana, HunyuanDiT, AuraFlow, Lumina 2, CogVideoX, Wan, LTX-Video: see
generic_dit_sites).

Site grammar (text stream `txt`, image stream `img`):

  transformer.context                  encoder_hidden_states input: the text conditioning [batch, token, d_text]
  transformer.embed                    image patch embedding (SD3 pos_embed / Flux x_embedder) [batch, pos, d]
  transformer.context_embed            context_embedder output (text tokens in model width) [batch, token, d]
  transformer.time_embed               time (+ pooled text, + Flux guidance) embedding [batch, d]
  transformer.blocks.{i}.img / .txt    joint (double-stream) block i output, per stream
  transformer.blocks.{i}               the same block; pick the stream with where=at(stream="img"|"txt")
                                       (without stream= it is the img stream)
  transformer.blocks.{i}.resid_pre.img / .txt   block inputs
  transformer.blocks.{i}.attn.img / .txt        joint attention output per stream (before gating)
  transformer.blocks.{i}.attn.z.img / .txt      per-head attention output before the output projections
  transformer.blocks.{i}.ff.img / .txt          feed-forward outputs (before gating)
  transformer.single.{j}.img / .txt    Flux single-stream block j output, split back into streams
  transformer.single.{j}               the same block (stream= as above)
  transformer.single.{j}.attn          single-stream attention output over [txt; img] tokens
  transformer.final                    norm_out output [batch, pos, d]
  transformer.out                      proj_out output: the velocity / noise prediction in patch tokens

SD3's last block updates only the image stream (context_pre_only), so it has no `.txt` sites.
"""
from __future__ import annotations

import inspect
from typing import Any, cast

from torch import nn

from ..sites import Site
from .base import has_submodule as _has
from .unet import HEADS, SEQ, TEXT, TEXT_HEADS, VEC, DenoiserAdapter, _Namer

MMDIT = ("SD3Transformer2DModel", "FluxTransformer2DModel")
# the other diffusers transformers: block lists probed by name (module docstring of generic_dit_sites)
BLOCK_LISTS = ("noise_refiner", "context_refiner", "transformer_blocks", "joint_transformer_blocks",
               "single_transformer_blocks", "blocks", "layers")
BLOCK_NAMES = {"transformer_blocks": "blocks", "blocks": "blocks", "layers": "blocks",
               "joint_transformer_blocks": "joint", "single_transformer_blocks": "single"}
# blocks returning (a, b): which slot is which stream
TUPLE_STREAMS = {"AuraFlowJointTransformerBlock": {"img": 1, "txt": 0},
                 "CogVideoXBlock": {"img": 0, "txt": 1}}
EMBEDS = ("pos_embed", "patch_embed", "x_embedder", "patch_embedding", "proj_in")
TIME_EMBEDS = ("adaln_single", "time_embed", "time_extra_emb", "time_embedding", "condition_embedder",
               "time_caption_embed", "time_step_embed")
CONTEXT_EMBEDS = ("caption_projection", "context_embedder")  # not HunyuanDiT text_embedder: it runs on [batch*token, d]
ATTNS = ("attn1", "attn", "attention")
FFS = ("ff", "ffn", "feed_forward")


def _block_lists(model: nn.Module) -> list[str]:
    return [n for n in BLOCK_LISTS if isinstance(getattr(model, n, None), nn.ModuleList) and len(getattr(model, n))]


def is_dit(obj: Any) -> bool:
    """SD3 / Flux (MMDiT), or another diffusers transformer with a block list and an output projection."""
    if not isinstance(obj, nn.Module):
        return False
    if type(obj).__name__ in MMDIT:
        return True
    name = type(obj).__name__
    return type(obj).__module__.startswith("diffusers.") and ("Transformer" in name or "DiT" in name) \
        and bool(_block_lists(obj)) and (hasattr(obj, "proj_out") or hasattr(obj, "norm_out"))


def _streams(nm: _Namer, name: str, path: str, slots: dict[str, int], kind: str, io: str = "output",
             arg_names: dict[str, str] | None = None, bare: bool = False) -> None:
    for stream, slot in slots.items():
        nm.add(f"{name}.{stream}", path, SEQ, f"{kind}.{stream}", io=io, slot=slot,
               arg_name=(arg_names or {}).get(stream), meta={"stream": stream})
    if bare:
        nm.add(name, path, SEQ, kind, io=io, slot=slots["img"],
               meta={"streams": {s: nm.prefix + f"{name}.{s}" for s in slots}})


def _first(m: nn.Module, names) -> str | None:
    return next((n for n in names if _has(m, n)), None)


def _dit_block(nm: _Namer, bn: str, bp: str, blk: nn.Module) -> None:
    nm.add(f"{bn}.resid_pre", bp, SEQ, "resid_pre", io="input", slot=0, arg_name="hidden_states")
    attn = _first(blk, ATTNS)
    if attn:
        a = blk.get_submodule(attn)
        nm.add(f"{bn}.attn.out", f"{bp}.{attn}", SEQ, "attn.out")
        out = _first(a, ("to_out.0", "to_out", "out"))
        if out and getattr(a, "heads", None):
            nm.add(f"{bn}.attn.z", f"{bp}.{attn}.{out}", HEADS, "attn.z", io="input", slot=0, arg_name="input",
                   heads=a.heads)
    if _has(blk, "attn2"):
        a2 = blk.get_submodule("attn2")
        nm.add(f"{bn}.cross.out", f"{bp}.attn2", SEQ, "cross.out")
        for q in ("k", "v"):
            if _has(a2, f"to_{q}") and getattr(a2, "heads", None):
                nm.add(f"{bn}.cross.{q}", f"{bp}.attn2.to_{q}", TEXT_HEADS, f"cross.{q}", heads=a2.heads,
                       meta={"token_axis": True})
    ff = _first(blk, FFS)
    if ff:
        nm.add(f"{bn}.ff.out", f"{bp}.{ff}", SEQ, "ff.out")
    streams = TUPLE_STREAMS.get(type(blk).__name__)
    if streams:
        _streams(nm, bn, bp, streams, "block", bare=True)
    else:
        nm.add(bn, bp, SEQ, "block", slot=0)


def generic_dit_sites(model: nn.Module, prefix: str = "transformer.", module_prefix: str = "") -> list[Site]:
    """Sites of a diffusers transformer other than SD3 / Flux (PixArt, Sana, HunyuanDiT, AuraFlow, Lumina 2,
    CogVideoX, Wan, LTX-Video, ...), found by module names:

      transformer.context / .embed / .time_embed / .context_embed       as for SD3 / Flux
      transformer.blocks.{i}[.resid_pre|.attn.out|.attn.z|.cross.out|.cross.k|.cross.v|.ff.out]
      transformer.joint.{i}, transformer.single.{i}                     AuraFlow's two block lists
      transformer.noise_refiner.{i}, transformer.context_refiner.{i}    Lumina 2's refiner blocks
      transformer.final (norm_out), transformer.out (proj_out)
    Blocks returning (img, txt) tuples get `.img` / `.txt` sites (and stream= on the bare name)."""
    nm = _Namer(prefix, module_prefix)
    params = [p for p in inspect.signature(model.forward).parameters if p != "self"]
    if "encoder_hidden_states" in params:
        nm.add("context", "", TEXT, "context", io="input", slot=params.index("encoder_hidden_states"),
               arg_name="encoder_hidden_states", meta={"token_axis": True})
    for name, names, axes in (("embed", EMBEDS, SEQ), ("time_embed", TIME_EMBEDS, VEC),
                              ("context_embed", CONTEXT_EMBEDS, TEXT)):
        path = _first(model, names)
        if path:
            nm.add(name, path, axes, name, meta={"token_axis": True} if axes is TEXT else {})
    for lst in _block_lists(model):
        for i, blk in enumerate(getattr(model, lst)):
            _dit_block(nm, f"{BLOCK_NAMES.get(lst, lst)}.{i}", f"{lst}.{i}", blk)
    if _has(model, "norm_out"):
        nm.add("final", "norm_out", SEQ, "final")
    if _has(model, "proj_out"):
        nm.add("out", "proj_out", SEQ, "out")
    return nm.sites


def dit_sites(model: nn.Module, prefix: str = "transformer.", module_prefix: str = "") -> list[Site]:
    """Every site of a diffusers transformer in forward order (see the module docstring)."""
    if type(model).__name__ not in MMDIT:
        return generic_dit_sites(model, prefix, module_prefix)
    nm = _Namer(prefix, module_prefix)
    nm.add("context", "", TEXT, "context", io="input", slot=1, arg_name="encoder_hidden_states",
           meta={"token_axis": True})
    nm.add("embed", "pos_embed" if type(model).__name__ == "SD3Transformer2DModel" else "x_embedder", SEQ, "embed")
    nm.add("time_embed", "time_text_embed", VEC, "time_embed")
    nm.add("context_embed", "context_embedder", TEXT, "context_embed", meta={"token_axis": True})
    txt_in = {"img": "hidden_states", "txt": "encoder_hidden_states"}
    for i, blk in enumerate(cast(nn.ModuleList, model.transformer_blocks)):
        bp, bn = f"transformer_blocks.{i}", f"blocks.{i}"
        both = not getattr(blk, "context_pre_only", False)
        slots = {"img": 0, "txt": 1}
        _streams(nm, f"{bn}.resid_pre", bp, slots, "resid_pre", io="input", arg_names=txt_in)
        _streams(nm, f"{bn}.attn", f"{bp}.attn", slots if both else {"img": 0}, "attn")
        attn: Any = blk.attn  # a diffusers Attention; heads is a plain int attribute
        heads = attn.heads
        nm.add(f"{bn}.attn.z.img", f"{bp}.attn.to_out.0", HEADS, "attn.z.img", io="input", slot=0,
               arg_name="input", heads=heads, meta={"stream": "img"})
        if both and getattr(blk.attn, "to_add_out", None) is not None:
            nm.add(f"{bn}.attn.z.txt", f"{bp}.attn.to_add_out", HEADS, "attn.z.txt", io="input", slot=0,
                   arg_name="input", heads=heads, meta={"stream": "txt"})
        nm.add(f"{bn}.ff.img", f"{bp}.ff", SEQ, "ff.img", meta={"stream": "img"})
        if both and getattr(blk, "ff_context", None) is not None:
            nm.add(f"{bn}.ff.txt", f"{bp}.ff_context", SEQ, "ff.txt", meta={"stream": "txt"})
        _streams(nm, bn, bp, {"img": 1, "txt": 0} if both else {"img": 1}, "block", bare=True)
    for j, _ in enumerate(getattr(model, "single_transformer_blocks", []) or []):
        bp, bn = f"single_transformer_blocks.{j}", f"single.{j}"
        nm.add(f"{bn}.attn", f"{bp}.attn", SEQ, "single.attn")
        _streams(nm, bn, bp, {"img": 1, "txt": 0}, "single", bare=True)
    nm.add("final", "norm_out", SEQ, "final")
    nm.add("out", "proj_out", SEQ, "out")
    return nm.sites


class DiTAdapter(DenoiserAdapter):
    family = "dit"
    site_fn = staticmethod(dit_sites)
    prefix = "transformer."
