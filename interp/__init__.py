"""interp: causal interpretability through one hook engine.

    import interp
    lm = interp.attach(model)                   # HF, TransformerLens, nnsight, diffusers, any nn.Module
    clean = lm.run("The Eiffel Tower is in", capture="blocks.*.resid_pre")
    patch = interp.Patch("blocks.3.resid_pre", clean.cache["blocks.3.resid_pre"], where=interp.at(pos=4))
    out = lm.run(corrupted, ops=[patch])
"""
from . import zoo
from .attach import Instrumented, attach
from .engine import GridOutput, RunContext, RunOutput
from .errors import (
                     InterpError,
                     OfflineModelError,
                     OpNeverFiredError,
                     PositionError,
                     SiteShapeError,
                     SpecError,
                     UnknownSiteError,
                     UnsupportedModelError,
)
from .hooks import hook_count
from .ops import ALL, Ablate, Add, Noise, Op, Patch, Positions, Project, Replace, Steps, Subject, Tokens, Where, at
from .results import Result, image_grid
from .sites import Site

__version__ = "0.1.0"

__all__ = [
    "attach", "Instrumented", "RunOutput", "GridOutput", "RunContext", "Result", "image_grid", "Site",
    "Op", "Patch", "Add", "Ablate", "Noise", "Project", "Replace", "Where", "Tokens", "Subject", "at", "ALL",
    "Positions", "Steps", "SpecError", "InterpError", "UnknownSiteError", "SiteShapeError", "PositionError",
    "OpNeverFiredError", "UnsupportedModelError", "OfflineModelError", "hook_count", "zoo",
]
