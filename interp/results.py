"""Labelled result arrays: a tensor with axis names and coordinates, saved as JSON + safetensors."""
from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from interp import io as _io

FORMAT = "interp.result/1"


@dataclass(eq=False)
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

    def __eq__(self, other: object) -> bool:
        """Same axes, coordinates, attrs, dtype and values (bit for bit; NaN equals NaN)."""
        if not isinstance(other, Result):
            return NotImplemented
        a, b = self.values, other.values
        same = a.shape == b.shape and a.dtype == b.dtype and bool(
            torch.equal(a, b) or (a.is_floating_point() and torch.equal(a.isnan(), b.isnan())
                                  and torch.equal(a.nan_to_num(0.0), b.nan_to_num(0.0))))
        return same and self.axes == other.axes and self.coords == other.coords and \
            jsonable(self.attrs) == jsonable(other.attrs)

    __hash__ = None  # type: ignore[assignment]  # mutable, like a tensor

    def __repr__(self) -> str:
        dims = " x ".join(f"{ax}={n}" for ax, n in zip(self.axes, self.values.shape)) or "scalar"
        v = self.values.float()
        rng = f", min {float(v.min()):.4g}, max {float(v.max()):.4g}" if v.numel() else ""
        what = self.attrs.get("metric") or self.attrs.get("title")
        return f"Result({dims}, {str(self.values.dtype).replace('torch.', '')}{rng}" + \
            (f", metric {what!r}" if what else "") + ")"

    def _repr_html_(self) -> str:
        """Jupyter shows a Result as its interactive report (heatmap with hover values, or an image grid)."""
        from .report import result_fragment

        return result_fragment(self)

    def to_html(self, path: str | os.PathLike | None = None, command: str | None = None) -> str:
        """One self-contained HTML page (no network): the heatmap or images, settings, and the command that made
        it. Written to `path` when given; the page text is returned either way."""
        from .report import page

        html = page([("", self)], title=str(self.attrs.get("title") or self.attrs.get("metric") or "interp result"),
                    command=command or self.attrs.get("command"))
        if path is not None:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            atomic_write(Path(path), lambda p: Path(p).write_text(html, encoding="utf-8"))
        return html

    def coord(self, axis: str) -> list:
        return self.coords.get(axis, list(range(self.values.shape[self.axes.index(axis)])))

    def sel(self, **index) -> Result:
        """Select by coordinate label, by token text of a position label ("3: of" answers pos=" of" and
        pos="3: of"), or by integer position."""
        vals, axes, coords = self.values, list(self.axes), dict(self.coords)
        for ax, label in index.items():
            if ax not in axes:
                raise KeyError(f"sel({ax}=...): no axis {ax!r}; axes are {tuple(axes)}")
            i = axes.index(ax)
            pos = self._index(ax, label)
            vals = vals.select(i, pos)
            axes.pop(i)
            coords.pop(ax, None)
        return Result(vals, tuple(axes), coords, dict(self.attrs))

    def _index(self, ax: str, label) -> int:
        labels = self.coord(ax)
        if label in labels:
            return labels.index(label)
        if isinstance(label, str):
            hits = [k for k, c in enumerate(labels) if isinstance(c, str) and _token_of(c) == label]
            if len(hits) == 1:
                return hits[0]
            if len(hits) > 1:
                raise KeyError(f"sel({ax}={label!r}) is ambiguous: {[labels[k] for k in hits]} all hold it; "
                               "give the full label")
            shown = labels if len(labels) <= 12 else [*labels[:12], "..."]
            raise KeyError(f"sel({ax}={label!r}): no such label; the labels are {shown}")
        if isinstance(label, int) and -len(labels) <= label < len(labels):
            return label % len(labels)
        raise KeyError(f"sel({ax}={label!r}): axis {ax!r} has {len(labels)} entries")

    def to_dataframe(self, value_name: str = "value"):
        import pandas as pd

        axes = [torch.arange(n) for n in self.values.shape]
        grids = torch.meshgrid(*axes, indexing="ij") if self.values.dim() else []
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
    def load(cls, path: str | os.PathLike) -> Result:
        from safetensors.torch import load_file

        base = Path(path)
        base = base.with_suffix("") if base.suffix in (".json", ".safetensors") else base
        meta = json.loads(base.with_suffix(".json").read_text())
        if meta.get("format") != FORMAT:
            raise ValueError(f"{base}.json is not an interp result (format {meta.get('format')!r})")
        values = load_file(str(base.with_suffix(".safetensors")))["values"]
        return cls(values, tuple(meta["axes"]), meta["coords"], meta["attrs"])

    # -- pictures ------------------------------------------------------------------------------
    def _ci_note(self) -> str:
        """' (mean; 95% CI half-width up to x)' when attrs hold ci_low / ci_high, else ''."""
        lo, hi = self.attrs.get("ci_low"), self.attrs.get("ci_high")
        if lo is None or hi is None:
            return ""
        width = (torch.as_tensor(hi).float() - torch.as_tensor(lo).float()).abs()
        if width.numel() == 0:
            return ""
        return f" (mean; {float(self.attrs.get('level', 0.95)):.0%} CI half-width up to {float(width.max()) / 2:.3g})"

    def plot(self, path: str | os.PathLike, title: str | None = None, cmap: str = "RdBu_r",
             center: bool = True) -> Path:
        """Heatmap PNG of a 2-D result (rows = first axis), or an image grid of [n, C, H, W] images.

        Drawn on a matplotlib Figure object (no pyplot, so a notebook's backend is left alone); the title
        wraps, and nothing (title, tick labels, colour-bar label) is clipped."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        v = self.values.float()
        title = title if title is not None else self.attrs.get("title", "")
        if v.dim() == 4 and v.shape[1] in (1, 3):
            return image_grid(v, path, labels=[str(c) for c in self.coord(self.axes[0])], title=title)
        if v.dim() == 1:
            v = v[None]
        if v.dim() != 2:
            raise ValueError(f"plot() draws 2-D results or image batches; this one has axes {self.axes}: "
                             "use .sel(...) to fix the other axes first")
        rows = self.coord(self.axes[0]) if self.values.dim() == 2 else [""]
        cols = self.coord(self.axes[-1])
        fig = _figure(max(4.5, 0.45 * len(cols) + 2), max(3, 0.3 * len(rows) + 1.8))
        ax = fig.add_subplot()
        lim = float(v.abs().nan_to_num(0).max()) or 1.0
        im = ax.imshow(v.numpy(), aspect="auto", cmap=cmap, vmin=-lim if center else None, vmax=lim if center else None)
        ax.set_xticks(range(len(cols)), [str(c) for c in cols], rotation=60, ha="right", fontsize=7)
        ax.set_yticks(range(len(rows)), [str(r) for r in rows], fontsize=7)
        ax.set_xlabel(self.axes[-1])
        if self.values.dim() == 2:
            ax.set_ylabel(self.axes[0])
        fig.colorbar(im, ax=ax, label=_wrap(str(self.attrs.get("metric", "value")) + self._ci_note(), 40))
        ax.set_title(_wrap(title, max(40, int(fig.get_figwidth() * 14))), fontsize=8)
        fig.savefig(path, dpi=120, bbox_inches="tight")
        return path


def figure(width: float, height: float):
    """A matplotlib Figure with constrained layout, not registered with pyplot (no backend switch)."""
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


_figure = figure


def save_figure(fig, path: str | os.PathLike) -> Path:
    """Write `fig` as a PNG at `path` (parent folders made), nothing clipped; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return path


