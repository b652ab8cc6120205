"""Activation capture: chosen sites only, optional dtype and CPU offload, memory reported."""
from __future__ import annotations

import torch

from .hooks import Entry
from .sites import Site


class ActivationCache(dict):
    """site name -> captured tensor (batch first). Repeated calls of one site are stacked on a new axis 0."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.axes: dict[str, tuple[str, ...]] = {}
        self.aliases: dict[str, str] = {}  # other names of a site (TransformerLens hook names) -> its key

    def __missing__(self, key):  # cache["blocks.1.hook_resid_pre"] on a TL model: the site captured under it
        if key in self.aliases and dict.__contains__(self, self.aliases[key]):
            return self[self.aliases[key]]
        raise KeyError(key)

    def __contains__(self, key) -> bool:
        return dict.__contains__(self, key) or dict.__contains__(self, self.aliases.get(key, None))

    @property
    def memory_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.values())

    def report(self) -> str:
        return f"{len(self)} sites, {self.memory_bytes / 2**20:.2f} MiB"

    def _store(self, site: Site, t: torch.Tensor, calls: dict[str, list]) -> None:
        calls.setdefault(site.name, []).append(t)
        seen = calls[site.name]
        if len({tuple(x.shape) for x in seen}) > 1:
            from .errors import SiteShapeError

            raise SiteShapeError(f"site {site.name!r} (module {site.module!r}) ran {len(seen)} times in one forward "
                                 f"with different shapes {[tuple(x.shape) for x in seen]}, so its calls cannot be "
                                 "stacked into one capture: capture a site inside the module or one that runs once")
        self[site.name] = seen[0] if len(seen) == 1 else torch.stack(seen)
        self.axes[site.name] = site.axes if len(seen) == 1 else ("call", *site.axes)


def capture_entry(site: Site, cache: ActivationCache, dtype: torch.dtype | None = None,
                  offload: str | None = None, grad: bool = False) -> Entry:
    """An Entry that records what flows at `site` (after any edits there)."""
    calls: dict[str, list] = {}

    def fn(t: torch.Tensor):
        if grad:
            if t.requires_grad:
                t.retain_grad()
            kept = t
        else:
            kept = t.detach()
            if dtype is not None:
                kept = kept.to(dtype)
            kept = kept.to(offload) if offload else kept
            if kept.data_ptr() == t.data_ptr():
                kept = kept.clone()
        cache._store(site, kept, calls)
        return None

    return Entry(site, fn)
