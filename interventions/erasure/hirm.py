"""HiRM-style erasure: fine-tune only the first text-encoder block.

loss = ||h_L(x_forget) - target||^2 + alpha ||h_L(x_retain) - h_L0(x_retain)||^2 over token states of the
final layer (what the denoiser sees). target="guide": the original model's final states of the guide
prompts at the same positions (a super-category / sibling direction); target="random": c u with a fixed
random unit vector u and c the mean norm of the forget states.
"""
from __future__ import annotations

import copy

import torch
from tqdm.auto import tqdm

import interp

from .core import Concept, Edit, tokenize_like_pipeline
from .methods import _device, _prompt_list, _rows, _split, _starts, text_encoder_path


def hirm(pipe, concept: Concept, steps: int = 200, lr: float = 1e-3, alpha: float = 1.0, target: str = "guide",
         block: str = "encoder.layers.0", seed: int = 0, progress: bool = False) -> Edit:
    """Returns an Edit holding the fine-tuned parameters of `block` (the pipeline itself is not changed)."""
    if target not in ("guide", "random"):
        raise ValueError(f"target must be 'guide' or 'random', not {target!r}")
    te = copy.deepcopy(pipe.text_encoder)
    te.requires_grad_(False)
    block = text_encoder_path(te, block)
    blk = te.get_submodule(block)
    blk.requires_grad_(True)
    prompts, n_pres = _prompt_list(concept, True)
    starts = _starts(pipe.tokenizer, concept)
    ids = tokenize_like_pipeline(pipe.tokenizer, prompts).to(_device(pipe))
    lm = interp.attach(te)
    with torch.no_grad():
        h0 = lm.run(ids).logits.detach()          # last_hidden_state of the original encoder
    src0, guide0, pres0 = _split(h0, concept, n_pres)
    n = len(concept.sources)
    forget_ids, retain_ids = ids[:n], ids[len(prompts) - n_pres:]
    if target == "guide":
        goal = _rows(guide0, starts).float()
    else:
        g = torch.Generator().manual_seed(seed)
        u = torch.randn(h0.shape[-1], generator=g).to(h0.device)
        rows = _rows(src0, starts)
        goal = (u / u.norm() * rows.norm(dim=-1).mean()).expand_as(rows).float()
    retain_goal = pres0.float()
    opt = torch.optim.Adam(blk.parameters(), lr=lr)  # the loop draws no random numbers (eval mode, no dropout)
    history = []
    te.train(False)
    for _ in tqdm(range(steps), desc="hirm", disable=not progress, leave=False):
        h_f = lm.run(forget_ids, grad=True).logits
        loss_f = ((_rows(h_f, starts) - goal) ** 2).sum(-1).mean()
        loss_r = torch.zeros((), device=h0.device)
        if n_pres:
            h_r = lm.run(retain_ids, grad=True).logits
            loss_r = ((h_r - retain_goal) ** 2).sum(-1).mean()
        loss = loss_f + alpha * loss_r
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        history.append((float(loss_f.detach()), float(loss_r.detach())))
    tensors = {f"text_encoder.{block}.{k}": v.detach().clone() for k, v in blk.named_parameters()}
    return Edit("hirm", concept.word, tensors, None, [f"text_encoder.{block}"],
                {"steps": steps, "lr": lr, "alpha": alpha, "target": target, "seed": seed,
                 "forget_loss": [history[0][0], history[-1][0]] if history else None,
                 "retain_loss": [history[0][1], history[-1][1]] if history else None,
                 "n_preserve_prompts": n_pres,
                 **{f"concept_{k}": v for k, v in concept.describe().items() if k != "concept"}})
