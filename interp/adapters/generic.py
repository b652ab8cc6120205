"""Any nn.Module: every submodule that runs is a site through its raw path (`module:path[:input|:output][.N]`).

`.N` picks slot N of a tuple output (or positional input N): `module:attn:output.1`. Containers
(ModuleList, ModuleDict) never run themselves, so they are not sites; asking for one says which of its
children to use instead.
"""
from __future__ import annotations

from torch import nn

from ..sites import RAW_PREFIX, Site, SiteTable
from .base import Adapter, module_paths

CONTAINERS = (nn.ModuleList, nn.ModuleDict)


def containers(root: nn.Module) -> dict[str, str]:
    """'module:path' -> why it is no site, for every container module under root."""
    out = {}
    for path, m in root.named_modules():
        if path and isinstance(m, CONTAINERS):
            kids = [f"{RAW_PREFIX}{path}.{k}" for k, _ in list(m.named_children())[:3]]
            out[RAW_PREFIX + path] = (f"{path!r} is a {type(m).__name__}, a container that never runs itself, so "
                                      f"no tensor flows through it; use one of its children: {', '.join(kids)}"
                                      f"{', ...' if len(m) > 3 else ''}")
    return out


class GenericAdapter(Adapter):
    family = "generic"

    def site_table(self) -> SiteTable:
        skip = containers(self.root)
        paths = [p for p in module_paths(self.root) if RAW_PREFIX + p not in skip]
        sites = [Site(f"{RAW_PREFIX}{p}", p, axes=("batch",), kind="raw") for p in paths]
        return SiteTable(sites, module_names=paths, missing=skip)

    def prepare(self, inputs, pad: bool = False):
        prepared = super().prepare(inputs, pad)
        # a module's axis 1 is not necessarily the input's: resolve positions on each site's own tensor
        # the engine reads site_view with getattr (Prepared declares none; DenoiserPrepared defines it as a method)
        prepared.site_view = lambda site: [None]  # type: ignore[attr-defined]
        return prepared
