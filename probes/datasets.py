"""Activation datasets: sites captured over many inputs in batches, with labels, in memory or on disk.

    ds = collect(lm, prompts, "blocks.*.resid_post", labels={"country": countries},
                 positions={"subject_last": SubjectOf("last"), "last": -1}, subjects=landmarks,
                 path="acts/landmarks")           # memory-mapped .npy per site; rerun to resume
    X = ds.X("blocks.12.resid_post", "last")     # [N, d_model]

Every site is stored as [N, P, D]: P selected positions (or denoising steps, for a custom
`runner`) and D features (per-head sites are flattened). On disk a folder holds `meta.json`,
one `site_{i}.npy` per site (numpy memory maps) and `progress.json`, which is advanced only
after a batch has been flushed, so an interrupted collection resumes at the first unfinished batch.
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

import interp
from interp.collect import collect_batch
from interp.engine import resolve_positions
from interp.io import atomic_write_text
from interp.io import fingerprint as _io_fingerprint

FORMAT = "interp.activations/1"
_NP = {torch.float32: np.float32, torch.float16: np.float16, torch.float64: np.float64}


@dataclass(frozen=True)
class SubjectOf:
    """The tokens of each item's own subject (from `collect(..., subjects=[...])`): "last", "first" or "mean"."""

    which: str = "last"

    def __post_init__(self):
        if self.which not in ("last", "first", "mean"):
            raise ValueError(f"SubjectOf.which must be 'last', 'first' or 'mean', not {self.which!r}")


class ActivationDataset:
    """Labelled activations: features[site] is [N, P, D]; coords label the P axis (positions or steps)."""

    def __init__(self, features: dict[str, torch.Tensor], labels: dict[str, list], coords: Sequence[Any],
                 axis: str = "pos", meta: dict | None = None, path: Path | None = None):
        self.features = dict(features)
        self.labels = {k: list(v) for k, v in labels.items()}
        self.coords = list(coords)
        self.axis = axis
        self.meta = dict(meta or {})
        self.path = path
        n = {t.shape[0] for t in self.features.values()} | {len(v) for v in self.labels.values()}
        if len(n) > 1:
            raise ValueError(f"sites and labels disagree on the number of examples: {sorted(n)}")

    def __len__(self) -> int:
        return next(iter(self.features.values())).shape[0] if self.features else 0

    def __repr__(self) -> str:
        where = f", at {self.path}" if self.path else ""
        return (f"ActivationDataset({len(self)} examples, {len(self.features)} sites, {self.axis}={self.coords}, "
                f"labels={list(self.labels)}{where})")

    @property
    def sites(self) -> list[str]:
        return list(self.features)

    def _pos_index(self, pos) -> int:
        if pos in self.coords:
            return self.coords.index(pos)
        if isinstance(pos, int) and -len(self.coords) <= pos < len(self.coords):
            return pos % len(self.coords)
        raise KeyError(f"{self.axis} {pos!r} is not in this dataset; it holds {self.coords}")

    def X(self, site: str, pos=None) -> torch.Tensor:
        """Features [N, D] of `site` at one position/step (label or index); pos=None needs P == 1."""
        if site not in self.features:
            raise KeyError(f"site {site!r} was not collected; this dataset holds {self.sites}")
        t = self.features[site]
        if pos is None:
            if t.shape[1] != 1:
                raise ValueError(f"{site!r} holds {t.shape[1]} {self.axis} entries {self.coords}: pass pos=")
            pos = 0
        return torch.as_tensor(np.asarray(t[:, self._pos_index(pos)])).float()

    def y(self, name: str) -> tuple[torch.Tensor, list]:
        """(class indices [N], class values) of label column `name`."""
        from .linear import encode_labels

        if name not in self.labels:
            raise KeyError(f"no label {name!r}; this dataset has labels {list(self.labels)}")
        return encode_labels(self.labels[name])

    def save(self, path: str | os.PathLike) -> Path:
        """Write the dataset in the on-disk format (also what `collect(path=...)` writes)."""
        path = Path(path)
        writer = _DiskWriter(path, {"fingerprint": self.meta.get("fingerprint", "saved"), "n": len(self)})
        writer.start({s: (t.shape[1:], t.dtype) for s, t in self.features.items()}, self.labels, self.coords,
                     self.axis, self.meta)
        writer.write(0, {s: torch.as_tensor(np.asarray(t)) for s, t in self.features.items()})
        writer.advance(len(self))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, mmap: bool = True) -> ActivationDataset:
        path = Path(path)
        meta_file = path / "meta.json"
        if not meta_file.exists():
            raise FileNotFoundError(
                f"{path} holds no activation dataset (no meta.json); create one with probes.collect"
            )
        meta = json.loads(meta_file.read_text())
        if meta.get("format") != FORMAT:
            raise ValueError(f"{meta_file} is not an interp activation dataset (format {meta.get('format')!r})")
        done = json.loads((path / "progress.json").read_text())["done"]
        if done < meta["n"]:
            raise ValueError(f"{path} is incomplete ({done} of {meta['n']} examples collected): rerun collect() with "
                             "the same inputs and path to resume it")
        feats = {}
        for i, site in enumerate(meta["sites"]):
            arr = np.load(path / f"site_{i}.npy", mmap_mode="r" if mmap else None, allow_pickle=False)
            feats[site] = torch.from_numpy(np.asarray(arr)) if not mmap else _MemmapView(arr)
        return cls(feats, meta["labels"], meta["coords"], meta["axis"], meta.get("extra", {}), path)


