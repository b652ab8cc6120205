"""Write an edited model or pipeline as a checkpoint: the transformers / diffusers `save_pretrained` layout
(safetensors) plus `interp_edit.json`, a manifest of the edit (concept, method, layers, lambda, source hash).

The checkpoint is written to a temporary folder beside the destination, reloaded with the library's own
`from_pretrained` and compared tensor by tensor with the in-memory model, and only then renamed into
place. The source folder is never written to unless in_place=True (`--in-place`), and then it is first
renamed to a backup that is kept. Any failure removes the temporary folder, leaves the source as it was
and says so (with the source's hash checked again).
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from interp import io
from interp.errors import InterpError

MANIFEST = "interp_edit.json"
FORMAT = "interp.edit/1"


class CheckpointWriteError(InterpError, RuntimeError):
    """A checkpoint could not be written (or would have overwritten the source); the source is intact."""


def folder_hash(path: str | os.PathLike, skip: tuple[str, ...] = ()) -> str:
    """sha256 over every file of a folder (relative path and bytes, sorted); a file's own sha256."""
    path = Path(path)
    h = hashlib.sha256()
    if path.is_file():
        return file_hash(path)
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        rel = f.relative_to(path).as_posix()
        if rel in skip:
            continue
        h.update(rel.encode() + b"\0" + file_hash(f).encode() + b"\n")
    return h.hexdigest()


def file_hash(path: Path) -> str:
    return io.file_sha256(path)


def is_pipeline(obj: Any) -> bool:
    return hasattr(obj, "components") and hasattr(obj, "save_pretrained") and not isinstance(obj, nn.Module)


def state_tensors(obj: Any) -> dict[str, torch.Tensor]:
    """Every tensor of a model, or of every module component of a pipeline ('component.name')."""
    if is_pipeline(obj):
        return {f"{c}.{k}": v for c, m in obj.components.items() if isinstance(m, nn.Module)
                for k, v in m.state_dict().items()}
    return dict(obj.state_dict())


def reload(obj: Any, folder: str | os.PathLike) -> Any:
    """Load `folder` with the same class as `obj` (diffusers pipeline or model, transformers model)."""
    cls = type(obj)
    if is_pipeline(obj):
        from diffusers.utils import logging as dlog

        level = dlog.get_verbosity()
        dlog.set_verbosity_error()
        try:
            kw = {k: None for k, v in obj.components.items() if v is None}  # e.g. an SD3 pipeline without T5
            if "safety_checker" in obj.components and obj.components["safety_checker"] is None:
                kw["requires_safety_checker"] = False
            return cls.from_pretrained(str(folder), local_files_only=True, **kw)
        finally:
            dlog.set_verbosity(level)
    return cls.from_pretrained(str(folder), local_files_only=True)


def _compare(model: Any, reloaded: Any, edited: dict[str, torch.Tensor] | None) -> None:
    want, got = state_tensors(model), state_tensors(reloaded)
    missing = sorted(set(want) - set(got))
    if missing:
        raise CheckpointWriteError(f"the reloaded checkpoint lacks {len(missing)} tensors (first: {missing[:3]})")
    bad = [k for k, v in want.items() if not torch.equal(v.detach().cpu(), got[k].detach().cpu().to(v.dtype))]
    if bad:
        raise CheckpointWriteError(f"the reloaded checkpoint differs from the model in memory at {len(bad)} tensors "
                                   f"(first: {bad[:3]})")
    for name, value in (edited or {}).items():
        key = _state_key(name, got)
        if key is None:
            raise CheckpointWriteError(f"edited tensor {name!r} is not in the reloaded checkpoint")
        if not torch.equal(got[key].detach().cpu(), value.detach().cpu().to(got[key].dtype)):
            raise CheckpointWriteError(f"edited tensor {name!r} did not survive the round trip through disk")


def _state_key(name: str, tensors: dict) -> str | None:
    if name in tensors:
        return name
    hits = [k for k in tensors if k.endswith(name.split(".", 1)[-1]) and k.split(".")[0] == name.split(".")[0]]
    return hits[0] if len(hits) == 1 else None


