"""diffusers diffusion transformers: SD3Transformer2DModel (MMDiT) and FluxTransformer2DModel.

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

from typing import Any

from torch import nn

from ..sites import Site
from .unet import HEADS, SEQ, TEXT, VEC, DenoiserAdapter, _Namer


def is_dit(obj: Any) -> bool:
    return isinstance(obj, nn.Module) and type(obj).__name__ in ("SD3Transformer2DModel", "FluxTransformer2DModel")


def _streams(nm: _Namer, name: str, path: str, slots: dict[str, int], kind: str, io: str = "output",
             arg_names: dict[str, str] | None = None, bare: bool = False) -> None:
    for stream, slot in slots.items():
        nm.add(f"{name}.{stream}", path, SEQ, f"{kind}.{stream}", io=io, slot=slot,
               arg_name=(arg_names or {}).get(stream), meta={"stream": stream})
    if bare:
        nm.add(name, path, SEQ, kind, io=io, slot=slots["img"],
               meta={"streams": {s: nm.prefix + f"{name}.{s}" for s in slots}})


def dit_sites(model: nn.Module, prefix: str = "transformer.", module_prefix: str = "") -> list[Site]:
    """Every site of an SD3 or Flux transformer in forward order (see the module docstring)."""
    nm = _Namer(prefix, module_prefix)
    nm.add("context", "", TEXT, "context", io="input", slot=1, arg_name="encoder_hidden_states",
           meta={"token_axis": True})
    nm.add("embed", "pos_embed" if type(model).__name__ == "SD3Transformer2DModel" else "x_embedder", SEQ, "embed")
    nm.add("time_embed", "time_text_embed", VEC, "time_embed")
    nm.add("context_embed", "context_embedder", TEXT, "context_embed", meta={"token_axis": True})
    txt_in = {"img": "hidden_states", "txt": "encoder_hidden_states"}
    for i, blk in enumerate(model.transformer_blocks):
        bp, bn = f"transformer_blocks.{i}", f"blocks.{i}"
        both = not getattr(blk, "context_pre_only", False)
        slots = {"img": 0, "txt": 1}
        _streams(nm, f"{bn}.resid_pre", bp, slots, "resid_pre", io="input", arg_names=txt_in)
        _streams(nm, f"{bn}.attn", f"{bp}.attn", slots if both else {"img": 0}, "attn")
        heads = blk.attn.heads
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