class _MemmapView:
    """A read-only memory-mapped [N, P, D] array that slices to tensors lazily."""

    def __init__(self, arr: np.ndarray):
        self.arr = arr

    @property
    def shape(self):
        return torch.Size(self.arr.shape)

    @property
    def dtype(self):
        return {np.dtype(v): k for k, v in _NP.items()}[self.arr.dtype]

    def __getitem__(self, idx):
        return torch.from_numpy(np.array(self.arr[idx]))

    def __array__(self, dtype=None, copy=None):
        return np.asarray(self.arr, dtype=dtype)


class _DiskWriter:
    def __init__(self, path: Path, ident: dict):
        self.path, self.ident = path, ident
        self.arrays: dict[str, np.ndarray] = {}

    def resume_point(self) -> int:
        meta_file = self.path / "meta.json"
        if not meta_file.exists():
            return 0
        meta = json.loads(meta_file.read_text())
        if meta.get("fingerprint") != self.ident["fingerprint"] or meta.get("n") != self.ident["n"]:
            raise ValueError(f"{self.path} holds activations of different inputs, sites or positions "
                             f"({meta.get('n')} examples, fingerprint {meta.get('fingerprint', '')[:12]}); "
                             "choose a new path or delete that folder")
        for i, site in enumerate(meta["sites"]):
            self.arrays[site] = np.load(self.path / f"site_{i}.npy", mmap_mode="r+", allow_pickle=False)
        return json.loads((self.path / "progress.json").read_text())["done"]

    def start(self, shapes: dict[str, tuple], labels, coords, axis, extra) -> None:
        from numpy.lib.format import open_memmap

        self.path.mkdir(parents=True, exist_ok=True)
        for i, (site, (shape, dtype)) in enumerate(shapes.items()):
            if dtype not in _NP:
                raise ValueError(f"activations of dtype {dtype} cannot be memory-mapped; collect with "
                                 f"dtype=torch.float32 or torch.float16")
            self.arrays[site] = open_memmap(self.path / f"site_{i}.npy", mode="w+", dtype=_NP[dtype],
                                            shape=(self.ident["n"], *shape))
        meta = {"format": FORMAT, "fingerprint": self.ident["fingerprint"], "n": self.ident["n"],
                "sites": list(shapes), "labels": labels, "coords": coords, "axis": axis, "extra": extra}
        _atomic_text(self.path / "progress.json", json.dumps({"done": 0}))
        _atomic_text(self.path / "meta.json", json.dumps(meta))

    def write(self, start: int, feats: dict[str, torch.Tensor]) -> None:
        for site, t in feats.items():
            arr = self.arrays[site]
            arr[start:start + t.shape[0]] = t.numpy()
            arr.flush()

    def advance(self, done: int) -> None:
        _atomic_text(self.path / "progress.json", json.dumps({"done": done}))


def _atomic_text(dest: Path, text: str) -> None:
    atomic_write_text(dest, text)  # removes its temporary file on any error


# ---------------------------------------------------------------------------------------------
# collection
# ---------------------------------------------------------------------------------------------

def _position_specs(positions) -> dict[str, Any]:
    if positions is None:
        return {"last": -1}
    if isinstance(positions, Mapping):
        return dict(positions)
    if isinstance(positions, (int, str, SubjectOf, interp.Tokens, interp.Subject)):
        positions = [positions]
    return {(str(p) if not isinstance(p, (SubjectOf,)) else f"subject_{p.which}"): p for p in positions}


