"""Dictionaries on disk: interp's own layout, and readers for the SAELens and sparsify layouts.

interp:   DIR/dictionary.json  {"format": "interp.dictionary/1", "config": DictConfig, "extra": {...}}
          DIR/dictionary.safetensors  W_enc [d_in, d_sae], b_enc, W_dec [d_sae, d_out], b_dec, log_threshold,
                                      threshold, in_scale, out_scale (+ W_skip [d_out, d_in])
SAELens:  DIR/cfg.json (d_in, d_sae, architecture "standard" | "jumprelu" | "topk", k or
          activation_fn_kwargs.k, apply_b_dec_to_input, normalize_activations, hook_name or metadata.hook_name,
          d_out for transcoders) + DIR/sae_weights.safetensors (W_enc [d_in, d_sae], b_enc, W_dec [d_sae, d_out],
          b_dec, threshold [d_sae] for jumprelu).
sparsify: DIR/cfg.json (d_in, num_latents or expansion_factor, k, activation "topk", transcode, skip_connection)
          + DIR/sae.safetensors (encoder.weight [num_latents, d_in], encoder.bias, W_dec [num_latents, d_in],
          b_dec [d_in], W_skip [d_in, d_in]); a release folder holds one such DIR per hookpoint.
Saving goes to a temporary folder, is read back and compared, then renamed into place.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from .sae import DictConfig, Dictionary, DictionaryError

FORMAT = "interp.dictionary/1"
_FIELDS = set(DictConfig.__dataclass_fields__)


def save(sae: Dictionary, path: str | os.PathLike, extra: dict | None = None) -> Path:
    """Write `path/` (interp layout) atomically: a sibling temp folder, verified by loading it back, then renamed."""
    from safetensors.torch import save_file

    from interp.results import jsonable

    dest = Path(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}."))
    try:
        tensors = {k: v.detach().cpu().contiguous() for k, v in sae.state_dict().items()}
        save_file(tensors, str(tmp / "dictionary.safetensors"))
        meta = {"format": FORMAT, "config": sae.cfg.to_json(), "dtype": str(sae.W_enc.dtype).removeprefix("torch."),
                "extra": jsonable(extra or {})}
        (tmp / "dictionary.json").write_text(json.dumps(meta, indent=1))
        back = load(tmp)
        for k, v in back.state_dict().items():
            if not torch.equal(v, tensors[k]):
                raise DictionaryError(f"verification of the saved dictionary failed at {k!r}; nothing was replaced")
        old = None
        if dest.exists():
            old = dest.with_name(f".{dest.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(dest, old)
        os.replace(tmp, dest)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _read(path: Path, name: str) -> dict:
    from safetensors.torch import load_file

    f = path / name
    if not f.exists():
        raise DictionaryError(f"{path} has no {name}")
    return load_file(str(f))


def load(path: str | os.PathLike, device: str = "cpu") -> Dictionary:
    """Load a dictionary in any known layout (interp, SAELens, sparsify), detected from the files."""
    p = Path(path)
    if (p / "dictionary.json").exists():
        meta = json.loads((p / "dictionary.json").read_text())
        if meta.get("format") != FORMAT:
            raise DictionaryError(f"{p}/dictionary.json has format {meta.get('format')!r}, not {FORMAT!r}")
        cfg = DictConfig(**{k: v for k, v in meta["config"].items() if k in _FIELDS})
        sae = Dictionary(cfg, dtype=getattr(torch, meta.get("dtype", "float32")))
        sae.load_state_dict(_read(p, "dictionary.safetensors"))
        sae.extra = meta.get("extra", {})
        return sae.to(device).eval()
    if (p / "sae_weights.safetensors").exists():
        return load_saelens(p, device)
    if (p / "sae.safetensors").exists():
        return load_sparsify(p, device)
    raise DictionaryError(f"{p} holds no dictionary: expected dictionary.json (interp), cfg.json + "
                          "sae_weights.safetensors (SAELens) or cfg.json + sae.safetensors (sparsify)")


def _set(sae: Dictionary, **tensors: torch.Tensor) -> None:
    with torch.no_grad():
        for k, v in tensors.items():
            param = getattr(sae, k)
            if tuple(param.shape) != tuple(v.shape):
                raise DictionaryError(f"tensor {k!r} has shape {tuple(v.shape)}, the config implies "
                                      f"{tuple(param.shape)}")
            param.copy_(v.to(param.dtype))


def load_saelens(path: str | os.PathLike, device: str = "cpu") -> Dictionary:
    """A SAELens folder (cfg.json + sae_weights.safetensors), read from the documented layout."""
    p = Path(path)
    cfg = json.loads((p / "cfg.json").read_text())
    arch = cfg.get("architecture", "standard")
    kinds = {"standard": "relu", "jumprelu": "jumprelu", "topk": "topk"}
    if arch not in kinds:
        raise DictionaryError(f"SAELens architecture {arch!r} is not supported; interp reads {sorted(kinds)}")
    norm = cfg.get("normalize_activations") or "none"
    if norm != "none":
        raise DictionaryError(f"SAELens normalize_activations={norm!r} rescales inputs at run time; interp reads "
                              "dictionaries with normalize_activations='none' (fold the scale into W_enc / W_dec "
                              "first)")
    w = _read(p, "sae_weights.safetensors")
    k = cfg.get("k") or (cfg.get("activation_fn_kwargs") or {}).get("k")
    meta = cfg.get("metadata") or {}
    d_out = cfg.get("d_out")
    dc = DictConfig(d_in=int(cfg["d_in"]), d_sae=int(cfg["d_sae"]), kind=kinds[arch], k=None if k is None else int(k),
                    d_out=(None if d_out in (None, cfg["d_in"]) and "hook_name_out" not in cfg
                           else int(d_out or cfg["d_in"])),
                    site=cfg.get("hook_name") or meta.get("hook_name"),
                    out_site=cfg.get("hook_name_out") or meta.get("hook_name_out"),
                    center_input=bool(cfg.get("apply_b_dec_to_input", True)),
                    meta={"source": "saelens", "cfg": cfg})
    sae = Dictionary(dc, dtype=w["W_enc"].dtype)
    _set(sae, W_enc=w["W_enc"], b_enc=w["b_enc"], W_dec=w["W_dec"], b_dec=w["b_dec"])
    if dc.kind == "jumprelu":
        if "threshold" not in w:
            raise DictionaryError(f"{p}: a jumprelu SAELens dictionary needs a 'threshold' tensor")
        _set(sae, log_threshold=w["threshold"].float().clamp_min(1e-30).log())
    return sae.to(device).eval()


def load_sparsify(path: str | os.PathLike, device: str = "cpu") -> Dictionary:
    """A sparsify folder (cfg.json + sae.safetensors), read from the documented layout."""
    p = Path(path)
    cfg = json.loads((p / "cfg.json").read_text())
    if cfg.get("activation", "topk") != "topk":
        raise DictionaryError(f"sparsify activation {cfg.get('activation')!r} is not supported; interp reads 'topk'")
    w = _read(p, "sae.safetensors")
    d_in = int(cfg["d_in"])
    m = int(cfg.get("num_latents") or 0) or d_in * int(cfg["expansion_factor"])
    tc = bool(cfg.get("transcode", False))
    dc = DictConfig(d_in=d_in, d_sae=m, kind="topk", k=int(cfg["k"]), d_out=d_in if tc else None,
                    center_input=not tc, skip=bool(cfg.get("skip_connection", False)) and "W_skip" in w,
                    meta={"source": "sparsify", "cfg": cfg})
    sae = Dictionary(dc, dtype=w["encoder.weight"].dtype)
    _set(sae, W_enc=w["encoder.weight"].T.contiguous(), b_enc=w["encoder.bias"], W_dec=w["W_dec"], b_dec=w["b_dec"])
    if dc.skip:
        _set(sae, W_skip=w["W_skip"])
    return sae.to(device).eval()


def load_sparsify_release(path: str | os.PathLike, device: str = "cpu") -> dict[str, Dictionary]:
    """Every hookpoint folder of a sparsify release: {hookpoint: dictionary}."""
    p = Path(path)
    out = {d.name: load_sparsify(d, device) for d in sorted(p.iterdir()) if (d / "sae.safetensors").exists()}
    if not out:
        raise DictionaryError(f"{p} has no hookpoint folders with cfg.json + sae.safetensors")
    return out


__all__ = ["save", "load", "load_saelens", "load_sparsify", "load_sparsify_release", "FORMAT"]
