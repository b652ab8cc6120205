"""Editing facts in language models: ROME, MEMIT and AlphaEdit on MLP down-projections (one solver),
CounterFact-style evaluation, and edits folded into stock HF checkpoints.

    from interventions.editing import Fact, edit
    e = edit(lm, [Fact("The Eiffel Tower is located in the city of", "Eiffel Tower", " Rome")], "rome", layers=[4])
    e.apply(lm.model)          # or interventions.checkpoint.write_checkpoint(lm.model, "out/", e)
"""
from __future__ import annotations

from .layers import EditError, Projection, down_proj, out_proj
from .solver import (
                     METHODS,
                     Fact,
                     SolverConfig,
                     Targets,
                     ValueConfig,
                     compute_keys,
                     compute_targets,
                     current_outputs,
                     edit,
                     null_space,
                     optimise_values,
                     prefixes,
                     solve_update,
)
from .stats import KeyStats, key_stats, model_fingerprint, read_texts

__all__ = ["Fact", "edit", "METHODS", "SolverConfig", "ValueConfig", "Targets", "compute_keys", "compute_targets",
           "current_outputs", "optimise_values", "prefixes", "solve_update", "null_space", "KeyStats", "key_stats",
           "model_fingerprint", "read_texts", "EditError", "Projection", "down_proj", "out_proj"]