def _resolve(spec, tokens: list[str], subject: str | None, i: int) -> list[int]:
    if isinstance(spec, SubjectOf):
        if subject is None:
            raise ValueError("SubjectOf positions need subjects=[...] (one subject string per input)")
        from interp.engine import subject_positions

        pos = subject_positions(tokens, subject)
        return {"last": pos[-1:], "first": pos[:1], "mean": pos}[spec.which]
    if callable(spec):
        return [int(spec(i, tokens))]
    pos = resolve_positions(spec, tokens, len(tokens))
    if len(pos) != 1 and not isinstance(spec, interp.Subject):
        raise ValueError(f"position spec {spec!r} selects {len(pos)} positions in {tokens}; each named position "
                         "must select one token (use Tokens(text, occurrence=0) or SubjectOf('mean'))")
    return pos


def lm_runner(lm: interp.Instrumented, sites: list[str], positions: dict[str, Any],
              subjects: Sequence[str] | None = None, dtype: torch.dtype = torch.float32) -> Callable:
    """A runner for `collect`: one engine capture per batch, positions resolved per item (right padding)."""
    specs = {name: _selector(spec, subjects) for name, spec in positions.items()}

    def run(batch: list, start: int) -> dict[str, torch.Tensor]:
        if not isinstance(batch[0], str):
            batch = lm.adapter.prepare(torch.stack([torch.as_tensor(b) for b in batch]))
        # logits are not used: last_only skips the head on most rows
        return collect_batch(lm, batch, sites, specs, start=start, dtype=dtype, flatten=True, last_only=True)

    return run


def _selector(spec, subjects: Sequence[str] | None):
    """A position spec of `collect` as one the interp collector takes: fn(i, tokens) -> positions."""
    if isinstance(spec, (int, str)) and not isinstance(spec, bool):
        return spec
    return lambda i, toks: _resolve(spec, toks, subjects[i] if subjects is not None else None, i)


def _pool(t: torch.Tensor, pool: str) -> torch.Tensor:
    """One image's features: [n, C, H, W] -> [n, C] (spatial mean), [n, L, *F] -> [n, F] (token mean)."""
    if t.dim() == 2 or pool == "flatten":
        return t.flatten(1)
    if pool != "mean":
        raise ValueError(f"pool must be 'mean' or 'flatten', not {pool!r}")
    if t.dim() == 4 and t.shape[1] <= t.shape[-1] * t.shape[-2] and t.shape[2] == t.shape[3]:  # [n, C, H, W]
        return t.mean((2, 3))
    return t.mean(1).flatten(1)


def text_encoder_runner(pipe: interp.Instrumented, sites: list[str], positions: dict[str, Any],
                        subjects: Sequence[str] | None = None, component: str = "text_encoder",
                        dtype: torch.dtype = torch.float32) -> Callable:
    """A runner for `collect` over a diffusers pipeline's text-encoder sites at named token positions.

    Position specs: int, SubjectOf(which) (the item's subject words, e.g. its colour) or "eos" (the
    end-of-text token). The pipeline samples one step per batch; only the text encoder's record is kept.
    """
    from interp.diffusion import Sampling, prompt_positions, record

    def run(batch: list, start: int) -> dict[str, torch.Tensor]:
        spec = Sampling(list(batch), seed=start, steps=1)
        rec = record(pipe, spec, sites)
        tokens = pipe.adapter.prepare(spec).views.get(component)
        if tokens is None:
            raise ValueError(f"the pipeline has no tokens for component {component!r}")
        feats = {}
        for site in sites:
            t = rec.get(site, None, "cond")
            rows = []
            for j in range(t.shape[0]):
                toks = tokens[j][:len(prompt_positions(tokens[j]))]
                cols = []
                for spec_ in positions.values():
                    if spec_ == "eos":
                        idx = [len(toks) - 1]
                    else:
                        idx = _resolve(spec_, toks, subjects[start + j] if subjects is not None else None, start + j)
                    cols.append(t[j, idx].flatten(1).mean(0))
                rows.append(torch.stack(cols))
            feats[site] = torch.stack(rows).to(dtype)
        return feats

    return run


def denoiser_runner(pipe: interp.Instrumented, sites: list[str], steps: int, *, guidance: float | None = None,
                    seed: int = 0, branch: str = "cond", pool: str = "mean", options: dict | None = None,
                    dtype: torch.dtype = torch.float32) -> Callable:
    """A runner for `collect` over denoiser sites at every sampling step: features [b, steps, D]
    (spatial / token mean by default). Each prompt i gets seed `seed + i`, so reruns resume exactly."""
    from interp.diffusion import Sampling, record

    def run(batch: list, start: int) -> dict[str, torch.Tensor]:
        spec = Sampling(list(batch), seed=seed + start, steps=steps, guidance=guidance, options=dict(options or {}))
        rec = record(pipe, spec, sites)
        feats = {}
        for site in sites:
            per_step = [_pool(rec.get(site, s, branch).float(), pool) for s in range(steps)]
            feats[site] = torch.stack(per_step, 1).to(dtype)
        return feats

    return run


