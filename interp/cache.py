"""Activation capture: chosen sites only, optional dtype and CPU offload, memory reported."""
from __future__ import annotations

import torch

from .errors import SiteShapeError
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
        """Append one call's tensor: the first is stored as is, later ones stack on a new axis 0 in a buffer
        that doubles when full (linear in the number of calls; `self[name]` is a view of the filled part)."""
        seen = calls.setdefault(site.name, [None, 0])
        if seen[1] == 0:
            self[site.name], self.axes[site.name] = t, site.axes
            seen[:] = [t, 1]
            return
        first = seen[0] if seen[1] == 1 else seen[0][0]
        if t.shape != first.shape:
            raise SiteShapeError(f"site {site.name!r} (module {site.module!r}) ran {seen[1] + 1} times in one forward "
                                 f"with different shapes ({tuple(first.shape)}, then {tuple(t.shape)}), so its calls "
                                 "cannot be stacked into one capture: capture a site inside the module or one that "
                                 "runs once")
        if seen[1] == 1:
            buf = torch.empty((4, *t.shape), dtype=t.dtype, device=t.device)
            buf[0] = first
            seen[0] = buf
        elif seen[1] == seen[0].shape[0]:
            seen[0] = torch.cat([seen[0], torch.empty_like(seen[0])])
        seen[0][seen[1]] = t
        seen[1] += 1
        self[site.name], self.axes[site.name] = seen[0][:seen[1]], ("call", *site.axes)


def capture_entry(site: Site, cache: ActivationCache, dtype: torch.dtype | None = None,
                  offload: str | None = None, grad: bool = False, store=None) -> Entry:
    """An Entry that records what flows at `site` (after any edits there); `store(site, tensor)` replaces
    the default (stack repeated calls), e.g. sessions assembling a generated sequence."""
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
        if store is not None:
            store(site, kept)
        else:
            cache._store(site, kept, calls)
        return None

    return Entry(site, fn)
