"""Concept erasure: LEACE (streaming fit, Project op, folding), the closed-form ridge editor (Diff-QuickFix,
TIME, UCE, LocoEdit, SD3 / Flux context_embedder), HiRM fine-tuning; written to checkpoints by
interventions.checkpoint.

    from interventions.erasure import Concept, erase
    concept = Concept.from_prompts("red", prompts, guide_words=["yellow", "green", "blue"])
    edit = erase(pipe, concept, "uce")        # an Edit: new weights of the edited layers
    edit.apply(pipe)                          # or interventions.checkpoint.write_checkpoint(...)
"""
from __future__ import annotations

from .baselines import OracleLeace, QuadraticLeace, heldout_probe, inlp, rlace  # noqa: F401 (baselines)
from .core import Concept, Edit, capture, edit_start, tokenize_like_pipeline
from .hirm import hirm
from .leace import (
    ErasureGuaranteeError,
    ErasureInputError,
    LeaceEraser,
    LeaceFitter,
    fit_at_site,
    fold_eraser,
    fold_weights,
)
from .methods import (
    DEFAULT_LAM,
    METHODS,
    choose_window,
    context_edit,
    cross_attention_edit,
    cross_attention_layers,
    leace_edit,
    locoedit,
    quickfix,
    select_layers,
    time_edit,
    uce,
)
from .ridge import ridge_objective, ridge_solve


def erase(pipe, concept: Concept, method: str, **kw) -> Edit:
    """Dispatch to one method by name (see METHODS); keyword arguments go to it."""
    fns = {"uce": uce, "time": time_edit, "locoedit": locoedit, "quickfix": quickfix, "context": context_edit,
           "leace": leace_edit, "hirm": hirm}
    if method not in fns:
        raise ValueError(f"unknown erasure method {method!r}; choose one of {list(fns)}")
    if method == "locoedit" and "layers" not in kw:
        raise ValueError("locoedit needs layers= (a window of cross-attention layer indices); pick one with "
                         "choose_window(pipe, concept, window, score)")
    return fns[method](pipe, concept, **kw)


__all__ = ["ErasureGuaranteeError", "ErasureInputError",
           "LeaceEraser", "LeaceFitter", "fit_at_site", "fold_eraser", "fold_weights", "ridge_solve", "ridge_objective",
           "Concept", "Edit", "capture", "edit_start", "tokenize_like_pipeline", "erase", "METHODS", "DEFAULT_LAM",
           "uce", "time_edit", "locoedit", "choose_window", "quickfix", "context_edit", "leace_edit", "hirm",
           "cross_attention_edit", "cross_attention_layers", "select_layers"]
