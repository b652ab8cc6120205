"""Second-moment statistics C = E[k k^T] of a projection's input keys, from an offline text sample.

Streaming (float64 sums, any batching gives the same C), captured through the engine in one forward per
batch for every requested layer, cached per model fingerprint + layer + text sample under
~/.cache/interp/editing/ as safetensors with a JSON record of which text and how many tokens went in.
Offline text sources: "licenses" (the prose licence texts Debian ships in /usr/share/common-licenses),
a list of strings, or a path to a text file or folder of .txt files.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .layers import EditError, Projection

LICENSES = Path("/usr/share/common-licenses")


def cache_root() -> Path:
    xdg = os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")
    root = os.environ.get("INTERP_CACHE") or os.path.join(xdg, "interp")
    return Path(root) / "editing"


def model_fingerprint(model: torch.nn.Module) -> str:
    """sha256 over every parameter's name, shape and a strided sample of its values (fast, weight-sensitive)."""
    h = hashlib.sha256(type(model).__name__.encode())
    for name, p in model.state_dict().items():
        flat = p.detach().reshape(-1)
        step = max(1, flat.numel() // 2048)
        h.update(f"{name}:{tuple(p.shape)}".encode())
        h.update(flat[::step].float().cpu().numpy().tobytes())
    return h.hexdigest()[:20]


def read_texts(source: str | Sequence[str] | os.PathLike = "licenses") -> tuple[list[str], dict]:
    """Documents of a text source and a record of where they came from (names and sha256 of the files)."""
    if isinstance(source, (list, tuple)):
        docs = [str(t) for t in source]
        digest = hashlib.sha256("\n\x00".join(docs).encode()).hexdigest()[:16]
        return docs, {"source": "strings", "n_docs": len(docs), "sha256": digest}
    path = LICENSES if source == "licenses" else Path(source)
    if not path.exists():
        hint = " (install Debian's base-files, which ships them)" if source == "licenses" else ""
        raise EditError(f"text source {str(path)!r} does not exist{hint}; pass a text file, a folder of .txt files "
                        "or a list of strings as text=")
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.is_file() and not p.is_symlink()
                                                 and (source == "licenses" or p.suffix == ".txt"))
    docs = [f.read_text(errors="replace") for f in files]
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise EditError(f"text source {str(path)!r} holds no text")
    digest = hashlib.sha256(b"".join(f.read_bytes() for f in files)).hexdigest()[:16]
    return docs, {"source": str(path), "files": [f.name for f in files], "sha256": digest}


def chunks(tokenizer, docs: Sequence[str], n_tokens: int, length: int, seed: int) -> list[torch.Tensor]:
    """Token windows of `length` from the documents, shuffled with `seed`, `n_tokens` in total (or all there are)."""
    windows = []
    for d in docs:
        ids = tokenizer(" ".join(d.split()), return_tensors="pt")["input_ids"][0]
        windows += [ids[i:i + length] for i in range(0, len(ids) - length + 1, length)]
    if not windows:
        raise EditError(f"the text sample has fewer than {length} tokens; give a longer text")
    random.Random(seed).shuffle(windows)
    return windows[:max(1, -(-n_tokens // length))]


@dataclass
class KeyStats:
    """C = E[k k^T] ([d, d], float64) of one projection's keys, with the record of how it was made."""

    C: torch.Tensor
    n_tokens: int
    record: dict = field(default_factory=dict)
    null_cache: dict = field(default_factory=dict, repr=False)  # AlphaEdit projectors by (threshold, energy)

    def regularised(self, eps: float = 1e-6) -> torch.Tensor:
        """C + eps * mean eigenvalue * I (invertible even from a short text)."""
        d = self.C.shape[0]
        return self.C + eps * (torch.trace(self.C) / d) * torch.eye(d, dtype=self.C.dtype)


def _cache_file(fp: str, proj: Projection, rec: dict, n_tokens: int, length: int, seed: int) -> Path:
    tag = hashlib.sha256(json.dumps([rec.get("sha256"), n_tokens, length, seed]).encode()).hexdigest()[:12]
    return cache_root() / fp / f"{proj.path}-{tag}.safetensors"


def key_stats(lm, projs: Sequence[Projection], text="licenses", n_tokens: int = 20_000, length: int = 64,
              seed: int = 0, batch: int = 16, cache: bool = True, progress: bool = True) -> dict[int, KeyStats]:
    """KeyStats of each projection (keyed by layer), from the cache or one streaming pass over the text."""
    from safetensors.torch import load_file, save_file

    docs, rec = read_texts(text)
    fp = model_fingerprint(lm.model)
    out, todo = {}, []
    for p in projs:
        f = _cache_file(fp, p, rec, n_tokens, length, seed)
        if cache and f.exists():
            t = load_file(str(f))
            meta = json.loads(f.with_suffix(".json").read_text())
            out[p.layer] = KeyStats(t["C"], int(meta["n_tokens"]), {**meta, "cached": True})
        else:
            todo.append(p)
    if not todo:
        return out
    windows = chunks(lm.tokenizer, docs, n_tokens, length, seed)
    sums = {p.layer: None for p in todo}
    seen = 0
    dev = next(lm.model.parameters()).device
    for i in tqdm(range(0, len(windows), batch), desc="key statistics", disable=not progress):
        ids = torch.stack(windows[i:i + batch]).to(dev)
        with torch.no_grad():
            cache_ = lm.run(ids, capture=[p.key_site for p in todo]).cache
        for p in todo:
            k = cache_[p.key_site].reshape(-1, cache_[p.key_site].shape[-1]).double().cpu()
            sums[p.layer] = k.T @ k if sums[p.layer] is None else sums[p.layer] + k.T @ k
        seen += ids.numel()
    for p in todo:
        meta = {**rec, "n_tokens": seen, "window": length, "seed": seed, "layer": p.layer, "module": p.path,
                "model_fingerprint": fp}
        st = KeyStats(sums[p.layer] / seen, seen, meta)
        if cache:
            f = _cache_file(fp, p, rec, n_tokens, length, seed)
            f.parent.mkdir(parents=True, exist_ok=True)
            tmp = f.with_name(f".{f.name}.tmp-{os.getpid()}")
            save_file({"C": st.C.contiguous()}, str(tmp))
            f.with_suffix(".json").write_text(json.dumps(meta, indent=1))
            os.replace(tmp, f)
        out[p.layer] = st
    return out


__all__ = ["KeyStats", "key_stats", "read_texts", "model_fingerprint", "cache_root", "LICENSES"]
