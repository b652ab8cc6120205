"""Activation store: stream any site(s) of any adapter into a seeded shuffling buffer, in memory or on disk.

    store = ActivationStore(lm, ["blocks.15.resid_post"], dtype=torch.float16, skip_first=1,
                            directory="acts/smollm2-l15", shard_rows=65536)
    store.fill(token_windows(lm.tokenizer, texts, seq_len=128), batch_size=16, max_rows=500_000)
    for batch in store.batches(4096, seed=0):          # {site: [4096, d]} rows drawn in a shuffled order
        ...
    for batch in stream(lm, sites, inputs, 4096, buffer_rows=65536):   # no storage: a shuffling ring buffer

Rows are (item, position) pairs kept by the position filter: `skip_first` drops the first positions of every
window (BOS / attention sinks), `keep` is a callable (ids [B, T]) -> bool mask [B, T] (e.g. drop padding or
special tokens); every row carries its token id, input item and position, so a row can be traced back to
its context. On disk each flush writes `shard_{i:05d}.safetensors` through a temporary file, then the
manifest (`store.json`) is rewritten atomically: an interrupted `fill` resumes after the last shard written,
skipping the input batches it had already consumed. Captures run through the engine (`capture=` plus one
`Replace` op that ends the forward pass after the last site in forward order when `stop_early`).
"""
from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .errors import InterpError
from .hooks import StopForward
from .ops import Replace
from .results import atomic_write

FORMAT = "interp.store/1"
META_KEYS = ("token", "item", "pos")  # per-row int64 columns kept beside the site tensors
_EARLY_FAMILIES = ("hf_lm", "hf_encoder", "transformer_lens", "physics")


class StoreError(InterpError, ValueError):
    """A store's settings, directory or inputs do not fit together."""


def token_windows(tokenizer, texts: Iterable[str], seq_len: int, bos: bool = True, stride: int | None = None,
                  sep: str | None = None) -> Iterator[torch.Tensor]:
    """Concatenate tokenized texts and cut them into [seq_len] id windows (BOS first if `bos` and the tokenizer
    has one). Texts are separated by the tokens of `sep` (e.g. "\n\n"), or by EOS when sep is None.
    Yields 1-D tensors; batch them with `batched`."""
    bos_id = tokenizer.bos_token_id if bos else None
    sep_ids = [tokenizer.eos_token_id] if sep is None else tokenizer(sep, add_special_tokens=False)["input_ids"]
    width = seq_len - (bos_id is not None)
    stride = stride or width
    buf: list[int] = []
    for text in texts:
        buf.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        buf.extend(i for i in sep_ids if i is not None)
        while len(buf) >= width:
            win = buf[:width]
            buf = buf[stride:]
            yield torch.tensor(([bos_id] if bos_id is not None else []) + win, dtype=torch.long)


def batched(rows: Iterable[torch.Tensor], batch_size: int) -> Iterator[torch.Tensor]:
    """Stack consecutive equal-length rows into [batch_size, T] (the last batch may be smaller)."""
    chunk: list[torch.Tensor] = []
    for r in rows:
        chunk.append(r)
        if len(chunk) == batch_size:
            yield torch.stack(chunk)
            chunk = []
    if chunk:
        yield torch.stack(chunk)


def _ids_of(inputs) -> torch.Tensor | None:
    if isinstance(inputs, torch.Tensor) and not inputs.is_floating_point():
        return inputs if inputs.dim() == 2 else inputs[None]
    if isinstance(inputs, dict) and isinstance(inputs.get("input_ids"), torch.Tensor):
        return inputs["input_ids"]
    return None