def _wrap(text: str, width: int) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(text, width)) if text else ""


def image_grid(images: torch.Tensor, path: str | os.PathLike, labels: Sequence[str] | None = None,
               ncol: int | None = None, title: str | None = None) -> Path:
    """Save [n, C, H, W] images in [0, 1] (or [-1, 1]) as one PNG grid with optional labels."""
    imgs = images.detach().float().cpu()
    if imgs.min() < 0:
        imgs = (imgs + 1) / 2
    imgs = imgs.clamp(0, 1)
    n = imgs.shape[0]
    ncol = ncol or min(n, 8)
    nrow = (n + ncol - 1) // ncol
    fig = _figure(max(1.8 * ncol, 3), 1.9 * nrow + (0.4 if title else 0))
    axes = fig.subplots(nrow, ncol, squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < n:
            im = imgs[i].permute(1, 2, 0).numpy()
            ax.imshow(im.squeeze(-1) if im.shape[-1] == 1 else im, cmap="gray" if im.shape[-1] == 1 else None,
                      interpolation="nearest")
            if labels is not None and i < len(labels):
                ax.set_title(_wrap(str(labels[i]), 22), fontsize=6)
    if title:
        fig.suptitle(_wrap(title, max(30, int(fig.get_figwidth() * 13))), fontsize=8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return path


def atomic_write(dest: Path, write) -> None:
    """Call write(tmp_path) on a temporary file beside `dest`, then rename it into place (never a partial `dest`)."""
    _io.atomic_write(dest, write)


def _token_of(label: str) -> str:
    """The token text of a position label "3: of" / "1: E*" (the subject mark) -> " of" / " E"."""
    head, sep, rest = label.partition(":")
    if not sep or not head.strip().lstrip("-").isdigit():
        return label
    return rest[:-1] if rest.endswith("*") else rest


jsonable = _io.jsonable  # the one JSON helper (non-finite floats as strings)