def check_destination(dest: str | os.PathLike, source: str | os.PathLike | None = None, *, in_place: bool = False,
                      overwrite: bool = False) -> Path:
    """The resolved destination, or CheckpointWriteError if writing there could lose data.

    Refused: a destination that is the source (unless in_place), lies inside it, or contains it (symlinks
    resolved); an existing destination without overwrite; with overwrite, anything but a folder that
    interp wrote itself (its interp_edit.json present).
    """
    src = Path(source).resolve() if source is not None else None
    dest = src if in_place and src is not None else Path(dest).resolve()
    if in_place and src is None:
        raise CheckpointWriteError("in_place=True needs source= (the folder to replace)")
    if src is not None and not src.exists():
        raise CheckpointWriteError(f"source folder {src} does not exist")
    if src is not None and dest == src and not in_place:
        raise CheckpointWriteError(f"refusing to write over the source checkpoint {src}: choose another output folder, "
                                   "or pass in_place=True (--in-place) to replace it and keep a backup")
    if src is not None and src in dest.parents:
        raise CheckpointWriteError(f"the output folder {dest} lies inside the source checkpoint {src}: "
                                   "choose a folder outside it")
    if src is not None and dest in src.parents:
        raise CheckpointWriteError(f"the output folder {dest} contains the source checkpoint {src}: writing there "
                                   "would replace the source; choose a folder that does not contain it")
    if dest.exists() and not in_place:
        if not overwrite:
            raise CheckpointWriteError(f"{dest} already exists: choose a new folder or pass overwrite=True "
                                       "(--overwrite)")
        if not dest.is_dir() or not (dest / MANIFEST).is_file():
            raise CheckpointWriteError(f"refusing to overwrite {dest}: it is not a checkpoint interp wrote (no "
                                       f"{MANIFEST}); overwrite only replaces interp's own output: choose a new folder")
    return dest


def write_checkpoint(model: Any, dest: str | os.PathLike, edit=None, *, source: str | os.PathLike | None = None,
                     in_place: bool = False, overwrite: bool = False, extra: dict | None = None,
                     verify: Callable[[Any], Any] | None = None) -> Path:
    """Write the (already edited) `model` to `dest` in the save_pretrained layout with a manifest; returns dest.

    edit: the interventions.erasure.Edit that was applied (its tensors are checked after the reload and
    its manifest recorded). source: the folder the model was loaded from (hashed into the manifest, and
    never written to unless in_place=True, in which case dest is the source and a backup
    `<source>.bak-<time>` is kept). verify(reloaded) may raise to reject the written checkpoint.
    One writer per destination: a second process writing the same dest at the same time gets an error.
    """
    dest = check_destination(dest, source, in_place=in_place, overwrite=overwrite)
    src = Path(source).resolve() if source is not None else None
    src_hash = folder_hash(src) if src is not None else None
    try:
        with io.writer_lock(dest):
            io.clean_stale(dest)
            return _write_locked(model, dest, edit, src, src_hash, in_place, overwrite, extra, verify)
    except io.LockedError as e:
        raise CheckpointWriteError(f"{e}; nothing was written") from None


