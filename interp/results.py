"""Labelled result arrays: a tensor with axis names and coordinates, saved as JSON + safetensors."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from interp import io as _io

FORMAT = "interp.result/1"


@dataclass
class Result:
    """values [*shape] with one name per axis and optional coordinates (labels) per axis."""

    values: torch.Tensor
    axes: tuple[str, ...]
    coords: dict[str, list] = field(default_factory=dict)
    attrs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        self.values = torch.as_tensor(self.values).detach().cpu()
        self.axes = tuple(self.axes)
        if self.values.dim() != len(self.axes):
            raise ValueError(f"Result has {self.values.dim()} dims but {len(self.axes)} axis names {self.axes}")
        for ax, c in self.coords.items():
            if ax not in self.axes:
                raise ValueError(f"coordinates for unknown axis {ax!r}; axes are {self.axes}")
            n = self.values.shape[self.axes.index(ax)]
            if len(c) != n:
                raise ValueError(f"axis {ax!r} has {n} entries but {len(c)} coordinates")
            self.coords[ax] = [c_.item() if hasattr(c_, "item") else c_ for c_ in c]

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.values.shape)

    def coord(self, axis: str) -> list:
        return self.coords.get(axis, list(range(self.values.shape[self.axes.index(axis)])))

    def sel(self, **index) -> "Result":
        """Select by coordinate label (or integer position when the axis has no labels)."""
        vals, axes, coords = self.values, list(self.axes), dict(self.coords)
        for ax, label in index.items():
            i = axes.index(ax)
            labels = self.coord(ax)
            pos = labels.index(label) if label in labels else int(label)
            vals = vals.select(i, pos)
            axes.pop(i)
            coords.pop(ax, None)
        return Result(vals, tuple(axes), coords, dict(self.attrs))

    def to_dataframe(self, value_name: str = "value"):
        import pandas as pd

        grids = torch.meshgrid(*[torch.arange(n) for n in self.values.shape], indexing="ij") if self.values.dim() else []
        data = {ax: [self.coord(ax)[i] for i in g.reshape(-1).tolist()] for ax, g in zip(self.axes, grids)}
        data[value_name] = self.values.reshape(-1).float().tolist()
        return pd.DataFrame(data)

    def top(self, k: int = 5, largest: bool = True) -> list[tuple[dict, float]]:
        """The k largest (or smallest) cells as ({axis: label}, value)."""
        flat = self.values.reshape(-1).float()
        k = min(k, flat.numel())
        vals, idx = flat.topk(k, largest=largest)
        out = []
        for v, i in zip(vals.tolist(), idx.tolist()):
            where, rem = {}, i
            for ax, n in reversed(list(zip(self.axes, self.values.shape))):
                where[ax] = self.coord(ax)[rem % n]
                rem //= n
            out.append((dict(reversed(list(where.items()))), v))
        return out

    # -- disk ----------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        """Write `path` (.json metadata) and its .safetensors sibling atomically; returns the JSON path."""
        from safetensors.torch import save_file

        base = Path(path)
        base = base.with_suffix("") if base.suffix in (".json", ".safetensors") else base
        base.parent.mkdir(parents=True, exist_ok=True)
        meta = {"format": FORMAT, "axes": list(self.axes), "coords": self.coords, "attrs": jsonable(self.attrs),
                "dtype": str(self.values.dtype), "shape": list(self.values.shape)}
        js, st = base.with_suffix(".json"), base.with_suffix(".safetensors")
        atomic_write(st, lambda p: save_file({"values": self.values.contiguous()}, str(p)))
        _io.atomic_write_text(js, json.dumps(meta, indent=1))
        return js

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Result":
        from safetensors.torch import load_file

        base = Path(path)
        base = base.with_suffix("") if base.suffix in (".json", ".safetensors") else base
        meta = json.loads(base.with_suffix(".json").read_text())
        if meta.get("format") != FORMAT:
            raise ValueError(f"{base}.json is not an interp result (format {meta.get('format')!r})")
        values = load_file(str(base.with_suffix(".safetensors")))["values"]
        return cls(values, tuple(meta["axes"]), meta["coords"], meta["attrs"])

    # -- pictures ------------------------------------------------------------------------------
    def plot(self, path: str | os.PathLike, title: str | None = None, cmap: str = "RdBu_r",
             center: bool = True) -> Path:
        """Heatmap PNG of a 2-D result (rows = first axis), or an image grid of [n, C, H, W] images."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        v = self.values.float()
        if v.dim() == 4 and v.shape[1] in (1, 3):
            return image_grid(v, path, labels=[str(c) for c in self.coord(self.axes[0])], title=title)
        if v.dim() == 1:
            v = v[None]
        if v.dim() != 2:
            raise ValueError(f"plot() draws 2-D results or image batches; this one has axes {self.axes}: "
                             "use .sel(...) to fix the other axes first")
        rows = self.coord(self.axes[0]) if self.values.dim() == 2 else [""]
        cols = self.coord(self.axes[-1])
        fig, ax = plt.subplots(figsize=(max(4, 0.45 * len(cols) + 2), max(3, 0.3 * len(rows) + 1.5)))
        lim = float(v.abs().max()) or 1.0
        im = ax.imshow(v.numpy(), aspect="auto", cmap=cmap, vmin=-lim if center else None, vmax=lim if center else None)
        ax.set_xticks(range(len(cols)), [str(c) for c in cols], rotation=60, ha="right", fontsize=7)
        ax.set_yticks(range(len(rows)), [str(r) for r in rows], fontsize=7)
        ax.set_xlabel(self.axes[-1])
        if self.values.dim() == 2:
            ax.set_ylabel(self.axes[0])
        fig.colorbar(im, ax=ax, label=self.attrs.get("metric", "value"))
        ax.set_title(title or self.attrs.get("title", ""), fontsize=9)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path


def image_grid(images: torch.Tensor, path: str | os.PathLike, labels: Sequence[str] | None = None,
               ncol: int | None = None, title: str | None = None) -> Path:
    """Save [n, C, H, W] images in [0, 1] (or [-1, 1]) as one PNG grid with optional labels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    imgs = images.detach().float().cpu()
    if imgs.min() < 0:
        imgs = (imgs + 1) / 2
    imgs = imgs.clamp(0, 1)
    n = imgs.shape[0]
    ncol = ncol or min(n, 8)
    nrow = (n + ncol - 1) // ncol
    fig, axes = plt.subplots(nrow, ncol, figsize=(1.6 * ncol, 1.8 * nrow + (0.3 if title else 0)), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < n:
            im = imgs[i].permute(1, 2, 0).numpy()
            ax.imshow(im.squeeze(-1) if im.shape[-1] == 1 else im, cmap="gray" if im.shape[-1] == 1 else None,
                      interpolation="nearest")
            if labels is not None and i < len(labels):
                ax.set_title(str(labels[i]), fontsize=6)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def atomic_write(dest: Path, write) -> None:
    """Call write(tmp_path) on a temporary file beside `dest`, then rename it into place (never a partial `dest`)."""
    _io.atomic_write(dest, write)


jsonable = _io.jsonable  # the one JSON helper (non-finite floats as strings)
