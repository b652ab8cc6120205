"""Sparse dictionaries (SAEs, transcoders) and lenses on interp's engine.

    from probes.dictionaries import DictConfig, train, splice, load
    sae, log = train(DictConfig(d_in=576, d_sae=4608, kind="topk", k=32, site="blocks.15.resid_post"), store)
    out = lm.run(ids, ops=[splice(sae, "blocks.15.resid_post", error=True)])      # forward unchanged
"""
from .formats import load, load_saelens, load_sparsify, load_sparsify_release, save
from .sae import KINDS, DictConfig, Dictionary, DictionaryError
from .train import TrainConfig, Trainer, TrainLog, planted, recovery, train

__all__ = ["DictConfig", "Dictionary", "DictionaryError", "KINDS", "TrainConfig", "Trainer", "TrainLog", "train",
           "planted", "recovery", "save", "load", "load_saelens", "load_sparsify", "load_sparsify_release"]
