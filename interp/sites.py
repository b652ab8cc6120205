"""Site grammar: canonical names, wildcards, raw module paths and "did you mean" errors."""
from __future__ import annotations

import difflib
import fnmatch
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from .errors import UnknownSiteError

RAW_PREFIX = "module:"


@dataclass(frozen=True)
class Site:
    """A named place where a tensor flows.

    module: dotted path of the module in the instrumented root ("" is the root itself).
    io: "output" reads the module's output, "input" its input.
    slot: which element: int index into a tuple output / positional args, or a kwarg name.
    arg_name: keyword under which the same input may be passed (inputs only).
    axes: names of the tensor's axes, batch first.
    heads: if set, the last axis is split into (heads, d_head) for this site.
    layer: block index the site belongs to (-1 before the first block, n_layers after the last).
    inplace: an input site whose tensor is also used by the module's caller after the call (the
      residual stream at `resid_mid` is both the norm's input and the residual that is added back):
      edits are written into that tensor in place so every consumer sees them.
    """

    name: str
    module: str
    io: str = "output"
    slot: int | str | None = 0
    arg_name: str | None = None
    axes: tuple[str, ...] = ("batch", "pos", "d_model")
    heads: int | None = None
    layer: int | None = None
    kind: str = ""
    meta: dict = field(default_factory=dict, compare=False, hash=False)
    inplace: bool = False  # edits are copied into the flowing tensor itself (see hooks._make_input_hook)

    @property
    def is_raw(self) -> bool:
        return self.name.startswith(RAW_PREFIX)


def parse_raw(name: str) -> tuple[str, str]:
    """'module:a.b.c[:input|:output][.N]' -> (path, io); see parse_raw_slot for the slot."""
    path, io, _ = parse_raw_slot(name)
    return path, io


def parse_raw_slot(name: str) -> tuple[str, str, int]:
    """'module:a.b.c[:input|:output][.N]' -> (path, io, slot): slot N of a tuple output / positional input."""
    body = name[len(RAW_PREFIX):]
    io, slot = "output", 0
    m = re.fullmatch(r"(.*):(input|output)(?:\.(\d+))?", body)
    if m:
        body, io, slot = m.group(1), m.group(2), int(m.group(3) or 0)
    return body, io, slot


class SiteTable:
    """All sites of one instrumented model, in forward order, plus aliases."""

    def __init__(self, sites: Iterable[Site], aliases: dict[str, str] | None = None,
                 module_names: Iterable[str] = (), block_paths: list[str] | None = None,
                 missing: dict[str, str] | None = None):
        self._sites: dict[str, Site] = {}
        self.missing = dict(missing or {})  # canonical names the adapter looked for and did not find -> why
        for s in sites:
            self._sites[s.name] = s
        self.aliases = dict(aliases or {})
        self.module_names = set(module_names)
        self.block_paths = list(block_paths or [])

    def __iter__(self):
        return iter(self._sites.values())

    def __len__(self) -> int:
        return len(self._sites)

    def __contains__(self, name: str) -> bool:
        try:
            self.resolve(name)
            return True
        except UnknownSiteError:
            return False

    def names(self) -> list[str]:
        return list(self._sites)

    def get(self, name: str) -> Site:
        sites = self.resolve(name)
        if len(sites) != 1:
            raise UnknownSiteError(f"{name!r} matches {len(sites)} sites; an op needs exactly one site "
                                   f"(first matches: {[s.name for s in sites[:5]]})")
        return sites[0]

    def resolve(self, pattern: str) -> list[Site]:
        """One name, alias, wildcard pattern or raw module path -> matching sites."""
        if pattern.startswith(RAW_PREFIX):
            return [self._raw(pattern)]
        if pattern in self._sites:
            return [self._sites[pattern]]
        if pattern in self.aliases:
            return [self._sites[self.aliases[pattern]]]
        if any(c in pattern for c in "*?["):
            hits = [s for n, s in self._sites.items() if fnmatch.fnmatchcase(n, pattern)]
            hits += [self._sites[t] for a, t in self.aliases.items()
                     if fnmatch.fnmatchcase(a, pattern) and self._sites[t] not in hits]
            if hits:
                return hits
        if pattern in self.missing:
            raise UnknownSiteError(f"site {pattern!r} is not available: {self.missing[pattern]}")
        raise UnknownSiteError(self._unknown_message(pattern))

    def _raw(self, pattern: str) -> Site:
        path, io, slot = parse_raw_slot(pattern)
        if RAW_PREFIX + path in self.missing:
            raise UnknownSiteError(f"raw site {pattern!r} is not available: {self.missing[RAW_PREFIX + path]}")
        if path not in self.module_names:
            close = difflib.get_close_matches(path, sorted(self.module_names), n=5, cutoff=0.5)
            raise UnknownSiteError(
                f"no module {path!r} in this model for raw site {pattern!r}. "
                f"Did you mean: {', '.join(RAW_PREFIX + c for c in close) or '(no close module paths)'}? "
                f"`interp sites MODEL --modules` lists every module path.")
        layer = None
        for i, bp in enumerate(self.block_paths):
            if path == bp or path.startswith(bp + "."):
                layer = i
        return Site(name=pattern, module=path, io=io, slot=slot, axes=("batch",), layer=layer, kind="raw")

    def _unknown_message(self, pattern: str) -> str:
        candidates = [*self._sites, *self.aliases]
        close = difflib.get_close_matches(pattern, candidates, n=5, cutoff=0.4)
        if not close:
            # fall back to a match on the last name component (e.g. 'resid_pre' typos)
            tail = pattern.rsplit(".", 1)[-1]
            close = [c for c in candidates if c.endswith(tail)][:5]
        generic = re.sub(r"\d+", "*", pattern)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        return (f"unknown site {pattern!r}.{hint} Patterns like {generic!r} take wildcards; raw module "
                f"paths are written 'module:path.to.module[:input|:output][.N]' (.N: slot N of a tuple); "
                f"`interp sites MODEL` lists all {len(self._sites)} sites.")


def sort_key(site: Site) -> tuple:
    layer = -1 if site.layer is None else site.layer
    return (layer, site.name)
