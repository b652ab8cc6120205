"""Erasure on joint-attention (MMDiT) denoisers: SD3 and Flux transformers.

- ``context_leace``: LEACE of "concept present" fitted on the token states entering ``context_embedder`` (the
  text encoders' output, which does not depend on the timestep or the image) and folded into it; and, with
  ``pooled=True``, a LEACE of the same label on the pooled text embedding folded into
  ``time_text_embed.text_embedder.linear_1``. Both linears have a bias, so the fold is exact: the edited layer
  equals the eraser followed by the original layer on every input.
- ``joint_kv``: the closed-form ridge edit (as UCE does on a UNet's to_k / to_v) of every joint block's text-stream
  key and value projections ``add_k_proj`` / ``add_v_proj``: the concept's keys are mapped onto its guides' keys,
  preserve prompts' keys are kept. The inputs of these projections are the modulated text stream, which depends
  on the timestep and (after block 0) on the image, so keys are collected from joint forwards at several noise
  levels on noise images and every block is solved from the unedited model's keys (an approximation the
  context edit does not need: report both).

Each returns an ``Edit`` (``edit.applied(pipe)``; ``interventions.checkpoint.write_checkpoint`` writes it).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn

from .core import Concept, Edit, capture
from .leace import LeaceFitter, fold_weights
from .methods import _prompt_list, _split, _starts, _transformer_inputs, _within_position_eraser, solve_linear

__all__ = ["context_leace", "joint_kv", "joint_erase", "JOINT_METHODS"]

JOINT_METHODS = ("context_leace", "joint_kv", "joint")


def _transformer(pipe) -> nn.Module:
    tr = getattr(pipe, "transformer", None)
    if type(tr).__name__ not in ("SD3Transformer2DModel", "FluxTransformer2DModel"):
        raise ValueError(f"joint-attention erasure needs an SD3 or Flux transformer, not {type(tr).__name__}")
    return tr


def _fold(tr: nn.Module, name: str, eraser, tensors: dict) -> None:
    lin = tr.get_submodule(name)
    W, b, kept = fold_weights(lin.weight.detach(), lin.bias.detach(), eraser, "before")
    if not kept:
        raise ValueError(f"{name} has no bias; the LEACE fold would lose its mean term")
    tensors[f"transformer.{name}.weight"], tensors[f"transformer.{name}.bias"] = W, b


def context_leace(pipe, concept: Concept, pooled: bool = True, tol: float | None = None) -> Edit:
    """LEACE folded into context_embedder (per-position concept offsets, as the UNet's leace "offsets") and into
    the pooled text projection (concept prompts against the preserve prompts)."""
    tr = _transformer(pipe)
    prompts, n_pres = _prompt_list(concept, True, ())
    inputs, keys, tok = _transformer_inputs(pipe, prompts)
    starts = _starts(tok, concept)
    sites = {"context_embedder": "module:context_embedder:input"}
    if pooled:
        sites["time_text_embed.text_embedder.linear_1"] = "module:time_text_embed.text_embedder.linear_1:input"
    got = capture(tr, inputs, list(sites.values()), batch_keys=keys)
    n = len(concept.sources)
    keep = [*range(n), *range(len(prompts) - n_pres, len(prompts))]  # sources and preserve (not the guides)
    tensors, erasers, ranks = {}, {}, []
    x = got[sites["context_embedder"]][keep]
    z = torch.zeros(x.shape[0], x.shape[1], dtype=torch.long)
    for i, p in enumerate(starts):
        z[i, p:] = 1
    p0 = min(starts)
    er = _within_position_eraser(x[:, p0:], z[:, p0:], tol)
    _fold(tr, "context_embedder", er, tensors)
    erasers[sites["context_embedder"]] = er
    ranks.append(er.rank)
    if pooled:
        v = got[sites["time_text_embed.text_embedder.linear_1"]][keep]
        zp = torch.zeros(len(keep), dtype=torch.long)
        zp[:n] = 1
        erp = LeaceFitter(v.shape[-1], 1, tol=tol).update(v, zp).eraser
        _fold(tr, "time_text_embed.text_embedder.linear_1", erp, tensors)
        erasers[sites["time_text_embed.text_embedder.linear_1"]] = erp
        ranks.append(erp.rank)
    return Edit("context_leace", concept.word, tensors, None, [f"transformer.{s}" for s in sites],
                {"eraser_rank": ranks, "n_preserve_prompts": n_pres, "pooled": pooled,
                 **{f"concept_{k}": v for k, v in concept.describe().items() if k != "concept"}}, erasers)


def shapes_renders(prompts: Sequence[str]) -> torch.Tensor:
    """The shapes renderer's image of every caption, in the zoo models' pixel range: [N, 3, H, W] in [-1, 1]; the
    empty prompt (the unconditional branch) gets the empty background."""
    from interp.zoo import shapes

    blank = np.zeros((shapes.RESOLUTION, shapes.RESOLUTION, 3), np.float32)
    return shapes.to_tensor(np.stack([shapes.render(shapes.parse_caption(p)) if p.strip() else blank
                                      for p in prompts]))


def _joint_keys(pipe, prompts: Sequence[str], sigmas: Sequence[float], seed: int,
                blocks: Sequence[int] | None = None, clean: Callable | None = None) -> dict[int, torch.Tensor]:
    """add_k_proj inputs of the joint blocks (default: all) for every prompt at each noise level: {block: [L, N, T, d]}.
    The image input is one shared noise image, or with `clean(prompts) -> [N, C, H, W]` (clean latents of each
    prompt, e.g. shapes_renders) the flow-matching noised latents (1 - s) x0 + s noise."""
    tr = _transformer(pipe)
    if type(tr).__name__ != "SD3Transformer2DModel":
        raise ValueError("joint_kv collects keys from SD3 joint forwards; Flux needs packed image tokens (not done)")
    inputs, keys, _ = _transformer_inputs(pipe, prompts)
    n = len(prompts)
    blocks = _kv_blocks(tr) if blocks is None else list(blocks)
    sites = {i: f"module:transformer_blocks.{i}.attn.add_k_proj:input" for i in blocks}
    out: dict[int, list] = {i: [] for i in blocks}
    gen = torch.Generator().manual_seed(seed)
    cfg = tr.config
    size = cfg.sample_size
    x0 = clean(list(prompts)).to(torch.float32) if clean is not None else None
    if x0 is not None and tuple(x0.shape) != (n, cfg.in_channels, size, size):
        raise ValueError(f"clean(prompts) gave latents of shape {tuple(x0.shape)}; the transformer takes "
                         f"{(n, cfg.in_channels, size, size)}")
    for s in sigmas:
        noise = torch.randn((1, cfg.in_channels, size, size), generator=gen).expand(n, -1, -1, -1)
        lat = noise if x0 is None else (1 - s) * x0 + s * noise
        run = dict(inputs, hidden_states=lat.contiguous(), timestep=torch.full((n,), 1000.0 * s))
        got = capture(tr, run, list(sites.values()), batch_keys=keys)
        for i in blocks:
            out[i].append(got[sites[i]])
    return {i: torch.stack(v) for i, v in out.items()}


def _kv_blocks(tr: nn.Module) -> list[int]:
    return [i for i, b in enumerate(tr.transformer_blocks) if getattr(b.attn, "add_k_proj", None) is not None]


def _solve_block(tr: nn.Module, i: int, x: torch.Tensor, concept: Concept, n_pres: int, starts: list[int],
                 lam: float, tensors: dict, layers: list, preserve_weight: float = 1.0) -> None:
    """Ridge solve of block i's add_k_proj / add_v_proj on its inputs x [L, N, T, d] (all noise levels pooled)."""
    attn = tr.transformer_blocks[i].attn
    src_rows, guide_rows, pres_rows = [], [], []
    for lvl in x:
        src, guide, pres = _split(lvl, concept, n_pres)
        src_rows.append(torch.cat([src[j, p:] for j, p in enumerate(starts)]))
        guide_rows.append(torch.cat([guide[j, p:] for j, p in enumerate(starts)]))
        if n_pres:
            pres_rows.append(pres.reshape(-1, pres.shape[-1]))
    k, g = torch.cat(src_rows), torch.cat(guide_rows)
    p = torch.cat(pres_rows) if n_pres else None
    for proj in ("add_k_proj", "add_v_proj"):
        lin = getattr(attn, proj)
        target = g @ lin.weight.detach().double().T + lin.bias.detach().double()
        W = solve_linear(lin, k, target, p, lam, preserve_weight)
        tensors[f"transformer.transformer_blocks.{i}.attn.{proj}.weight"] = W
        layers.append(f"transformer.transformer_blocks.{i}.attn.{proj}")


def joint_kv(pipe, concept: Concept, lam: float = 0.5, sigmas: Sequence[float] = (0.25, 0.5, 0.75, 1.0),
             preserve: bool = True, seed: int = 0, pooled: bool = True, sequential: bool = False,
             preserve_weight: float = 1.0, clean: Callable | None = None) -> Edit:
    """Ridge edit of every joint block's add_k_proj / add_v_proj: the source prompts' text keys (from the
    concept token on, at every noise level) are mapped to the mean of their guides' outputs; with pooled=True
    the same solve on the pooled text projection (time_text_embed.text_embedder.linear_1), the other path by
    which the prompt reaches the image (through the adaLN modulation of every block).

    sequential=True solves block by block on the keys of the model with the earlier blocks already edited (an
    add_v edit in block i also changes the text stream that blocks i+1.. read). On shapes-flow it changed nothing
    measurable (red rate 0.88 with noise keys either way) and fits about 4x slower, so the default is False.
    clean= gives the images the keys are taken from: keys after the first block depend on the image, and with
    noise images they miss the late, low-noise steps where colour is decided; recipes/erase_joint.py passes
    shapes_renders (each caption's own render, noised to each level)."""
    tr = _transformer(pipe)
    prompts, n_pres = _prompt_list(concept, preserve)
    _, _, tok = _transformer_inputs(pipe, prompts[:1])
    starts = _starts(tok, concept)
    tensors: dict[str, torch.Tensor] = {}
    layers: list[str] = []
    if sequential:  # each block's keys from the model with the blocks before it already edited
        for i in _kv_blocks(tr):
            current = Edit("joint_kv", concept.word, dict(tensors)).applied(pipe) if tensors else pipe
            x = _joint_keys(current, prompts, sigmas, seed, [i], clean)[i]
            _solve_block(tr, i, x, concept, n_pres, starts, lam, tensors, layers, preserve_weight)
    else:
        for i, x in _joint_keys(pipe, prompts, sigmas, seed, clean=clean).items():
            _solve_block(tr, i, x, concept, n_pres, starts, lam, tensors, layers, preserve_weight)
    if pooled:
        name = "time_text_embed.text_embedder.linear_1"
        inputs, bkeys, _ = _transformer_inputs(pipe, prompts)
        x = capture(tr, inputs, [f"module:{name}:input"], batch_keys=bkeys)[f"module:{name}:input"]
        src, guide, pres = _split(x, concept, n_pres)
        lin = tr.get_submodule(name)
        target = guide @ lin.weight.detach().double().T + lin.bias.detach().double()
        tensors[f"transformer.{name}.weight"] = solve_linear(lin, src, target, pres if n_pres else None, lam)
        layers.append(f"transformer.{name}")
    return Edit("joint_kv", concept.word, tensors, lam, layers,
                {"sigmas": list(sigmas), "preserve": preserve, "pooled": pooled, "sequential": sequential,
                 "n_preserve_prompts": n_pres,
                 **{f"concept_{k}": v for k, v in concept.describe().items() if k != "concept"}})


def joint_erase(pipe, concept: Concept, lam: float = 0.5, sigmas: Sequence[float] = (0.5, 1.0),
                preserve: bool = True, seed: int = 0) -> Edit:
    """Both edits in sequence: the context LEACE fold (token states only), then the add_k / add_v ridge solved
    on the folded model's keys (so the second edit sees the first). Returns one Edit with every tensor."""
    first = context_leace(pipe, concept, pooled=False)
    folded = first.applied(pipe)
    second = joint_kv(folded, concept, lam=lam, sigmas=sigmas, preserve=preserve, seed=seed, pooled=False)
    return Edit("joint", concept.word, {**first.tensors, **second.tensors}, lam, [*first.layers, *second.layers],
                {"eraser_rank": first.info["eraser_rank"], "sigmas": list(sigmas), "preserve": preserve,
                 "n_preserve_prompts": second.info["n_preserve_prompts"],
                 **{f"concept_{k}": v for k, v in concept.describe().items() if k != "concept"}}, first.erasers)
