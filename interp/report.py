"""Self-contained HTML reports of Results: one page, no network (inline CSS, SVG heatmaps, a little inline JS,
images as data URIs).

- `result_fragment(result)`: a <div> for one Result (2-D / 1-D: heatmap with axis labels and hover values;
  [n, C, H, W]: an image grid), with its settings (attrs). Jupyter shows it via `Result._repr_html_`.
- `page(sections, title, command)`: the whole page; `Result.to_html()` uses it.
- `report_dir(folder)`: `interp report DIR`: every saved Result in a folder, its PNGs and summary.json.
"""
from __future__ import annotations

import base64
import html
import io
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .results import FORMAT, Result, jsonable

CELL_W, CELL_H, MAX_CELLS = 34, 18, 40_000

STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px;color:#222;max-width:1400px}
h1{font-size:20px}h2{font-size:16px;margin-top:28px}code,pre{background:#f4f4f4;padding:2px 4px;border-radius:3px}
pre{padding:8px;overflow-x:auto;white-space:pre-wrap}
.interp-result{margin:12px 0 28px 0}.interp-axes{font-size:12px;color:#555}
.interp-hover{font:13px monospace;min-height:18px;color:#333;margin:4px 0}
table.interp-settings{border-collapse:collapse;font-size:12px;margin-top:8px}
table.interp-settings td{border:1px solid #ddd;padding:2px 6px;vertical-align:top}
.interp-images{display:flex;flex-wrap:wrap;gap:8px}.interp-images figure{margin:0;text-align:center;font-size:11px}
.interp-images img{image-rendering:pixelated;width:128px;height:128px;border:1px solid #ccc}
svg.interp-heatmap rect.c:hover{stroke:#000;stroke-width:2}
"""

# One delegated listener: a cell's data-v / data-r / data-c are shown in the readout of its result.
SCRIPT = """
document.addEventListener('mouseover', function (e) {
  var t = e.target;
  if (!t || !t.getAttribute || t.getAttribute('class') !== 'c') return;
  var box = t.closest('.interp-result');
  if (!box) return;
  var out = box.querySelector('.interp-hover');
  if (out) out.textContent = t.getAttribute('data-r') + ' | ' + t.getAttribute('data-c') + ' : ' +
    t.getAttribute('data-v');
});
"""


def _colour(x: float, lo: float, hi: float, centre: bool) -> str:
    """Diverging blue-white-red (centred at 0) or white-to-purple (sequential) as #rrggbb."""
    if not math.isfinite(x):
        return "#bbbbbb"
    if centre:
        lim = max(abs(lo), abs(hi)) or 1.0
        t = max(-1.0, min(1.0, x / lim))
        a, b = ((33, 102, 172), (178, 24, 43))
        end = b if t > 0 else a
        t = abs(t)
    else:
        t = 0.0 if hi == lo else (x - lo) / (hi - lo)
        end = (63, 0, 125)
    r, g, bl = (round(255 + (e - 255) * t) for e in end)
    return f"#{r:02x}{g:02x}{bl:02x}"


def _esc(x: Any) -> str:
    return html.escape(str(x), quote=True)


def heatmap_svg(res: Result) -> str:
    """An inline SVG heatmap of a 1-D or 2-D Result: token / layer labels on the axes, one <rect> per cell whose
    <title> and data-v hold the value."""
    v = res.values.float()
    v = v[None] if v.dim() == 1 else v
    rows = res.coord(res.axes[0]) if res.values.dim() == 2 else [""]
    cols = res.coord(res.axes[-1])
    if v.numel() > MAX_CELLS:
        raise ValueError(f"heatmap of {v.numel()} cells is too large for a page (max {MAX_CELLS}); .sel() a part")
    finite = v[torch.isfinite(v)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.numel() else (0.0, 1.0)
    centre = lo < 0 < hi or bool(res.attrs.get("normalized"))
    left = 12 + 7 * max((len(str(r)) for r in rows), default=1)
    bottom = 14 + 6 * max((len(str(c)) for c in cols), default=1)
    top = 4
    width, height = left + CELL_W * len(cols) + bottom // 2 + 10, top + CELL_H * len(rows) + bottom
    scale = ("blue &lt; 0 &lt; red, white = 0" if centre else "white = lowest, purple = highest")
    rows_name = f"rows: {_esc(res.axes[0])}, " if res.values.dim() == 2 else ""
    out = [f'<p class="interp-axes">{rows_name}columns: {_esc(res.axes[-1])}; colour: '
           f'{_esc(res.attrs.get("metric", "value"))} from {lo:.4g} to {hi:.4g} ({scale}); hover a cell for its '
           f'value</p><svg class="interp-heatmap" xmlns="http://www.w3.org/2000/svg" width="{width}" '
           f'height="{height}" role="img" aria-label="{_esc(res.attrs.get("metric", "heatmap"))}">']
    lo_ci, hi_ci = _interval(res, tuple(v.shape))
    for i, r in enumerate(rows):
        y = top + CELL_H * i
        out.append(f'<text x="{left - 4}" y="{y + CELL_H - 5}" font-size="11" text-anchor="end">{_esc(r)}</text>')
        for j, c in enumerate(cols):
            x, val = left + CELL_W * j, float(v[i, j])
            shown = f"{val:.6g}" if lo_ci is None else \
                f"{val:.6g} [{float(lo_ci[i, j]):.4g}, {float(hi_ci[i, j]):.4g}]"
            out.append(f'<rect class="c" x="{x}" y="{y}" width="{CELL_W}" height="{CELL_H}" '
                       f'fill="{_colour(val, lo, hi, centre)}" data-r="{_esc(r)}" data-c="{_esc(c)}" '
                       f'data-v="{shown}"><title>{_esc(r)} | {_esc(c)}: {shown}</title></rect>')
    y0 = top + CELL_H * len(rows) + 8
    for j, c in enumerate(cols):
        x = left + CELL_W * j + CELL_W // 2
        out.append(f'<text x="{x}" y="{y0}" font-size="11" transform="rotate(60 {x} {y0})">{_esc(c)}</text>')
    out.append("</svg>")
    return "".join(out)


def _interval(res: Result, shape: tuple) -> tuple:
    """attrs ci_low / ci_high of the values' shape (pair sweeps, multi-seed traces), else (None, None)."""
    lo, hi = res.attrs.get("ci_low"), res.attrs.get("ci_high")
    if lo is None or hi is None:
        return None, None
    lo, hi = torch.as_tensor(lo).float(), torch.as_tensor(hi).float()
    lo, hi = (lo[None], hi[None]) if lo.dim() == 1 else (lo, hi)
    return (lo, hi) if tuple(lo.shape) == shape == tuple(hi.shape) else (None, None)


def png_data_uri(image) -> str:
    """An HxWxC float array in [0, 1] (or a PNG file path) -> data:image/png;base64,..."""
    if isinstance(image, (str, Path)):
        data = Path(image).read_bytes()
    else:
        from PIL import Image

        arr = (torch.as_tensor(image).float().clamp(0, 1) * 255).round().to(torch.uint8).numpy()
        buf = io.BytesIO()
        Image.fromarray(arr.squeeze(-1) if arr.shape[-1] == 1 else arr).save(buf, format="PNG")
        data = buf.getvalue()
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def images_html(res: Result) -> str:
    imgs = res.values.float()
    imgs = (imgs + 1) / 2 if imgs.min() < 0 else imgs
    labels = res.coord(res.axes[0])
    cells = [f'<figure><img alt="{_esc(l)}" src="{png_data_uri(im.permute(1, 2, 0))}">'
             f'<figcaption>{_esc(l)}</figcaption></figure>' for im, l in zip(imgs, labels)]
    return f'<div class="interp-images">{"".join(cells)}</div>'


def settings_html(attrs: dict) -> str:
    rows = []
    for k, v in jsonable(attrs).items():
        text = v if isinstance(v, str) else json.dumps(v, default=str)
        text = text if len(text) <= 600 else text[:600] + " ..."
        rows.append(f"<tr><td>{_esc(k)}</td><td><code>{_esc(text)}</code></td></tr>")
    return f'<table class="interp-settings">{"".join(rows)}</table>' if rows else ""


def result_fragment(res: Result, name: str = "") -> str:
    """One Result as a <div>: heatmap or images, hover readout, settings; its own <style>/<script> for Jupyter."""
    v = res.values
    if v.dim() == 4 and v.shape[1] in (1, 3):
        body = images_html(res)
    elif v.dim() in (1, 2):
        body = heatmap_svg(res)
    else:
        body = f"<p>{_esc(repr(res))}: pick two axes with .sel(...) to draw it</p>"
    title = res.attrs.get("title") or res.attrs.get("metric") or ""
    head = f"<h2>{_esc(name)}</h2>" if name else ""
    return (f'<div class="interp-result">{head}<p>{_esc(title)}</p><div class="interp-hover"></div>{body}'
            f'{settings_html(res.attrs)}<style>{STYLE}</style><script>{SCRIPT}</script></div>')


def page(sections: Sequence[tuple[str, Any]], title: str, command: str | None = None,
         summary: dict | None = None) -> str:
    """A whole page: (name, Result) or (name, PNG path) sections, the command and a summary."""
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{_esc(title)}</title>"
             f"<style>{STYLE}</style></head><body><h1>{_esc(title)}</h1>"]
    if command:
        parts.append(f"<p>Produced by</p><pre>{_esc(command)}</pre>")
    if summary:
        parts.append(f"<h2>summary</h2>{settings_html(summary)}")
    for name, item in sections:
        if isinstance(item, Result):
            parts.append(result_fragment(item, name).replace(f"<style>{STYLE}</style><script>{SCRIPT}</script>", ""))
        else:
            parts.append(f'<div class="interp-result"><h2>{_esc(name)}</h2><img alt="{_esc(name)}" '
                         f'style="max-width:100%" src="{png_data_uri(item)}"></div>')
    parts.append(f"<script>{SCRIPT}</script></body></html>")
    return "".join(parts)


def report_dir(folder: str | Path, out: str | Path | None = None) -> Path:
    """Write `folder/report.html` (or `out`) for a folder of saved Results (+ summary.json, image PNGs)."""
    from .errors import InterpError

    folder = Path(folder)
    if not folder.is_dir():
        raise InterpError(f"{str(folder)!r} is not a folder; give the --out folder of an interp command")
    sections: list[tuple[str, Any]] = []
    for js in sorted(folder.glob("*.json")):
        try:
            meta = json.loads(js.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue
        if isinstance(meta, dict) and meta.get("format") == FORMAT and js.with_suffix(".safetensors").exists():
            sections.append((js.stem, Result.load(js)))
    drawn = {name for name, _ in sections}
    sections += [(png.stem, png) for png in sorted(folder.glob("*.png")) if png.stem not in drawn]
    if not sections:
        raise InterpError(f"{str(folder)!r} holds no saved interp Result (*.json + *.safetensors) and no PNG")
    summary = json.loads((folder / "summary.json").read_text()) if (folder / "summary.json").exists() else None
    command = summary.pop("command", None) if isinstance(summary, dict) else None
    html_text = page(sections, title=f"interp report: {folder.name}", command=command, summary=summary)
    dest = Path(out) if out is not None else folder / "report.html"
    dest.write_text(html_text, encoding="utf-8")
    return dest
