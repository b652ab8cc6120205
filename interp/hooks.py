"""The only place in interp where torch hooks are registered.

`attached(root, entries)` registers one torch hook per (module, io) pair, chains every entry
for that pair inside it, and removes all of them in `finally` — also on KeyboardInterrupt.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from .sites import Site

SiteFn = Callable[[torch.Tensor], "torch.Tensor | None"]


class StopForward(Exception):
    """Raised by a hook to end a forward pass early once it has what it needs."""


@dataclass
class Entry:
    site: Site
    fn: SiteFn            # receives the site tensor (heads split if site.heads), returns a replacement or None
    raw_io: bool = False  # fn receives (args, kwargs) or output untouched (used for call-argument capture)


def _first_tensor(x):
    return x[0] if isinstance(x, (tuple, list)) else x


def read_output(site: Site, output):
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)):
        return output[site.slot if isinstance(site.slot, int) else 0]
    if hasattr(output, "__getitem__") and isinstance(site.slot, str):  # ModelOutput / dict
        return output[site.slot]
    if hasattr(output, "sample"):  # diffusers outputs
        return output.sample
    return output


def write_output(site: Site, output, value):
    if isinstance(output, torch.Tensor):
        return value
    if isinstance(output, tuple):
        i = site.slot if isinstance(site.slot, int) else 0
        return (*output[:i], value, *output[i + 1:])
    if isinstance(output, list):
        out = list(output)
        out[site.slot if isinstance(site.slot, int) else 0] = value
        return out
    if hasattr(output, "__setitem__") and isinstance(site.slot, str):
        output[site.slot] = value
        return output
    if hasattr(output, "sample"):
        output.sample = value
        return output
    return value


def read_input(site: Site, args, kwargs):
    slot = site.slot if site.slot is not None else 0
    if isinstance(slot, int) and len(args) > slot:
        return args[slot]
    name = site.arg_name or (slot if isinstance(slot, str) else None)
    if name is not None and name in kwargs:
        return kwargs[name]
    raise RuntimeError(f"site {site.name!r}: module {site.module!r} was called without input "
                       f"#{slot}{f' / {name!r}' if name else ''}")


def write_input(site: Site, args, kwargs, value):
    slot = site.slot if site.slot is not None else 0
    if isinstance(slot, int) and len(args) > slot:
        args = (*args[:slot], value, *args[slot + 1:])
    else:
        kwargs = dict(kwargs)
        kwargs[site.arg_name or slot] = value
    return args, kwargs


def _split_heads(site: Site, t: torch.Tensor) -> torch.Tensor:
    if site.heads is None:
        return t
    return t.unflatten(-1, (site.heads, t.shape[-1] // site.heads))


def _merge_heads(site: Site, t: torch.Tensor) -> torch.Tensor:
    return t if site.heads is None else t.flatten(-2)


def _apply(entries: list[Entry], t: torch.Tensor, lead: dict | None = None) -> torch.Tensor | None:
    """lead: for a site whose module sees the tokens flattened to [batch*pos, d] (Site.meta["unflat"]), the
    [batch, pos] shape its block was called with: the hooks see the [batch, pos, d] view of the same storage."""
    site = entries[0].site
    flat = t
    if lead is not None and t.dim() == 2 and "shape" in lead:
        t = t.view(*lead["shape"], t.shape[-1])
    view = _split_heads(site, t)
    changed = False
    for e in entries:
        new = e.fn(view)
        if new is not None:
            view, changed = new, True
    if not changed:
        return None
    out = _merge_heads(site, view)
    return out if t is flat else out.reshape(flat.shape)


def _lead_recorder(lead: dict):
    """A pre-hook on a block that records the [batch, pos] shape of its hidden states (see _apply)."""
    def hook(module, args, kwargs):
        t = args[0] if args else kwargs.get("hidden_states")
        if isinstance(t, torch.Tensor):
            lead["shape"] = tuple(t.shape[:-1])
    return hook


def _make_output_hook(entries: list[Entry], lead: dict | None = None):
    def hook(module, args, kwargs, output):
        raw = [e for e in entries if e.raw_io]
        for e in raw:
            e.fn((args, kwargs, output))
        site_entries = [e for e in entries if not e.raw_io]
        if not site_entries:
            return None
        t = read_output(site_entries[0].site, output)
        new = _apply(site_entries, t, lead)
        return None if new is None else write_output(site_entries[0].site, output, new)
    return hook


def _make_input_hook(entries: list[Entry], lead: dict | None = None):
    def hook(module, args, kwargs):
        for e in entries:
            if e.raw_io:
                e.fn((args, kwargs, None))
        site_entries = [e for e in entries if not e.raw_io]
        if not site_entries:
            return None
        site = site_entries[0].site
        t = read_input(site, args, kwargs)
        new = _apply(site_entries, t, lead)
        if new is not None and site.inplace:
            with torch.no_grad():
                t.copy_(new)
            return None
        return None if new is None else write_input(site, args, kwargs, new)
    return hook


def _recorders_last(module: nn.Module) -> None:
    """transformers (>= 5) collects `hidden_states` / `attentions` with forward hooks it installs once, at a
    model's first forward; they must see interp's edits (pipelines read e.g. CLIP's hidden_states[-2]),
    so they are moved behind the hook just registered."""
    hooks = module._forward_hooks
    for k in [k for k, h in hooks.items() if getattr(h, "__name__", "") == "output_capturing_hook"]:
        hooks.move_to_end(k)  # type: ignore[attr-defined]  # torch keeps hooks in an OrderedDict


@contextlib.contextmanager
def attached(root: nn.Module, entries: list[Entry]) -> Iterator[None]:
    """Register `entries` on `root`'s modules for the duration of the block; always removed."""
    groups: dict[tuple, list[Entry]] = {}
    for e in entries:  # one torch hook per (module, io, slot, head split); torch chains them in order
        groups.setdefault((e.site.module, e.site.io, e.site.slot, e.site.heads), []).append(e)
    handles = []
    try:
        for (path, io, _, _), group in groups.items():
            module = root.get_submodule(path) if path else root
            lead: dict | None = None
            if group[0].site.meta.get("unflat"):  # the module runs on flattened tokens: record its block's shape
                lead = {}
                block = root.get_submodule(group[0].site.meta["unflat"])
                handles.append(block.register_forward_pre_hook(_lead_recorder(lead), with_kwargs=True))
            if io == "output":
                handles.append(module.register_forward_hook(_make_output_hook(group, lead), with_kwargs=True))
                _recorders_last(module)
            else:
                handles.append(module.register_forward_pre_hook(_make_input_hook(group, lead), with_kwargs=True))
        yield
    finally:
        for h in handles:
            h.remove()


def hook_count(root: nn.Module) -> int:
    """Number of forward (pre-)hooks on `root` and its submodules — 0 when interp is not running."""
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in root.modules())
