"""Files written and read safely: atomic writes, JSON values, one content fingerprint, safetensors checks,
an exclusive writer lock and the clean-up of temporary folders left by killed writers.

Every writer in interp goes through `atomic_write`: the bytes go to a hidden temporary file beside the
destination, which is renamed into place only when complete, so a reader never sees a partial file. Files
get the permissions an ordinary `open()` would give (0666 minus the umask), not mkstemp's 0600.
Nothing here unpickles: safetensors and JSON only.
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import math
import os
import shutil
import socket
import struct
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from interp.errors import InterpError


class CorruptFileError(InterpError, ValueError):
    """A file on disk is truncated, damaged or does not match its recorded hash."""


class LockedError(InterpError, RuntimeError):
    """Another process is writing the same destination."""


# ---------------------------------------------------------------------------------------------
# permissions and atomic writes
# ---------------------------------------------------------------------------------------------

def umask() -> int:
    """The process umask (read from /proc where possible, so no other thread sees it change)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def file_mode() -> int:
    """The mode a plain `open(path, 'w')` gives a new file: 0o666 minus the umask (0o644 typically)."""
    return 0o666 & ~umask()


def honour_umask(folder: str | os.PathLike) -> None:
    """Give every file under `folder` the mode a plain open() would (some writers, e.g. transformers'
    save_pretrained, leave 0600 temporary-file modes behind), and every folder 0777 minus the umask."""
    fmode, dmode = file_mode(), 0o777 & ~umask()
    for root, dirs, files in os.walk(str(folder)):
        for d in dirs:
            os.chmod(os.path.join(root, d), dmode)
        for f in files:
            p = os.path.join(root, f)
            if not os.path.islink(p):
                os.chmod(p, fmode)


