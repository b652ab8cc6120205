"""nnsight-wrapped models: interp attaches to the module nnsight wraps, so the same sites and ops apply."""
from __future__ import annotations

from typing import Any


def is_nnsight(obj: Any) -> bool:
    return type(obj).__module__.startswith("nnsight")


def unwrap(obj: Any):
    """(underlying torch module, tokenizer or None) of an nnsight NNsight / LanguageModel."""
    module = object.__getattribute__(obj, "_module") if hasattr(obj, "_module") else obj._model
    tok = None
    try:
        tok = obj.tokenizer
    except Exception:  # plain NNsight has no tokenizer attribute
        tok = None
    return module, tok