class ActivationCollector:
    """One batch of inputs -> rows {site: [n, d], token/item/pos: [n]} after the position filter."""

    def __init__(self, lm, sites: Sequence[str] | str, *, dtype: torch.dtype | None = None, skip_first: int = 0,
                 keep: Callable[[torch.Tensor], torch.Tensor] | None = None, stop_early: bool | None = None,
                 run_kwargs: dict | None = None):
        from .attach import attach

        self.lm = attach(lm)
        names = [sites] if isinstance(sites, str) else list(sites)
        resolved = [s for pat in names for s in self.lm.sites(pat)]
        if not resolved:
            raise StoreError(f"no sites match {names}")
        order = {s.name: i for i, s in enumerate(self.lm.sites())}
        self.sites = sorted({s.name: s for s in resolved}.values(), key=lambda s: order.get(s.name, 0))
        self.names = [s.name for s in self.sites]
        self.dtype, self.skip_first, self.keep = dtype, int(skip_first), keep
        self.stop_early = (self.lm.family in _EARLY_FAMILIES) if stop_early is None else bool(stop_early)
        self.run_kwargs = dict(run_kwargs or {})

    def _forward(self, inputs) -> dict[str, torch.Tensor]:
        """{site: [B, T, ...]} captured at every site (the forward ends after the last one if stop_early)."""
        got: dict[str, torch.Tensor] = {}
        if not self.stop_early:
            out = self.lm.run(inputs, capture=self.names, capture_dtype=self.dtype, **self.run_kwargs)
            return {n: out.cache[n] for n in self.names}
        last = self.names[-1]

        def grab(name: str):
            def fn(x: torch.Tensor) -> torch.Tensor:
                got[name] = x.detach().clone() if self.dtype is None else x.detach().to(self.dtype)
                if name == last:
                    raise StopForward
                return x
            return fn

        try:
            self.lm.run(inputs, ops=[Replace(n, fn=grab(n)) for n in self.names], **self.run_kwargs)
        except StopForward:
            pass
        missing = [n for n in self.names if n not in got]
        if missing:
            raise StoreError(f"sites {missing} never ran on these inputs; pick sites on the forward path")
        return got

    def rows(self, inputs, item_offset: int = 0) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            acts = self._forward(inputs)
        first = acts[self.names[0]]
        B, T = first.shape[0], first.shape[1] if first.dim() > 2 else 1
        mask = torch.ones(B, T, dtype=torch.bool)
        mask[:, :min(self.skip_first, T)] = False
        ids = _ids_of(inputs)
        if self.keep is not None:
            if ids is None:
                raise StoreError("keep= filters on token ids: pass inputs as a [batch, pos] tensor of ids")
            mask &= self.keep(ids.cpu()).to(torch.bool)
        item, pos = mask.nonzero(as_tuple=True)
        out = {}
        for n in self.names:
            a = acts[n]
            a = a[:, None] if a.dim() == 2 else a
            if a.shape[:2] != (B, T):
                raise StoreError(f"site {n!r} has shape {tuple(a.shape)}, the first site {self.names[0]!r} has "
                                 f"[{B}, {T}, ...]: store sites with the same batch and position axes together")
            out[n] = a.flatten(2).cpu()[item, pos]
        out["token"] = ids.cpu()[item, pos] if ids is not None else torch.full_like(item, -1)
        out["item"], out["pos"] = item + item_offset, pos
        return out


