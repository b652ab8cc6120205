"""Model names on the command line -> loaded objects: zoo names, local folders, hub names."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from interp.errors import OfflineModelError


def zoo_names() -> list[str]:
    from interp.zoo import available

    try:
        return [e["name"] for e in available()]
    except Exception:  # a zoo entry that cannot be described still leaves the others usable
        return ["smollm2"]


def load(spec: str, device: str = "cpu") -> Any:
    """'smollm2' / another zoo name, a local HF or diffusers folder, or a hub name (needs the network)."""
    from interp import zoo

    if spec in zoo.LANGUAGE_MODELS or spec in zoo_names():
        return zoo.load(spec)
    path = Path(spec)
    if path.exists():
        return _from_folder(str(path))
    try:
        return _from_folder(spec)
    except OSError as e:
        raise OfflineModelError(
            f"could not load {spec!r} from a local folder or the model hub ({type(e).__name__}: {str(e)[:200]}). "
            f"This machine may be offline: use a zoo model ({', '.join(zoo_names())}) or a local folder "
            "saved with save_pretrained.") from e


def _from_folder(name: str) -> Any:
    if os.path.exists(os.path.join(name, "model_index.json")):
        import diffusers

        return diffusers.DiffusionPipeline.from_pretrained(name)
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    cfg = AutoConfig.from_pretrained(name)
    arch = (getattr(cfg, "architectures", None) or [""])[0]
    cls = AutoModelForCausalLM if "CausalLM" in arch or "LMHead" in arch else AutoModel
    model = cls.from_pretrained(name).eval()
    try:
        model.tokenizer = AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError):
        model.tokenizer = None
    return model
