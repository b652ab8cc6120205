"""The project-trained zoo models: where their weights live, their metrics, and loading.

Weights live in ``interp/zoo/weights/<name>/`` beside a ``metrics.json`` written by
``interp zoo-train`` (recipes/zoo_train.py) and a ``sha256.json`` of their files. Everything loads offline from
those folders, after checking the files (complete safetensors, recorded hashes) and that every loaded
parameter is finite.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from interp.errors import InterpError
from interp.io import atomic_write_text, check_files, check_finite_parameters, check_safetensors_in

WEIGHTS_DIR = Path(__file__).parent / "weights"
FILES_MANIFEST = "sha256.json"  # {"files": {relative path: sha256}} of a saved zoo model, checked before loading
MANIFEST_SKIP = (FILES_MANIFEST, "metrics.json", "train_state.safetensors", "train_state.pt")


class ZooFolderError(InterpError, FileNotFoundError):
    """A zoo model's weights folder is missing (not a network problem: everything loads offline)."""

ENTRIES: dict[str, dict[str, str]] = {
    "shapes-diffusion": {
        "kind": "text-to-image diffusion (StableDiffusionPipeline)",
        "description": "32x32 coloured shapes; UNet2DConditionModel + 3-layer CLIPTextModel, DDPM-trained, "
        "DDIM sampling, pixel space through an identity AutoencoderKL.",
    },
    "shapes-flow": {
        "kind": "text-to-image flow matching (StableDiffusion3Pipeline)",
        "description": "32x32 coloured shapes; SD3Transformer2DModel + two small CLIPTextModelWithProjection, "
        "rectified flow, FlowMatchEulerDiscreteScheduler, pixel space through an identity AutoencoderKL.",
    },
    "physics": {
        "kind": "PDE surrogate (torch transformer)",
        "description": "1D advection-diffusion u_t + c u_x = kappa u_xx on 64 periodic points; "
        "4-block transformer, one step of dt=0.02, conditioned on (kappa, velocity).",
    },
}


def weights_path(name: str) -> Path:
    return WEIGHTS_DIR / name


def read_metrics(path: Path) -> dict[str, Any]:
    f = Path(path) / "metrics.json"
    return json.loads(f.read_text()) if f.exists() else {}


def list_trained() -> list[dict[str, Any]]:
    """Every trained zoo model whose weights are present: name, kind, path, metrics, description."""
    out = []
    for name, entry in ENTRIES.items():
        path = weights_path(name)
        if not (path / "metrics.json").exists():
            continue
        out.append({"name": name, "kind": entry["kind"], "path": str(path),
                    "metrics": read_metrics(path), "description": entry["description"]})
    return out


