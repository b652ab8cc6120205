"""Any nn.Module: every submodule is a site through its raw path (`module:path[:input]`)."""
from __future__ import annotations

from ..sites import RAW_PREFIX, Site, SiteTable
from .base import Adapter, module_paths


class GenericAdapter(Adapter):
    family = "generic"

    def site_table(self) -> SiteTable:
        paths = module_paths(self.root)
        sites = [Site(f"{RAW_PREFIX}{p}", p, axes=("batch",), kind="raw") for p in paths]
        return SiteTable(sites, module_names=paths)

    def prepare(self, inputs, pad: bool = False):
        prepared = super().prepare(inputs, pad)
        # a module's axis 1 is not necessarily the input's: resolve positions on each site's own tensor
        prepared.site_view = lambda site: [None]
        return prepared
