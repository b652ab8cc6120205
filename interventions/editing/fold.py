"""Folding run-time interventions of a language model into its weights, where that is exact.

A LEACE eraser at the output of a linear layer (`blocks.i.mlp.out` = the MLP's down-projection output,
`blocks.i.attn.out` = the attention output projection's output) becomes new weights of that layer:
W' = (I - LR) W, b' = (I - LR) b + LR mu. The eraser's constant term needs a bias: on a bias-free layer
(Llama) the fold is refused unless allow_mean_shift=True (the erasure guarantee still holds, outputs differ
from the run-time eraser by the constant LR mu). Anywhere else (the residual stream, a norm's input or
output) no single linear layer writes the tensor, or a norm stands between: the fold is refused, and
the run-time `interp.Project` op is the way to apply the eraser.
"""
from __future__ import annotations

import torch

from ..erasure.core import Edit
from ..erasure.leace import LeaceEraser, fold_weights
from .layers import EditError, Projection, down_proj, out_proj

FOLDABLE = {"mlp.out": down_proj, "attn.out": out_proj}


def projection_for_site(lm, site: str) -> Projection:
    """The linear layer whose output is exactly the tensor at `site`, or an EditError saying why there is none."""
    s = lm.site(site)
    if s.kind not in FOLDABLE or s.layer is None:
        raise EditError(
            f"cannot fold an eraser at {site!r} ({s.kind or 'raw'} site) into weights exactly: no single linear layer "
            "writes this tensor (the residual stream is a sum of several writers; a norm is not linear, so nothing "
            "folds through it). Fit the eraser at 'blocks.N.mlp.out' or 'blocks.N.attn.out', or apply it at run time "
            "with interp.Project(site, eraser)")
    proj = FOLDABLE[s.kind](lm, s.layer)
    if not proj.path.startswith(s.module + "."):
        raise EditError(f"the module at {site!r} ({s.module}) does not contain the projection {proj.path}, so its "
                        "output is not that projection's output; apply the eraser at run time with interp.Project")
    return proj


def fold_eraser_edit(lm, site: str, eraser: LeaceEraser, *, allow_mean_shift: bool = False,
                     concept: str = "") -> Edit:
    """An Edit whose new weights apply `eraser` to the output of the linear layer at `site` (see module doc)."""
    proj = projection_for_site(lm, site)
    mod = proj.module(lm.model)
    bias = getattr(mod, "bias", None)
    if bias is None and not allow_mean_shift:
        raise EditError(
            f"{proj.path} has no bias, so the eraser's constant term (L R mu) cannot be folded into it: the folded "
            "layer would differ from the run-time eraser by a constant vector. Pass allow_mean_shift=True to accept "
            "that (no linear probe can still read the concept), or apply the eraser at run time with interp.Project")
    W = proj.weight(lm.model).detach()
    W2, b2, kept = fold_weights(W, None if bias is None else bias.detach(), eraser, "after")
    tensors = {proj.weight_name: proj.stored(W2)}
    if b2 is not None:
        tensors[proj.bias_name] = b2.contiguous()
    info = {"site": site, "module": proj.path, "eraser_rank": eraser.rank, "exact": bool(kept),
            "note": "exact fold" if kept else "bias-free layer: outputs shift by the constant L R mu"}
    return Edit(method="leace-fold", concept=concept, tensors=tensors, layers=[proj.path], info=info)


def folded_output_error(lm, site: str, eraser: LeaceEraser, edit: Edit, inputs) -> float:
    """max |logits(folded weights) - logits(run-time Project op)| on `inputs` (checks a fold before shipping it)."""
    with torch.no_grad():
        want = lm.run(inputs, ops=[eraser.op(site)]).logits
        saved = {k: lm.model.get_parameter(k).detach().clone() for k in edit.tensors}
        edit.apply(lm.model)
        try:
            got = lm.run(inputs).logits
        finally:
            for k, v in saved.items():
                lm.model.get_parameter(k).copy_(v)
    return float((want - got).abs().max())