def _write_locked(model, dest: Path, edit, src: Path | None, src_hash: str | None, in_place: bool, overwrite: bool,
                  extra: dict | None, verify) -> Path:
    tmp = io.temp_name(dest)
    stage = "writing"
    try:
        tmp.mkdir()
        model.save_pretrained(str(tmp), safe_serialization=True)
        io.honour_umask(tmp)
        files = {p.relative_to(tmp).as_posix(): file_hash(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
        from interp import __version__

        manifest = {"format": FORMAT, **(edit.manifest() if edit is not None else {}), **(extra or {}),
                    "source": str(src) if src is not None else None, "source_hash": src_hash,
                    "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                    "interp_version": __version__, "files": files}
        io.atomic_write_json(tmp / MANIFEST, manifest)
        stage = "verifying"
        reloaded = reload(model, tmp)
        _compare(model, reloaded, getattr(edit, "tensors", None))
        if verify is not None and verify(reloaded) is False:
            raise CheckpointWriteError("the verify function rejected the reloaded checkpoint")
        del reloaded
        stage = "moving into place"
        if not in_place:  # again, under the lock: another writer may have finished meanwhile
            check_destination(dest, src, overwrite=overwrite)
        _move_into_place(tmp, dest, in_place)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointWriteError(_failure_message(e, stage, dest, src, src_hash)) from e
    return dest


def _move_into_place(tmp: Path, dest: Path, in_place: bool) -> None:
    if not dest.exists():
        os.rename(tmp, dest)  # fails (ENOTEMPTY / EEXIST) rather than replace a folder that appeared meanwhile
        return
    if in_place:  # the source: a visible backup that is kept
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        backup = dest.parent / f"{dest.name}.bak-{stamp}-{uuid.uuid4().hex[:4]}"
    else:  # a previous interp output: a hidden backup (put back by clean_stale if this process dies now)
        backup = io.temp_name(dest, "old")
    os.replace(dest, backup)
    try:
        os.replace(tmp, dest)
    except BaseException:
        os.replace(backup, dest)  # put the original back before reporting
        raise
    if not in_place:
        shutil.rmtree(backup, ignore_errors=True)


def _failure_message(e: BaseException, stage: str, dest: Path, src: Path | None, src_hash: str | None) -> str:
    msg = (f"writing the checkpoint to {dest} failed while {stage} ({type(e).__name__}: {e})"
           f"{io.disk_full_hint(e, dest.parent)}; the temporary folder was removed")
    if src is None:
        return msg + "; no source folder was involved."
    now = folder_hash(src) if src.exists() else None
    if src_hash is not None and now == src_hash:
        return msg + f"; the source {src} is intact (sha256 {src_hash[:16]}... unchanged)."
    return msg + (f"; WARNING: the source {src} no longer matches its hash from before the write "
                  f"(was {str(src_hash)[:16]}..., now {str(now)[:16]}...): restore it from a backup beside it.")


class NotACheckpointError(InterpError, FileNotFoundError):
    """A folder that should hold a checkpoint is missing or was not written by interp."""


def read_manifest(folder: str | os.PathLike) -> dict:
    """The interp_edit.json of a written checkpoint."""
    f = Path(folder) / MANIFEST
    if not f.exists():
        raise NotACheckpointError(f"{folder} has no {MANIFEST}: it was not written by interventions.checkpoint")
    return json.loads(f.read_text())


def verify_files(folder: str | os.PathLike) -> list[str]:
    """Files whose sha256 no longer matches the manifest (empty when the checkpoint is intact)."""
    folder = Path(folder)
    man = read_manifest(folder)
    return [rel for rel, h in man["files"].items() if not (folder / rel).is_file() or file_hash(folder / rel) != h]


def verify_folder(folder: str | os.PathLike) -> Path:
    """Check a model folder before loading it: present (a missing folder is named as such, not as a network
    failure), every safetensors file complete (a truncated one is named), and, if interp wrote it, every file
    matching the sha256 in its manifest. Raises CorruptFileError / NotACheckpointError; returns the folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise NotACheckpointError(f"no model folder at {folder}" + (" (it is a file)" if folder.exists() else "")
                                  + ": check the path")
    io.check_safetensors_in(folder)
    if (folder / MANIFEST).is_file():
        bad = verify_files(folder)
        if bad:
            raise io.CorruptFileError(f"{folder}: {len(bad)} file(s) no longer match the sha256 in its {MANIFEST} "
                                      f"(overwritten, damaged or missing): {bad[:5]}; restore them or write it again")
    return folder


def check_finite(obj: Any, where: str | os.PathLike) -> None:
    """CorruptFileError naming the first parameter of a loaded model / pipeline with NaN or inf values."""
    mods = {c: m for c, m in obj.components.items() if isinstance(m, nn.Module)} if is_pipeline(obj) else {"": obj}
    io.check_finite_parameters(mods, where)


def load_checkpoint(folder: str | os.PathLike, cls: Any = None, **kw: Any) -> Any:
    """Load a checkpoint folder after `verify_folder`, offline, and check its parameters are finite.

    cls: the class to load with (default: diffusers.DiffusionPipeline for a folder with model_index.json,
    else transformers.AutoModelForCausalLM). Keywords go to `from_pretrained`.
    """
    folder = verify_folder(folder)
    if cls is None:
        if (folder / "model_index.json").is_file():
            from diffusers import DiffusionPipeline as cls
        else:
            from transformers import AutoModelForCausalLM as cls
    obj = cls.from_pretrained(str(folder), local_files_only=True, **kw)
    check_finite(obj, folder)
    return obj


_PLAIN_SCRIPT = r"""
import json, sys
import numpy as np, torch
torch.set_num_threads(1)
import diffusers
a = json.loads(sys.argv[1])
kw = {"safety_checker": None, "requires_safety_checker": False} if a["cls"] == "StableDiffusionPipeline" else {}
pipe = getattr(diffusers, a["cls"]).from_pretrained(a["folder"], local_files_only=True, **kw)
pipe.set_progress_bar_config(disable=True)
imgs = pipe(a["prompts"], num_inference_steps=a["steps"], generator=torch.Generator().manual_seed(a["seed"]),
            output_type="np", **a["call"]).images
bad = [m for m in sys.modules if m == "interp" or m.startswith(("interp.", "interventions", "recipes"))]
if bad:
    raise SystemExit(f"interp modules were imported: {bad}")
np.save(a["out"], imgs)
"""


def plain_diffusers_check(pipe: Any, folder: str | os.PathLike, prompts: list[str], seed: int = 0, steps: int = 10,
                          timeout: int = 600) -> dict:
    """Load `folder` in a fresh Python process with plain diffusers (no interp import), generate `prompts`, and
    compare with `pipe` (the edited pipeline in memory) on the same seed: returns the images' max difference.
    A subclass of a diffusers pipeline that declares `plain_call_kwargs` (e.g. the zoo's ShapesDiffusionPipeline:
    the stock StableDiffusionPipeline with guidance_scale=1.0) is checked as that stock class with those kwargs."""
    import subprocess
    import sys
    import tempfile

    import diffusers
    import numpy as np

    call = dict(getattr(pipe, "plain_call_kwargs", None) or {})
    stock = next((c for c in type(pipe).__mro__ if getattr(diffusers, c.__name__, None) is c), None)
    cls = type(pipe).__name__
    if stock is type(pipe) or (stock is not None and getattr(pipe, "plain_call_kwargs", None) is not None):
        cls = stock.__name__
    else:
        return {"checked": False, "why": f"{cls} is not a diffusers class, so plain diffusers cannot load it as such"}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "imgs.npy"
        args = {"cls": cls, "folder": str(folder), "prompts": list(prompts), "seed": seed, "steps": steps,
                "out": str(out), "call": call}
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
        r = subprocess.run([sys.executable, "-c", _PLAIN_SCRIPT, json.dumps(args)], cwd=tmp, env=env,
                           capture_output=True, text=True, timeout=timeout)
        if r.returncode != 0:
            raise CheckpointWriteError(f"plain diffusers could not load or run {folder}: {r.stderr[-1500:]}")
        plain = np.load(out, allow_pickle=False)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        ours = pipe(list(prompts), num_inference_steps=steps, generator=torch.Generator().manual_seed(seed),
                    output_type="np", **call).images
    diff = float(np.abs(plain - ours).max())
    return {"checked": True, "class": cls, "call_kwargs": call, "n_images": len(prompts), "steps": steps,
            "max_abs_diff": diff, "reproduces": diff < 1e-3}


__all__ = ["write_checkpoint", "check_destination", "load_checkpoint", "verify_folder", "check_finite",
           "plain_diffusers_check", "read_manifest", "verify_files", "folder_hash", "CheckpointWriteError",
           "NotACheckpointError", "MANIFEST", "reload"]
