"""Experiment grids over the processes of a torch.distributed group, and sweeps that resume.

    torchrun --nproc-per-node 4 my_sweep.py        # in my_sweep.py:
    interp.distributed.init()                      # gloo on CPU, nccl on GPU, from torchrun's variables
    g = lm.run_grid(base, rows, metric)            # rows split over the 4 ranks, gathered everywhere

The engine plans the grid exactly as a single process would (prefix groups, chunks, positional
packs); each chunk is given whole to one rank, so every row runs in the same batch composition as
in a one-process run and the gathered values are equal bit for bit (on identical hardware, thread
counts and library versions). With `resume_dir=` every finished chunk is written atomically as
safetensors, keyed by a hash of the sweep (inputs, ops with their tensors, metric, model) and of
its rows; a rerun loads those chunks instead of computing them.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from .errors import InterpError
from .ops import Op
from .results import atomic_write

FORMAT = "interp.sweep/1"
_QUIET_KW = ("progress", "desc")


class DistributedError(InterpError, RuntimeError):
    """The processes of a distributed run disagree, or no process group is there to use."""


# ---------------------------------------------------------------------------------------------
# process group
# ---------------------------------------------------------------------------------------------

def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() else None


def active(group=None) -> bool:
    """True when a torch.distributed process group with more than one process is initialised."""
    dist = _dist()
    return bool(dist and dist.is_initialized() and dist.get_world_size(group) > 1)


def rank(group=None) -> int:
    dist = _dist()
    return dist.get_rank(group) if dist and dist.is_initialized() else 0


def world_size(group=None) -> int:
    dist = _dist()
    return dist.get_world_size(group) if dist and dist.is_initialized() else 1


def is_main(group=None) -> bool:
    """True on rank 0 (and in a plain single-process run): the process that prints and writes files."""
    return rank(group) == 0


def init(backend: str | None = None) -> tuple[int, int]:
    """Initialise the default process group from torchrun's environment (RANK, WORLD_SIZE,
    MASTER_ADDR, MASTER_PORT, LOCAL_RANK); returns (rank, world size). Without those variables
    (a plain `python` run) it does nothing and returns (0, 1). backend: "nccl" when CUDA is
    available, else "gloo"; with nccl each process uses GPU LOCAL_RANK."""
    dist = _dist()
    if dist is None:
        return 0, 1
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return 0, 1
    missing = [v for v in ("MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
    if missing:
        raise DistributedError(f"RANK/WORLD_SIZE are set but {missing} are not: launch with torchrun, or set "
                               "MASTER_ADDR and MASTER_PORT yourself")
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend)
    return dist.get_rank(), dist.get_world_size()


# ---------------------------------------------------------------------------------------------
# fingerprints: what makes two sweeps the same sweep
# ---------------------------------------------------------------------------------------------

class _Hasher:
    """Stable content hash of plain values, tensors, ops and closures (no memory addresses)."""

    def __init__(self) -> None:
        self.h = hashlib.sha256()
        self.seen: dict[int, tuple[torch.Tensor, bytes]] = {}  # holds the tensor: its id stays unique

    def add(self, obj: Any, depth: int = 0) -> None:
        h = self.h
        if depth > 8:
            h.update(b"<deep>")
            return
        if obj is None or isinstance(obj, (bool, int, float, str, bytes)):
            h.update(f"{type(obj).__name__}:{obj!r};".encode())
        elif isinstance(obj, torch.Tensor):
            h.update(self._tensor(obj))
        elif isinstance(obj, (list, tuple, range)):
            h.update(f"{type(obj).__name__}[{len(obj)}](".encode())
            for o in obj:
                self.add(o, depth + 1)
            h.update(b")")
        elif isinstance(obj, dict):
            h.update(f"dict[{len(obj)}](".encode())
            for k in sorted(obj, key=repr):
                self.add(k, depth + 1)
                self.add(obj[k], depth + 1)
            h.update(b")")
        elif isinstance(obj, slice):
            self.add(("slice", obj.start, obj.stop, obj.step), depth + 1)
        elif isinstance(obj, torch.Generator):
            self.add(("generator", obj.get_state()), depth + 1)
        elif isinstance(obj, Op):  # an op says what decides its effect
            h.update(f"{type(obj).__qualname__}(".encode())
            self.add(obj.fingerprint(), depth + 1)
            h.update(b")")
        elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
            h.update(f"{type(obj).__qualname__}(".encode())
            for f in dataclasses.fields(obj):
                self.add((f.name, getattr(obj, f.name)), depth + 1)
            h.update(b")")
        elif isinstance(obj, functools.partial):
            self.add(("partial", obj.func, obj.args, obj.keywords), depth + 1)
        elif callable(obj) and hasattr(obj, "__code__"):
            cells = [c.cell_contents for c in (obj.__closure__ or ()) if _has_contents(c)]
            self.add(("fn", obj.__module__, obj.__qualname__, obj.__code__.co_code, cells), depth + 1)
        else:  # any other object: its type and public attributes (never its repr: it may hold an address)
            h.update(f"<{type(obj).__module__}.{type(obj).__qualname__}>".encode())
            public = {k: v for k, v in getattr(obj, "__dict__", {}).items() if not k.startswith("_")}
            if public and not isinstance(obj, torch.nn.Module):
                self.add(public, depth + 1)

    def _tensor(self, t: torch.Tensor) -> bytes:
        key = id(t)
        if key not in self.seen:
            d = hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode())
            if t.device.type != "meta":
                flat = t.detach().reshape(-1).contiguous().cpu()
                d.update(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")
            self.seen[key] = (t, d.digest())
        return self.seen[key][1]

    def hexdigest(self) -> str:
        return self.h.hexdigest()


def _has_contents(cell) -> bool:
    try:
        _ = cell.cell_contents
        return True
    except ValueError:
        return False


def _model_signature(model: torch.nn.Module) -> list:
    """Parameter names, shapes, dtypes and a strided sample of each parameter's values (cheap)."""
    out: list[Any] = [type(model).__qualname__]
    for name, p in model.named_parameters():
        sample = None
        if p.device.type != "meta" and p.numel():
            flat = p.detach().reshape(-1)
            sample = flat[:: max(1, flat.numel() // 64)][:64]
        out.append((name, tuple(p.shape), str(p.dtype), sample))
    return out


def fingerprint(engine, inputs, rows: Sequence[Sequence], metric: Callable | None, kw: dict) -> str:
    """sha256 of everything that decides a grid's values: the model's parameters (sampled), the inputs,
    every op with its tensors, the metric (code and closure values) and the run options."""
    h = _Hasher()
    h.add(_model_signature(engine.adapter.model))
    h.add(inputs)
    h.add(list(rows))
    h.add(metric)
    h.add({k: v for k, v in kw.items() if k not in _QUIET_KW})
    return h.hexdigest()


def describe_row(ops: Sequence) -> str:
    return " + ".join(f"{op.describe()}@{op.where}" for op in ops) or "(no ops)"


# ---------------------------------------------------------------------------------------------
# resumable chunk store
# ---------------------------------------------------------------------------------------------

class ChunkStore:
    """Finished chunks of one sweep in a folder: chunk-<key>.safetensors (values + rows in the header),
    written to a temporary file and renamed, so a killed process leaves whole chunks or none; and
    sweep-<fingerprint>.json, the index: row descriptions, chunk keys and rows, completion."""

    def __init__(self, folder: str | os.PathLike, sweep: str):
        self.dir = Path(folder)
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise DistributedError(f"resume_dir {str(folder)!r} cannot be created ({e}); pass a writable folder") from e
        self.sweep = sweep
        self.index_path = self.dir / f"sweep-{sweep[:16]}.json"

    def key(self, rows: Sequence[int]) -> str:
        return hashlib.sha256(f"{self.sweep}:{','.join(map(str, rows))}".encode()).hexdigest()[:24]

    def path(self, rows: Sequence[int]) -> Path:
        return self.dir / f"chunk-{self.key(rows)}.safetensors"

    def load(self, rows: Sequence[int]) -> torch.Tensor | None:
        from safetensors import safe_open

        p = self.path(rows)
        if not p.exists():
            return None
        try:
            with safe_open(str(p), "pt") as f:
                meta = f.metadata() or {}
                if meta.get("sweep") != self.sweep or json.loads(meta.get("rows", "null")) != list(rows):
                    return None
                return f.get_tensor("values")
        except Exception as e:  # a damaged file: recompute the chunk
            warnings.warn(f"interp: ignoring unreadable chunk file {p} ({type(e).__name__}: {e}); recomputing it",
                          stacklevel=2)
            return None

    def save(self, rows: Sequence[int], values: torch.Tensor) -> Path:
        from safetensors.torch import save_file

        dest = self.path(rows)
        meta = {"format": FORMAT, "sweep": self.sweep, "rows": json.dumps(list(rows))}
        tensor = values.detach().contiguous().cpu()
        atomic_write(dest, lambda tmp: save_file({"values": tensor}, tmp, metadata=meta))
        return dest

    def write_index(self, descriptions: list[str], plan: list[list[int]] | None, complete: bool) -> None:
        data = {"format": FORMAT, "fingerprint": self.sweep, "rows": len(descriptions), "complete": complete,
                "descriptions": descriptions,
                "chunks": None if plan is None else [{"key": self.key(c), "rows": c} for c in plan]}
        atomic_write(self.index_path, lambda tmp: Path(tmp).write_text(json.dumps(data, indent=1)))


# ---------------------------------------------------------------------------------------------
# the engine's chunk hook
# ---------------------------------------------------------------------------------------------

class _Shard:
    """Gives each chunk of the engine's plan to one rank (least estimated work first, ties to the lower
    rank: every rank sees the same plan, so every rank computes the same assignment) and loads or saves
    chunks through a ChunkStore."""

    def __init__(self, rank: int, world: int, cost: Callable[[list[int]], float], store: ChunkStore | None):
        self.rank, self.world, self.cost, self.store = rank, world, cost, store
        self.load = [0.0] * world
        self.plan: list[list[int]] = []
        self.owner: dict[int, int] = {}
        self.computed = self.resumed = 0

    def before(self, rows: list[int]):
        rows = list(rows)
        self.plan.append(rows)
        who = min(range(self.world), key=lambda r: (self.load[r], r))
        self.load[who] += self.cost(rows)
        for r in rows:
            self.owner[r] = who
        if who != self.rank:
            return None
        if self.store is not None:
            got = self.store.load(rows)
            if got is not None:
                self.resumed += len(rows)
                return got
        self.computed += len(rows)
        return True

    def after(self, rows: list[int], values: torch.Tensor) -> None:
        if self.store is not None:
            self.store.save(rows, values)

    def plan_digest(self) -> str:
        return hashlib.sha256(json.dumps(self.plan).encode()).hexdigest()


def _row_cost(engine, rows: Sequence[Sequence]) -> Callable[[list[int]], float]:
    """Estimated work of a chunk: the fraction of blocks each row runs (rows start at their first edited block)."""
    table = engine.adapter.site_table()
    L = max(1, len(getattr(engine.adapter, "block_paths", []) or []))

    def start(ops) -> int:
        layers = [table.get(op.site).layer for op in ops]
        layers = [0 if l is None or l < 0 else min(l, L) for l in layers]
        return min(layers) if layers else L - 1

    return lambda chunk: sum((L - start(rows[r])) / L for r in chunk)


# ---------------------------------------------------------------------------------------------
# gathering
# ---------------------------------------------------------------------------------------------

def _comm_device(group) -> torch.device:
    dist = _dist()
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _gather_rows(values: torch.Tensor, owner: torch.Tensor, group, broadcast: bool) -> torch.Tensor:
    """Row r of the result comes from rank owner[r]; bytes are moved as they are (bit-exact for any dtype)."""
    dist = _dist()
    world, me = dist.get_world_size(group), dist.get_rank(group)
    dev = _comm_device(group)
    n = values.shape[0]
    raw = values.detach().contiguous().reshape(n, -1)
    raw = raw.view(torch.uint8) if raw.numel() else raw.to(torch.uint8)
    raw = raw.to(dev)
    parts = [torch.empty_like(raw) for _ in range(world)] if broadcast or me == 0 else None
    if broadcast:
        dist.all_gather(parts, raw, group=group)
    else:
        dist.gather(raw, parts, group=group, group_dst=0)
    if parts is None:  # only rank 0 holds every row
        return values
    out = torch.empty_like(raw)
    owner = owner.to(dev)
    for r in range(world):
        mask = owner == r
        out[mask] = parts[r][mask]
    out = out.to(values.device)
    return out.view(values.dtype).reshape(values.shape) if values.numel() else values.clone()


def _all_same(obj, group, what: str, hint: str) -> list:
    dist = _dist()
    got = [None] * dist.get_world_size(group)
    dist.all_gather_object(got, obj, group=group)
    if any(g != got[0] for g in got):
        bad = [r for r, g in enumerate(got) if g != got[0]]
        raise DistributedError(f"ranks {bad} have a different {what} than rank 0. {hint}")
    return got


# ---------------------------------------------------------------------------------------------
# run_grid over processes
# ---------------------------------------------------------------------------------------------

def run_grid(engine, inputs, rows: Sequence[Sequence], metric: Callable | None = None, *,
             distributed: bool | None = None, group=None, resume_dir: str | os.PathLike | None = None,
             broadcast: bool = True, **kw):
    """Engine.run_grid with its chunks spread over a torch.distributed group and/or saved for resumption.

    distributed: None = split when an initialised group has more than one process; True = require one;
    False = run every row here. resume_dir: folder of finished chunks (shared by all ranks); chunks
    already there are loaded, not computed. broadcast: every rank gets the full values (default); with
    False only rank 0 does and the other ranks' `values` hold their own rows only (zeros elsewhere).
    In a group it is a collective call: every rank must make it, with the same inputs, rows and metric
    (checked; a call on one rank only waits for the others until the group's timeout)."""
    use = active(group) if distributed is None else bool(distributed)
    if use and not active(group):
        dist = _dist()
        if not (dist and dist.is_initialized()):
            raise DistributedError("run_grid(distributed=True) needs an initialised torch.distributed process group: "
                                   "launch with `torchrun --nproc-per-node N script.py` and call "
                                   "interp.distributed.init() (or torch.distributed.init_process_group) first; "
                                   "or pass distributed=False")
        use = False  # a group of one process: nothing to split
    if not use and resume_dir is None:
        return engine.run_grid(inputs, rows, metric, **kw)
    if not rows:
        return engine.run_grid(inputs, rows, metric, **kw)

    me, world = (rank(group), world_size(group)) if use else (0, 1)
    needs_print = kw.get("progress", True) and me == 0
    sweep = fingerprint(engine, inputs, rows, metric, kw)
    if use:
        _all_same(sweep, group, "sweep (inputs, rows, ops' tensors, metric or options)",
                  "Every rank must call run_grid with the same grid; to run a different grid on each rank "
                  "(e.g. one prompt per rank), pass distributed=False.")
    store = ChunkStore(resume_dir, sweep) if resume_dir is not None else None
    descriptions = [describe_row(ops) for ops in rows]
    if store is not None and me == 0:
        store.write_index(descriptions, None, complete=False)
    shard = _Shard(me, world, _row_cost(engine, rows), store)
    kw = dict(kw, progress=needs_print)
    if use and "desc" in kw:
        kw["desc"] = f"{kw['desc']} ({world} ranks)"
    out = engine.run_grid(inputs, rows, metric, chunk_hook=shard, **kw)

    stats = dict(out.stats)
    if use:
        _all_same(shard.plan_digest(), group, "chunk plan",
                  "The engine planned the grid differently on different ranks (e.g. the prefix-replay check "
                  "passed on one and not another: different hardware or library versions); run with "
                  "reuse_prefix=False and an explicit chunk_rows=, or distributed=False.")
        owner = torch.tensor([shard.owner[r] for r in range(len(rows))], dtype=torch.long)
        values = _gather_rows(out.values, owner, group, broadcast)
        per_rank: list[Any] = [None] * world
        _dist().all_gather_object(per_rank, (shard.computed, shard.resumed, out.stats.get("forward_equivalents", 0.0)),
                                  group=group)
        stats.update(forward_equivalents=sum(p[2] for p in per_rank),
                     distributed={"world_size": world, "rank": me, "chunks": len(shard.plan),
                                  "rows_computed_per_rank": [p[0] for p in per_rank],
                                  "rows_resumed_per_rank": [p[1] for p in per_rank],
                                  "forward_equivalents_per_rank": [p[2] for p in per_rank],
                                  "complete_here": broadcast or me == 0})
        resumed = sum(p[1] for p in per_rank)
        if len(shard.plan) < world and me == 0:
            warnings.warn(f"interp: this grid has {len(shard.plan)} chunk(s) for {world} processes, so "
                          f"{world - len(shard.plan)} process(es) had nothing to do; pass chunk_rows= to split it "
                          "finer (a one-process run with the same chunk_rows gives the same values)", stacklevel=2)
    else:
        values, resumed = out.values, shard.resumed
        stats["distributed"] = {"world_size": 1, "rank": 0, "chunks": len(shard.plan),
                                "rows_computed_per_rank": [shard.computed], "rows_resumed_per_rank": [shard.resumed],
                                "complete_here": True}
    stats["resumed_rows"] = resumed
    if store is not None:
        stats["resume_dir"] = str(store.dir)
        if me == 0:
            store.write_index(descriptions, shard.plan, complete=True)
    return type(out)(values, out.base, out.tokens, stats)


__all__ = ["init", "active", "rank", "world_size", "is_main", "run_grid", "fingerprint", "ChunkStore",
           "DistributedError"]
