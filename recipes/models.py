"""Model names on the command line -> loaded objects: zoo names, local folders, hub names.

`load(spec, device=..., dtype=..., device_map=...)` honours the placement; `interp COMMAND --device cuda
--dtype bfloat16` sets the defaults for every `load` of that command (`placement(...)`), so a recipe that
calls `load(args.model)` gets the command line's device without passing it on.
"""
from __future__ import annotations

import contextlib
import contextvars
import difflib
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

from interp.errors import InterpError, OfflineModelError

DTYPES = ("float32", "float16", "bfloat16", "float64")
_PLACEMENT: contextvars.ContextVar[Mapping[str, Any]] = contextvars.ContextVar(
    "interp_cli_placement", default=MappingProxyType({}))


class ModelNotFoundError(InterpError, FileNotFoundError):
    """A model name that is neither a zoo name, an existing folder nor (plausibly) a hub name."""


@contextlib.contextmanager
def placement(device: str | None = None, dtype: str | None = None, device_map: str | None = None) -> Iterator[None]:
    """Defaults for every `load` inside the block (set by the CLI from --device / --dtype / --device-map)."""
    token = _PLACEMENT.set({k: v for k, v in {"device": device, "dtype": dtype, "device_map": device_map}.items()
                            if v is not None})
    try:
        yield
    finally:
        _PLACEMENT.reset(token)


def zoo_names() -> list[str]:
    from interp.zoo import available

    try:
        return [e["name"] for e in available()]
    except Exception:  # noqa: BLE001  a zoo entry that cannot be described still leaves the others usable
        return ["smollm2"]


def torch_dtype(name: str | None):
    """'bfloat16' -> torch.bfloat16 (None stays None); an unknown name is a one-line error."""
    import torch

    if name is None:
        return None
    if name not in DTYPES:
        raise InterpError(f"--dtype {name!r} is not one of {', '.join(DTYPES)}")
    return getattr(torch, name)