def fingerprint(inputs: Sequence[Any], *parts: Any) -> str:
    """Identity of a collection (inputs, sites, positions, dtype) for resuming: interp.io.fingerprint."""
    return _io_fingerprint(list(inputs), *[repr(p) for p in parts])


def collect(lm: interp.Instrumented | None, inputs: Sequence[Any], sites: str | Sequence[str] = (), *,
            labels: Mapping[str, Sequence[Any]] | None = None, positions=None, subjects: Sequence[str] | None = None,
            batch_size: int = 16, path: str | os.PathLike | None = None, dtype: torch.dtype = torch.float32,
            runner: Callable[[list, int], dict[str, torch.Tensor]] | None = None, coords: Sequence[Any] | None = None,
            axis: str = "pos", progress: bool = True, meta: dict | None = None) -> ActivationDataset:
    """Capture `sites` over `inputs` in batches and return them with `labels`.

    positions: {name: spec} or a list of specs; a spec is an int (negative counts from each input's
    own last token), Tokens, Subject, SubjectOf(which) (needs `subjects`) or fn(i, tokens) -> int.
    path: write memory-mapped arrays there; calling again with the same inputs resumes.
    runner: fn(batch, start) -> {name: [b, P, D]} replaces the LM capture (e.g. step-aware diffusion
    capture); then `coords` labels the P axis and `axis` names it ("step").
    """
    inputs = list(inputs)
    n = len(inputs)
    if n == 0:
        raise ValueError("collect() got no inputs")
    labels = {k: list(v) for k, v in (labels or {}).items()}
    for k, v in labels.items():
        if len(v) != n:
            raise ValueError(f"label {k!r} has {len(v)} values for {n} inputs: give one per input")
    if subjects is not None and len(subjects) != n:
        raise ValueError(f"{len(subjects)} subjects for {n} inputs: give one subject string per input")
    if runner is None:
        if lm is None:
            raise ValueError("collect() needs an instrumented model or a runner")
        pats = [sites] if isinstance(sites, str) else list(sites)
        if not pats:
            raise ValueError("collect() needs sites to capture, e.g. 'blocks.*.resid_post'")
        names = [s.name for p in pats for s in lm.sites(p)]
        pos = _position_specs(positions)
        runner = lm_runner(lm, names, pos, subjects, dtype)
        coords = list(pos)
        ident_parts = (names, {k: repr(v) for k, v in pos.items()}, list(subjects or []), str(dtype))
    else:
        if coords is None:
            raise ValueError("a custom runner needs coords= to label its position/step axis")
        ident_parts = (repr(sites), list(coords), axis, str(dtype), (meta or {}).get("runner", ""))
    ident = {"fingerprint": fingerprint(inputs, *ident_parts), "n": n}
    extra = {**(meta or {}), "fingerprint": ident["fingerprint"]}

    writer = _DiskWriter(Path(path), ident) if path is not None else None
    done = writer.resume_point() if writer is not None else 0
    feats: dict[str, torch.Tensor] = {}
    bar = tqdm(total=n, initial=done, desc="collect activations", disable=not progress, leave=False)
    try:
        with torch.no_grad():
            for start in range(done, n, batch_size):
                batch = inputs[start:start + batch_size]
                got = runner(batch, start)
                if len(coords) != next(iter(got.values())).shape[1]:
                    raise ValueError(f"the runner returned {next(iter(got.values())).shape[1]} entries on the "
                                     f"{axis} axis but coords has {len(coords)}")
                if writer is not None and not writer.arrays:
                    writer.start({s: (t.shape[1:], dtype) for s, t in got.items()}, labels, list(coords), axis, extra)
                if writer is not None:
                    writer.write(start, {s: t.to(dtype) for s, t in got.items()})
                    writer.advance(start + len(batch))
                else:
                    for s, t in got.items():
                        if s not in feats:
                            feats[s] = torch.empty((n, *t.shape[1:]), dtype=dtype)
                        feats[s][start:start + len(batch)] = t.to(dtype)
                bar.update(len(batch))
    finally:
        bar.close()
    if writer is not None:
        return ActivationDataset.load(path)
    return ActivationDataset(feats, labels, coords, axis, extra)


__all__ = ["ActivationDataset", "SubjectOf", "collect", "lm_runner", "text_encoder_runner", "denoiser_runner",
           "fingerprint"]