def _save_as_stock(pipe, save_directory, **kwargs) -> None:
    """save_pretrained of the stock diffusers class a zoo pipeline subclasses, whose name model_index.json
    then carries, so that the folder loads with `DiffusionPipeline.from_pretrained` and plain diffusers
    (no interp import) too."""
    stock: Any = type(pipe).__mro__[1]  # the stock diffusers pipeline class
    stock.save_pretrained(pipe, save_directory, **kwargs)
    index = Path(save_directory) / "model_index.json"
    cfg = json.loads(index.read_text())
    if cfg.get("_class_name") != stock.__name__:
        cfg["_class_name"] = stock.__name__
        atomic_write_text(index, json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def _flow_pipeline_class():
    from diffusers import StableDiffusion3Pipeline

    class ShapesFlowPipeline(StableDiffusion3Pipeline):
        """StableDiffusion3Pipeline without a T5 encoder and without its zero padding tokens.

        The stock pipeline fills the missing T5 stream with ``max_sequence_length`` (256) zero
        tokens. The shapes-flow model was trained with the CLIP tokens only, so here the T5 part
        is empty (0 tokens) whatever ``max_sequence_length`` says. Everything else is the stock
        pipeline (same components, same call signature, same outputs).
        """

        def save_pretrained(self, save_directory, **kwargs):
            _save_as_stock(self, save_directory, **kwargs)

        # the components (text_encoder*, transformer) are registered at run time by DiffusionPipeline, and mypy
        # does not resolve StableDiffusion3Pipeline's members through diffusers' lazy imports: hence the ignores
        def _get_t5_prompt_embeds(self, prompt=None, num_images_per_prompt: int = 1, max_sequence_length: int = 256,
                                  device=None, dtype=None):
            if self.text_encoder_3 is not None:  # type: ignore[attr-defined]
                return super()._get_t5_prompt_embeds(  # type: ignore[misc]
                    prompt, num_images_per_prompt, max_sequence_length, device, dtype)
            device = device or self._execution_device  # type: ignore[attr-defined]
            dtype = dtype or self.text_encoder.dtype  # type: ignore[attr-defined]
            batch = 1 if isinstance(prompt, str) else len(prompt)
            width = self.transformer.config.joint_attention_dim  # type: ignore[attr-defined]
            return torch.zeros((batch * num_images_per_prompt, 0, width), device=device, dtype=dtype)

    ShapesFlowPipeline.__module__ = __name__
    ShapesFlowPipeline.__qualname__ = "ShapesFlowPipeline"
    return ShapesFlowPipeline


# shapes-diffusion is sampled without classifier-free guidance by default: with this x0-predicting
# pixel-space UNet, guidance > 1 extrapolates the predicted image out of the data (at 1.5 and 25 DDIM
# steps the shapes land on the wrong side; see docs/ZOO.md), while guidance 1 follows every attribute
DIFFUSION_GUIDANCE = 1.0


def _diffusion_pipeline_class():
    from diffusers import StableDiffusionPipeline

    class ShapesDiffusionPipeline(StableDiffusionPipeline):
        """StableDiffusionPipeline whose default ``guidance_scale`` is ``DIFFUSION_GUIDANCE`` (1.0: no
        classifier-free guidance) instead of 7.5. Everything else is the stock pipeline; an explicit
        ``guidance_scale`` is used as given. The saved folder names the stock class, which loads it too
        (then pass ``guidance_scale=1.0``)."""

        plain_call_kwargs = {"guidance_scale": DIFFUSION_GUIDANCE}  # how the stock class reproduces this one

        def save_pretrained(self, save_directory, **kwargs):
            _save_as_stock(self, save_directory, **kwargs)

        def __call__(self, *args, **kwargs):
            if len(args) < 7:  # guidance_scale is the 7th positional parameter of the stock __call__
                kwargs.setdefault("guidance_scale", DIFFUSION_GUIDANCE)
            return super().__call__(*args, **kwargs)

    ShapesDiffusionPipeline.__module__ = __name__
    ShapesDiffusionPipeline.__qualname__ = "ShapesDiffusionPipeline"
    return ShapesDiffusionPipeline


_CLASSES: dict[str, Any] = {}


def flow_pipeline_class():
    """The ``ShapesFlowPipeline`` class (a ``StableDiffusion3Pipeline`` subclass), built once."""
    if "flow" not in _CLASSES:
        _CLASSES["flow"] = _flow_pipeline_class()
    return _CLASSES["flow"]


def diffusion_pipeline_class():
    """The ``ShapesDiffusionPipeline`` class (a ``StableDiffusionPipeline`` subclass), built once."""
    if "diffusion" not in _CLASSES:
        _CLASSES["diffusion"] = _diffusion_pipeline_class()
    return _CLASSES["diffusion"]


def _quiet_load(fn, *args, **kw):
    from diffusers.utils import logging as dlog

    level = dlog.get_verbosity()
    dlog.set_verbosity_error()
    try:
        return fn(*args, **kw)
    finally:
        dlog.set_verbosity(level)


def load_trained(name: str, device: str = "cpu", path: str | Path | None = None, **kw: Any) -> Any:
    """Load a trained zoo model offline.

    ``shapes-diffusion`` -> ``diffusers.StableDiffusionPipeline`` (DDIM scheduler);
    ``shapes-flow`` -> ``ShapesFlowPipeline`` (a ``StableDiffusion3Pipeline``);
    ``physics`` -> ``interp.zoo.physics.PhysicsSurrogate`` (eval mode).
    ``path`` overrides the weights folder (e.g. a fresh training run). Extra keywords go to
    ``from_pretrained``.
    """
    if name not in ENTRIES:
        raise KeyError(f"unknown trained zoo model {name!r}; choose one of {list(ENTRIES)}")
    path = Path(path) if path is not None else weights_path(name)
    verify_weights(name, path)
    if name == "physics":
        from .physics import PhysicsSurrogate

        model = PhysicsSurrogate.from_pretrained(path, device=device)
        check_finite_parameters({"": model}, path)
        return model
    if name == "shapes-diffusion":
        pipe = _quiet_load(diffusion_pipeline_class().from_pretrained, str(path), safety_checker=None,
                           requires_safety_checker=False, local_files_only=True, **kw)
    else:
        kw.setdefault("text_encoder_3", None)
        kw.setdefault("tokenizer_3", None)
        pipe = _quiet_load(flow_pipeline_class().from_pretrained, str(path), local_files_only=True, **kw)
    pipe.set_progress_bar_config(disable=True)
    check_finite_parameters({k: m for k, m in pipe.components.items() if isinstance(m, torch.nn.Module)}, path)
    return pipe.to(device)


def verify_weights(name: str, path: Path) -> None:
    """Before loading: the folder exists (named as missing, not as a network failure), every safetensors file is
    complete (a truncated one is named) and, where the folder has a sha256.json, every file has its bytes."""
    if not path.is_dir():
        raise ZooFolderError(f"no weights folder for {name!r} at {path} (everything loads offline; nothing was "
                             f"downloaded): train them with `interp zoo-train {name} --out {path}`")
    check_safetensors_in(path)
    man = path / FILES_MANIFEST
    if man.is_file():
        check_files(path, json.loads(man.read_text())["files"], what=f"zoo model {name!r} at {path}")