def check_device(device: str) -> str:
    """'cpu', 'cuda', 'cuda:1', 'mps': refuse a device this machine does not have, in one line."""
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise InterpError(f"--device {device!r} is not a torch device; write cpu, cuda, cuda:1 or mps") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InterpError(f"--device {device!r}: this machine has no CUDA device; use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise InterpError(f"--device {device!r}: only {torch.cuda.device_count()} CUDA device(s) here")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise InterpError(f"--device {device!r}: MPS is not available here; use --device cpu")
    return device


def load(spec: str, device: str | None = None, dtype: str | None = None, device_map: str | None = None) -> Any:
    """'smollm2' / another zoo name, a local HF or diffusers folder, or a hub name (needs the network).

    device / dtype / device_map default to the CLI's `placement` (cpu, float32, none)."""
    ctx = _PLACEMENT.get()
    device = check_device(device or ctx.get("device") or "cpu")
    dtype = torch_dtype(dtype or ctx.get("dtype"))
    device_map = device_map or ctx.get("device_map")
    from interp import zoo

    if spec in zoo.LANGUAGE_MODELS or spec in zoo_names():
        return _zoo(spec, device, dtype)
    path = Path(spec).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelNotFoundError(f"--model {spec!r} is a file; give the folder written by save_pretrained")
        return _from_folder(str(path), device, dtype, device_map)
    _refuse_missing_local(spec)
    try:
        return _from_folder(spec, device, dtype, device_map)
    except OSError as e:
        raise OfflineModelError(
            f"could not load {spec!r} from a local folder or the model hub ({type(e).__name__}: {_first_line(e)}). "
            f"{_nearest_zoo(spec)}This machine may be offline: use a zoo model ({', '.join(zoo_names())}) "
            "or a local folder saved with save_pretrained.") from e


def _zoo(name: str, device: str, dtype) -> Any:
    from interp import zoo

    if name in zoo.LANGUAGE_MODELS:
        with quiet_loading():
            return zoo.load(name, dtype=dtype, device=device)
    kw = {"torch_dtype": dtype} if dtype is not None and name != "physics" else {}
    with quiet_loading():
        obj = zoo.load(name, device=device, **kw)
    if dtype is not None and name == "physics":
        obj = obj.to(dtype)
    return obj


def _first_line(e: BaseException, limit: int = 300) -> str:
    """The first line of an error message, whole words (a URL is never cut in the middle)."""
    text = " ".join(str(e).strip().splitlines()[:1]) or type(e).__name__
    if len(text) <= limit:
        return text
    cut = text[:limit].rsplit(" ", 1)[0]
    return cut + " ..."


def _nearest_zoo(spec: str) -> str:
    near = difflib.get_close_matches(spec, zoo_names(), n=1, cutoff=0.6)
    return f"Did you mean the zoo model {near[0]!r}? " if near else ""


def _refuse_missing_local(spec: str) -> None:
    """A name that can only be a local path (./x, /x, ~/x, a\\b, a/b/c, or a/b whose folder a exists) and does
    not exist is reported as a missing folder, not as a hub failure."""
    p = Path(spec).expanduser()
    local = (spec.startswith((".", "/", "~")) or "\\" in spec or spec.count("/") > 1
             or (spec.count("/") == 1 and p.parent.is_dir()))
    if not local:
        return
    parent = p.parent if p.parent.is_dir() else None
    near = difflib.get_close_matches(p.name, os.listdir(parent), n=1) if parent is not None else []
    hint = f"did you mean {str(parent / near[0])!r}? " if near else ""
    where = f"folder {str(parent)!r} has no {p.name!r}" if parent is not None else f"no folder {str(p.parent)!r}"
    raise ModelNotFoundError(f"--model {spec!r}: no such local folder ({where}); {hint}"
                             f"give an existing folder or a zoo name ({', '.join(zoo_names())})")


def _no_torchvision_notice(record) -> bool:
    """Drop transformers' 'X requires torchvision (not installed); falling back to XPil' notices: diffusers
    pipelines import CLIP / SigLIP image processors that interp never uses."""
    return "requires torchvision (not installed)" not in record.getMessage()


@contextlib.contextmanager
def quiet_loading() -> Iterator[None]:
    """No per-file 'Loading weights' bars from transformers / diffusers while a command loads its model, and no
    torchvision fallback notices."""
    import logging

    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    t_on, d_on = tlog.is_progress_bar_enabled(), dlog.is_progress_bar_enabled()
    tlog.disable_progress_bar()
    dlog.disable_progress_bar()
    noisy = logging.getLogger("transformers.utils.import_utils")
    noisy.addFilter(_no_torchvision_notice)
    try:
        yield
    finally:
        noisy.removeFilter(_no_torchvision_notice)
        if t_on:
            tlog.enable_progress_bar()
        if d_on:
            dlog.enable_progress_bar()


def _from_folder(name: str, device: str = "cpu", dtype=None, device_map: str | None = None) -> Any:
    with quiet_loading():
        return _load_folder(name, device, dtype, device_map)


def _load_folder(name: str, device: str, dtype, device_map: str | None) -> Any:
    if os.path.exists(os.path.join(name, "model_index.json")):
        import diffusers

        kw = {"torch_dtype": dtype} if dtype is not None else {}
        if device_map is not None:
            kw["device_map"] = device_map
        pipe = diffusers.DiffusionPipeline.from_pretrained(name, **kw)
        return pipe if device_map is not None else pipe.to(device)
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    cfg = AutoConfig.from_pretrained(name)
    arch = (getattr(cfg, "architectures", None) or [""])[0]
    cls = AutoModelForCausalLM if "CausalLM" in arch or "LMHead" in arch else AutoModel
    kw = {"dtype": dtype} if dtype is not None else {}
    if device_map is not None:
        kw["device_map"] = device_map
    model = cls.from_pretrained(name, **kw).eval()
    if device_map is None:
        model = model.to(device)
    try:
        model.tokenizer = AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError):
        model.tokenizer = None
    return model