def atomic_write(dest: str | os.PathLike, write: Callable[[str], Any]) -> Path:
    """Call write(tmp_path) on a hidden temporary file beside `dest`, then rename it onto `dest`.

    A failure (or an interrupt) removes the temporary file and leaves any previous `dest` as it was.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(dest)  # temporaries of writers of `dest` that were killed
    tmp = str(temp_name(dest))
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    try:
        write(tmp)
        os.chmod(tmp, file_mode())
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return dest


def atomic_write_bytes(dest: str | os.PathLike, data: bytes) -> Path:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    return atomic_write(dest, write)


def atomic_write_text(dest: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(dest, text.encode())


def atomic_write_json(dest: str | os.PathLike, obj: Any, indent: int | None = 1) -> Path:
    """`obj` as JSON (through `jsonable`; non-finite floats become the strings 'nan' / 'inf')."""
    return atomic_write_text(dest, json.dumps(jsonable(obj), indent=indent, allow_nan=False))


def atomic_write_safetensors(dest: str | os.PathLike, tensors: Mapping[str, torch.Tensor],
                             metadata: Mapping[str, str] | None = None) -> Path:
    from safetensors.torch import save_file

    flat = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    return atomic_write(dest, lambda tmp: save_file(flat, tmp, metadata=dict(metadata) if metadata else None))


def jsonable(x: Any) -> Any:
    """Nested dicts / lists / tensors -> plain JSON values; non-finite floats as strings, others as str()."""
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, torch.Tensor):
        return jsonable(x.tolist())
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    if hasattr(x, "item") and callable(x.item):  # numpy scalars
        return jsonable(x.item())
    return str(x)


# ---------------------------------------------------------------------------------------------
# nested state (training state, optimizer state) as one safetensors file: tensors + a JSON skeleton
# ---------------------------------------------------------------------------------------------

STATE_FORMAT = "interp.state/1"


def _split_state(x: Any, tensors: dict[str, torch.Tensor], key: str) -> Any:
    if isinstance(x, torch.Tensor):
        tensors[key] = x.detach().cpu().contiguous()
        return {"__tensor__": key}
    if isinstance(x, dict):
        return {"__dict__": [[k, _split_state(v, tensors, f"{key}/{k}")] for k, v in x.items()]}
    if isinstance(x, (list, tuple)):
        items = [_split_state(v, tensors, f"{key}/{i}") for i, v in enumerate(x)]
        return {"__tuple__": items} if isinstance(x, tuple) else items
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    raise TypeError(f"cannot store a {type(x).__name__} in a state file (tensors, dicts, lists, numbers, strings)")


def _join_state(x: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    if isinstance(x, list):
        return [_join_state(v, tensors) for v in x]
    if isinstance(x, dict):
        if "__tensor__" in x:
            return tensors[x["__tensor__"]].clone()
        if "__tuple__" in x:
            return tuple(_join_state(v, tensors) for v in x["__tuple__"])
        return {(k if isinstance(k, (str, int)) else str(k)): _join_state(v, tensors) for k, v in x["__dict__"]}
    return x


def save_state(dest: str | os.PathLike, state: Mapping[str, Any]) -> Path:
    """Write nested `state` (dicts with str / int keys, lists, tuples, tensors, numbers, strings; e.g. model,
    optimizer and RNG states) as one safetensors file whose metadata holds the JSON skeleton. Atomic."""
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _split_state(dict(state), tensors, "s")
    if not tensors:  # safetensors needs at least one entry to carry metadata
        tensors["s/__empty__"] = torch.zeros(0)
    return atomic_write_safetensors(dest, tensors, {"format": STATE_FORMAT, "state": json.dumps(skeleton)})


def load_state(path: str | os.PathLike) -> dict[str, Any]:
    """Read a file written by `save_state` (no unpickling: safetensors tensors + JSON)."""
    from safetensors import safe_open

    path = Path(path)
    check_safetensors(path)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != STATE_FORMAT:
            raise CorruptFileError(f"{path} is not an interp state file (format {meta.get('format')!r})")
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return _join_state(json.loads(meta["state"]), tensors)


# ---------------------------------------------------------------------------------------------
# content fingerprints and hashes
# ---------------------------------------------------------------------------------------------

def _feed(h: Any, x: Any) -> None:
    if isinstance(x, torch.Tensor):
        h.update(str((tuple(x.shape), str(x.dtype))).encode())
        h.update(x.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes() if x.numel() else b"")
    elif isinstance(x, (list, tuple)):
        h.update(b"[")
        for y in x:
            _feed(h, y)
        h.update(b"]")
    elif isinstance(x, dict):
        for k in sorted(x, key=str):
            _feed(h, str(k))
            _feed(h, x[k])
    else:
        h.update(repr(x).encode())


def fingerprint(*parts: Any, length: int = 64) -> str:
    """sha256 (hex, first `length` digits) of tensors (shape, dtype and bytes), nested lists / dicts and reprs."""
    h = hashlib.sha256()
    for p in parts:
        _feed(h, p)
    return h.hexdigest()[:length]


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# checks of files before they are loaded
# ---------------------------------------------------------------------------------------------

def check_safetensors(path: str | os.PathLike) -> None:
    """Raise CorruptFileError naming `path` if it is not a complete safetensors file.

    Reads only the header: its length, its JSON, and that every tensor's byte range lies inside the file
    and that the data section is exactly as long as the header says (a truncated file fails here).
    """
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise CorruptFileError(f"{path} is truncated ({size} bytes): not a safetensors file")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise CorruptFileError(f"{path} is truncated or damaged: its header claims {n} bytes, the file has {size}")
        try:
            header = json.loads(fh.read(n))
        except (ValueError, UnicodeDecodeError) as e:
            raise CorruptFileError(f"{path} has a damaged header ({e}): restore the file") from e
    ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"]
    need = 8 + n + max(ends, default=0)
    if size != need:
        what = "truncated" if size < need else "longer than its header says"
        raise CorruptFileError(f"{path} is {what}: {size} bytes, its header describes {need}; restore the file")


def check_files(folder: str | os.PathLike, hashes: Mapping[str, str], what: str = "") -> None:
    """Every file of `hashes` (relative path -> sha256) present in `folder` with those bytes, else
    CorruptFileError naming the files; safetensors files are first checked for truncation (named)."""
    folder = Path(folder)
    missing = [rel for rel in hashes if not (folder / rel).is_file()]
    if missing:
        raise CorruptFileError(f"{what or folder}: {len(missing)} file(s) missing: {missing[:5]}")
    for rel in hashes:
        if rel.endswith(".safetensors"):
            check_safetensors(folder / rel)
    bad = [rel for rel, h in hashes.items() if file_sha256(folder / rel) != h]
    if bad:
        raise CorruptFileError(f"{what or folder}: {len(bad)} file(s) no longer match their recorded sha256 "
                               f"(overwritten or damaged bytes): {bad[:5]}; restore them or re-create the folder")


def check_safetensors_in(folder: str | os.PathLike) -> None:
    """check_safetensors on every .safetensors file under `folder`."""
    for f in sorted(Path(folder).rglob("*.safetensors")):
        check_safetensors(f)


def check_finite_parameters(modules: Mapping[str, torch.nn.Module], where: str | os.PathLike) -> None:
    """CorruptFileError naming the first loaded parameter with NaN / inf values (damaged weight bytes)."""
    for prefix, m in modules.items():
        for name, p in m.named_parameters():
            if p.is_floating_point() and not bool(torch.isfinite(p).all()):
                full = f"{prefix}.{name}" if prefix else name
                raise CorruptFileError(f"{where}: parameter {full!r} holds NaN or inf after loading: the weight file "
                                       "is damaged (or was saved from a diverged model); restore it")


# ---------------------------------------------------------------------------------------------
# one writer per destination, and stale temporary folders
# ---------------------------------------------------------------------------------------------

def _host() -> str:
    return socket.gethostname().replace("-", "_").replace(".", "_")[:32] or "host"


def temp_name(dest: Path, kind: str = "tmp") -> Path:
    """Hidden sibling of `dest` that names its writer: .<name>.<kind>-<host>-<pid>-<random>."""
    return dest.parent / f".{dest.name}.{kind}-{_host()}-{os.getpid()}-{os.urandom(4).hex()}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale(dest: str | os.PathLike, max_age_s: float = 7 * 86400) -> list[Path]:
    """Remove the temporary siblings of `dest` left by writers that died; returns what was removed.

    A temporary folder is stale when its writer ran on this host and that pid is gone, or (any host) when it
    is older than `max_age_s`. A running writer's folder is kept. If `dest` itself is missing and a stale
    `.old-` backup of it exists (a writer was killed between its two renames), the backup is put back.
    """
    dest = Path(dest)
    removed: list[Path] = []
    if not dest.parent.is_dir():
        return removed
    prefix, host = f".{dest.name}.", _host()
    for p in sorted(dest.parent.iterdir()):
        if not p.name.startswith(prefix):
            continue
        if p.name == f"{prefix}lock":
            if _unlink_if_unlocked(p):
                removed.append(p)
            continue
        kind, _, rest = p.name[len(prefix):].partition("-")
        parts = rest.rsplit("-", 2)
        if kind not in ("tmp", "old") or len(parts) != 3 or not parts[1].isdigit():
            continue
        same_host_dead = parts[0] == host and not _pid_alive(int(parts[1]))
        too_old = time.time() - p.lstat().st_mtime > max_age_s
        if not (same_host_dead or too_old):
            continue
        if kind == "old" and not dest.exists():
            os.replace(p, dest)
            continue
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)
        removed.append(p)
    return removed


def _unlink_if_unlocked(lock: Path) -> bool:
    """Remove a lock file no process holds (left by a writer killed before it could remove it)."""
    try:
        fd = os.open(lock, os.O_RDWR)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return False
    try:  # a writer that opened it meanwhile sees the unlink (samestat) and makes a new one
        lock.unlink()
        return True
    except FileNotFoundError:
        return False
    finally:
        os.close(fd)


@contextmanager
def writer_lock(dest: str | os.PathLike) -> Iterator[Path]:
    """Hold the exclusive writer lock of `dest` (a `.<name>.lock` file beside it, flock'ed).

    A second process asking for the same lock gets LockedError at once, naming the holder. The kernel drops
    the lock when its holder dies, so a killed writer never blocks the next one.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    lock = dest.parent / f".{dest.name}.lock"
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, file_mode())
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            if e.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise LockedError(f"{dest} is being written by {holder}: wait for it to finish or choose "
                                  "another output folder") from None
            raise
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(lock))
        except FileNotFoundError:
            same = False
        if same:  # the file we locked is still the lock file (not one its last holder just unlinked)
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode(), 0)
        yield lock
    finally:
        try:
            os.unlink(lock)
        except FileNotFoundError:
            pass
        os.close(fd)


def disk_full_hint(e: BaseException, where: str | os.PathLike) -> str:
    """' (the disk holding X is full: N MB free)' when `e` is ENOSPC / EDQUOT, else ''."""
    chain = [e, e.__cause__, e.__context__]
    if not any(isinstance(c, OSError) and c.errno in (errno.ENOSPC, errno.EDQUOT) for c in chain if c) and \
            "No space left" not in str(e):
        return ""
    try:
        free = shutil.disk_usage(Path(where)).free / 1e6
        return f" (the disk holding {where} is full: {free:.1f} MB free; free space or choose another folder)"
    except OSError:
        return f" (the disk holding {where} is full; free space or choose another folder)"


__all__ = ["honour_umask", "atomic_write", "atomic_write_bytes", "atomic_write_text", "atomic_write_json",
           "atomic_write_safetensors", "jsonable", "fingerprint", "file_sha256", "file_mode", "check_safetensors",
           "check_files", "check_safetensors_in", "check_finite_parameters", "save_state", "load_state",
           "clean_stale", "writer_lock", "temp_name", "disk_full_hint", "CorruptFileError", "LockedError"]