class ShuffleBuffer:
    """A seeded shuffling buffer of rows: add() blocks of rows, pop() shuffled batches once it holds enough."""

    def __init__(self, capacity: int, seed: int = 0):
        self.capacity = int(capacity)
        self.rows: dict[str, torch.Tensor] | None = None
        self.gen = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return 0 if self.rows is None else next(iter(self.rows.values())).shape[0]

    def add(self, block: dict[str, torch.Tensor]) -> None:
        self.rows = block if self.rows is None else {k: torch.cat([self.rows[k], v]) for k, v in block.items()}

    def pop(self, n: int) -> dict[str, torch.Tensor]:
        """n rows drawn uniformly from the buffer (removed from it)."""
        if self.rows is None:
            raise StoreError("ShuffleBuffer.pop on an empty buffer: add() rows first")
        perm = torch.randperm(len(self), generator=self.gen)
        take, rest = perm[:n], perm[n:]
        out = {k: v[take] for k, v in self.rows.items()}
        self.rows = {k: v[rest] for k, v in self.rows.items()}
        return out

    def drain(self, batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
        while len(self) > 0:
            yield self.pop(min(batch_size, len(self)))


def stream(lm, sites, inputs: Iterable, batch_size: int, buffer_rows: int = 65536, seed: int = 0,
           max_rows: int | None = None, progress: bool = True, **collector_kw) -> Iterator[dict[str, torch.Tensor]]:
    """Shuffled batches straight from the model (nothing stored): the buffer is refilled to `buffer_rows`,
    then batches are drawn until it is half empty, so consecutive batches mix many inputs."""
    col = ActivationCollector(lm, sites, **collector_kw)
    buf = ShuffleBuffer(buffer_rows, seed)
    seen, items = 0, 0
    bar = tqdm(total=max_rows, desc="interp stream", unit="row", disable=not progress, leave=False)
    try:
        for inp in inputs:
            block = col.rows(inp, items)
            items += int(_batch_len(inp))
            if max_rows is not None:
                block = {k: v[:max_rows - seen] for k, v in block.items()}
            buf.add(block)
            n = block["pos"].shape[0]
            seen += n
            bar.update(n)
            while len(buf) >= buffer_rows:
                while len(buf) > buffer_rows // 2:
                    yield buf.pop(batch_size)
            if max_rows is not None and seen >= max_rows:
                break
        yield from buf.drain(batch_size)
    finally:
        bar.close()


def _batch_len(inp) -> int:
    ids = _ids_of(inp)
    if ids is not None:
        return ids.shape[0]
    if isinstance(inp, torch.Tensor):
        return inp.shape[0] if inp.dim() > 1 else 1
    return len(inp) if isinstance(inp, (list, tuple)) else 1


class ActivationStore:
    """Rows of activations at one or more sites, in memory or as safetensors shards in `directory`."""

    def __init__(self, lm=None, sites: Sequence[str] | str = (), *, dtype: torch.dtype | None = None,
                 skip_first: int = 0, keep: Callable | None = None, directory: str | Path | None = None,
                 shard_rows: int = 65536, stop_early: bool | None = None):
        self.directory = Path(directory) if directory is not None else None
        self.shard_rows = int(shard_rows)
        self.collector = ActivationCollector(lm, sites, dtype=dtype, skip_first=skip_first, keep=keep,
                                             stop_early=stop_early) if lm is not None else None
        self.memory: list[dict[str, torch.Tensor]] = []
        self.meta: dict[str, Any] = {
                     "format": FORMAT, "sites": self.collector.names if self.collector else [], "shards": [],
                     "rows": 0, "batches": 0, "items": 0, "dtype": str(dtype) if dtype else None,
                     "skip_first": skip_first,
                     "model": self.collector.lm.adapter.describe() if self.collector else None}
        if self.directory is not None and (self.directory / "store.json").exists():
            self._resume()

    # -- reading back ------------------------------------------------------------------------
    @classmethod
    def open(cls, directory: str | Path) -> ActivationStore:
        """A store written earlier (read-only use: batches, tensors)."""
        d = Path(directory)
        if not (d / "store.json").exists():
            raise StoreError(f"{d} holds no activation store (no store.json); write one with ActivationStore.fill")
        return cls(directory=d)

    def _resume(self) -> None:
        assert self.directory is not None, "only a store on disk resumes"
        meta = json.loads((self.directory / "store.json").read_text())
        if meta.get("format") != FORMAT:
            raise StoreError(f"{self.directory}/store.json is not an interp store (format {meta.get('format')!r})")
        if self.collector is not None and meta["sites"] != self.collector.names:
            raise StoreError(f"{self.directory} holds sites {meta['sites']}, not {self.collector.names}: "
                             "use another directory or the same sites")
        self.meta = meta

    @property
    def sites(self) -> list[str]:
        return list(self.meta["sites"])

    def __len__(self) -> int:
        return int(self.meta["rows"])

    def _shard(self, i: int) -> dict[str, torch.Tensor]:
        if self.directory is None:
            return self.memory[i]
        from safetensors.torch import load_file

        return load_file(str(self.directory / self.meta["shards"][i]["file"]))

    def _n_shards(self) -> int:
        return len(self.memory) if self.directory is None else len(self.meta["shards"])

    def tensors(self, max_rows: int | None = None) -> dict[str, torch.Tensor]:
        """Every row (or the first `max_rows`) in storage order, as {site / meta column: tensor}."""
        parts, n = [], 0
        for i in range(self._n_shards()):
            s = self._shard(i)
            parts.append(s)
            n += s["pos"].shape[0]
            if max_rows is not None and n >= max_rows:
                break
        if not parts:
            raise StoreError("the store is empty: fill it first")
        return {k: torch.cat([p[k] for p in parts])[:max_rows] for k in parts[0]}

    def batches(self, batch_size: int, seed: int = 0, epochs: int = 1, buffer_shards: int = 4,
                sites: Sequence[str] | None = None) -> Iterator[dict[str, torch.Tensor]]:
        """Shuffled batches: shards are visited in a seeded random order, `buffer_shards` at a time, and the
        rows of those shards are shuffled together. The same seed gives the same batches."""
        keep = list(sites or self.sites) + list(META_KEYS)
        gen = torch.Generator().manual_seed(seed)
        for _ in range(epochs):
            order = torch.randperm(self._n_shards(), generator=gen).tolist()
            for g in range(0, len(order), buffer_shards):
                buf = ShuffleBuffer(0, int(torch.randint(0, 2**62, (1,), generator=gen)))
                for i in order[g:g + buffer_shards]:
                    buf.add({k: v for k, v in self._shard(i).items() if k in keep})
                yield from buf.drain(batch_size)

    # -- writing -----------------------------------------------------------------------------
    def fill(self, inputs: Iterable, max_rows: int | None = None, progress: bool = True) -> ActivationStore:
        """Run the model over `inputs` (an iterable of batches: [B, T] id tensors, prompt lists, ...) and keep
        the filtered rows. On disk, batches consumed by an earlier interrupted fill are skipped."""
        if self.collector is None:
            raise StoreError("this store was opened read-only; create it with a model and sites to fill it")
        done = int(self.meta["batches"])
        b = done - 1
        pending: list[dict[str, torch.Tensor]] = []
        bar = tqdm(total=max_rows, initial=len(self), desc="interp store", unit="row", disable=not progress)
        try:
            for b, inp in enumerate(inputs):
                if b < done:
                    continue
                if max_rows is not None and len(self) + sum(p["pos"].shape[0] for p in pending) >= max_rows:
                    break
                block = self.collector.rows(inp, int(self.meta["items"]))
                self.meta["items"] += _batch_len(inp)
                pending.append(block)
                bar.update(block["pos"].shape[0])
                if sum(p["pos"].shape[0] for p in pending) >= self.shard_rows:
                    self._flush(pending, b + 1, max_rows)
                    pending = []
            if pending:
                self._flush(pending, b + 1, max_rows)
        finally:
            bar.close()
        return self

    def _flush(self, blocks: list[dict[str, torch.Tensor]], batches_done: int, max_rows: int | None) -> None:
        rows = {k: torch.cat([b[k] for b in blocks]) for k in blocks[0]}
        if max_rows is not None:
            rows = {k: v[:max(0, max_rows - len(self))] for k, v in rows.items()}
        n = rows["pos"].shape[0]
        if n == 0:
            return
        if self.directory is None:
            self.memory.append(rows)
        else:
            from safetensors.torch import save_file

            self.directory.mkdir(parents=True, exist_ok=True)
            name = f"shard_{len(self.meta['shards']):05d}.safetensors"
            tensors = {k: v.contiguous() for k, v in rows.items()}
            atomic_write(self.directory / name, lambda p: save_file(tensors, str(p)))
            self.meta["shards"].append({"file": name, "rows": n})
        self.meta["rows"] += n
        self.meta["batches"] = batches_done
        if self.directory is not None:
            text = json.dumps(self.meta, indent=1)
            atomic_write(self.directory / "store.json", lambda p: Path(p).write_text(text))

    def mean_norm(self, site: str, max_rows: int = 65536) -> float:
        """Mean L2 norm of a site's rows (the first `max_rows`), for input scaling."""
        x = self.tensors(max_rows)[site].float()
        return float(x.norm(dim=-1).mean()) if x.numel() else math.nan


__all__ = ["ActivationStore", "ActivationCollector", "ShuffleBuffer", "StoreError", "stream", "token_windows",
           "batched", "FORMAT"]
