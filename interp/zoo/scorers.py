"""Ground-truth scorers without neural networks.

Images: float arrays or tensors in [0, 1], either one image (H, W, 3) / (3, H, W) or a batch
(N, H, W, 3) / (N, 3, H, W). Pass ``value_range=(-1, 1)`` for model outputs in [-1, 1].
A PIL image or a list of PIL images (what diffusers pipelines return) is accepted too.

The shape mask is every pixel whose brightest channel exceeds ``MASK_THRESHOLD`` (background is
black). Colour = circular mean of the HSV hue inside the mask, weighted by saturation x value,
then the nearest of the six named hues. Shape = template match (IoU) of the mask, cropped to its
bounding box and resized to 16x16, against the four shapes rendered the same way.
Physics: ``fit_kappa`` fits the diffusivity from the growth of a field's spatial variance.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from . import shapes as S

MASK_THRESHOLD = 0.25
_TEMPLATE_RES = 16


# ----------------------------------------------------------------------------- image handling
def as_images(images: Any, value_range: tuple[float, float] = (0.0, 1.0)) -> np.ndarray:
    """Anything image-like -> float32 array (N, H, W, 3) in [0, 1]."""
    if hasattr(images, "images"):  # a diffusers pipeline output
        images = images.images
    if isinstance(images, (list, tuple)):
        if not images:
            return np.zeros((0, 1, 1, 3), np.float32)
        return np.concatenate([as_images(im, value_range) for im in images])
    if hasattr(images, "convert") and hasattr(images, "size"):  # PIL
        arr = np.asarray(images.convert("RGB"), dtype=np.float32) / 255.0
        return arr[None]
    if hasattr(images, "detach"):
        images = images.detach().float().cpu().numpy()
    arr = np.asarray(images, dtype=np.float32)
    lo, hi = value_range
    if (lo, hi) != (0.0, 1.0):
        arr = (arr - lo) / (hi - lo)
    if arr.ndim == 3:
        arr = arr[None]
    if arr.ndim != 4:
        raise ValueError(f"expected an image or a batch of images, got shape {arr.shape}")
    if arr.shape[1] == 3 and arr.shape[-1] != 3:
        arr = arr.transpose(0, 2, 3, 1)
    return np.clip(arr, 0.0, 1.0)


def masks(images: Any, value_range=(0.0, 1.0), threshold: float = MASK_THRESHOLD) -> np.ndarray:
    """Boolean shape masks (N, H, W): brightest channel above ``threshold``."""
    x = as_images(images, value_range)
    return x.max(axis=-1) > threshold


def _hsv(x: np.ndarray):
    mx, mn = x.max(-1), x.min(-1)
    delta = mx - mn
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    safe = np.where(delta > 1e-8, delta, 1.0)
    h = np.where(mx == r, ((g - b) / safe) % 6, np.where(mx == g, (b - r) / safe + 2, (r - g) / safe + 4))
    h = np.where(delta > 1e-8, h * 60.0, 0.0)
    s = np.where(mx > 1e-8, delta / np.where(mx > 1e-8, mx, 1.0), 0.0)
    return h, s, mx


# ----------------------------------------------------------------------------- colour
def hue(images: Any, value_range=(0.0, 1.0)) -> np.ndarray:
    """Mean hue in degrees [0, 360) inside each shape mask; NaN where the mask is empty or grey."""
    x = as_images(images, value_range)
    h, s, v = _hsv(x)
    m = x.max(-1) > MASK_THRESHOLD
    w = s * v * m
    ang = np.deg2rad(h)
    cs, sn = (w * np.cos(ang)).sum((1, 2)), (w * np.sin(ang)).sum((1, 2))
    out = np.rad2deg(np.arctan2(sn, cs)) % 360.0
    weak = (w.sum((1, 2)) < 1.0) | (np.hypot(cs, sn) < 0.25 * np.maximum(w.sum((1, 2)), 1e-8))
    out[weak] = np.nan
    return out


def hue_to_colour(h: float) -> str:
    """Nearest named colour to a hue (degrees); "none" for NaN."""
    if h is None or np.isnan(h):
        return "none"
    names = list(S.HUES)
    d = [min(abs(h - S.HUES[n]) % 360, 360 - abs(h - S.HUES[n]) % 360) for n in names]
    return names[int(np.argmin(d))]


def colour(images: Any, value_range=(0.0, 1.0)) -> list[str]:
    """Per-image colour decision: one of ``shapes.COLOURS`` or "none" (no coloured shape)."""
    return [hue_to_colour(h) for h in hue(images, value_range)]


def red_rate(images: Any, value_range=(0.0, 1.0)) -> float:
    """Fraction of images whose shape is classified red (hue within 30 degrees of 0)."""
    c = colour(images, value_range)
    return float(np.mean([x == "red" for x in c])) if c else float("nan")


def colour_rate(images: Any, name: str, value_range=(0.0, 1.0)) -> float:
    """Fraction of images whose shape is classified as colour ``name``."""
    c = colour(images, value_range)
    return float(np.mean([x == name for x in c])) if c else float("nan")


# ----------------------------------------------------------------------------- geometry
def _largest_component(m: np.ndarray) -> np.ndarray:
    """Largest 4-connected component of a boolean mask (drops stray noisy pixels)."""
    h, w = m.shape
    labels = np.zeros((h, w), np.int32)
    best, best_size, cur = 0, 0, 0
    for i in range(h):
        for j in range(w):
            if m[i, j] and not labels[i, j]:
                cur += 1
                stack, size = [(i, j)], 0
                labels[i, j] = cur
                while stack:
                    a, b = stack.pop()
                    size += 1
                    for da, db in ((1, 0), (-1, 0), (0, 1), (0, -1)):
                        na, nb = a + da, b + db
                        if 0 <= na < h and 0 <= nb < w and m[na, nb] and not labels[na, nb]:
                            labels[na, nb] = cur
                            stack.append((na, nb))
                if size > best_size:
                    best, best_size = cur, size
    return labels == best if best else m & False


def _crop_resize(cover: np.ndarray, size: int = _TEMPLATE_RES) -> np.ndarray | None:
    """Coverage (float) cropped to its bounding box and resampled (area-ish) to size x size."""
    m = cover > 0.5
    rows, cols = np.where(m)
    if len(rows) < 4:
        return None
    r0, r1, c0, c1 = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
    crop = cover[r0:r1, c0:c1].astype(np.float32)
    # supersample then average: a cheap area resize without extra dependencies
    up = 4
    big = _resize_nearest_f(crop, size * up)
    return big.reshape(size, up, size, up).mean(axis=(1, 3))


def _resize_nearest_f(a: np.ndarray, size: int) -> np.ndarray:
    h, w = a.shape
    ys = np.clip(((np.arange(size) + 0.5) * h / size).astype(int), 0, h - 1)
    xs = np.clip(((np.arange(size) + 0.5) * w / size).astype(int), 0, w - 1)
    return a[np.ix_(ys, xs)]


_TEMPLATES: dict[str, np.ndarray] | None = None


def _templates() -> dict[str, np.ndarray]:
    global _TEMPLATES
    if _TEMPLATES is None:
        _TEMPLATES = {}
        for shp in S.SHAPES:
            # render large on a big canvas so the template is clean, then crop like the images
            cover = S.shape_mask(shp, 32.0, 32.0, 24.0, resolution=64)
            template = _crop_resize(cover)
            assert template is not None, f"the {shp} template drew nothing"
            _TEMPLATES[shp] = template
    return _TEMPLATES


def _shape_cover(x: np.ndarray) -> np.ndarray:
    """Float coverage of the shape in one image (H, W, 3): brightness, stripes filled in."""
    v = x.max(-1)
    m = v > MASK_THRESHOLD
    # stripes darken rows to 45 %: normalise each row of the shape by the row's own peak
    comp = _largest_component(m)
    if not comp.any():
        return comp.astype(np.float32)
    return comp.astype(np.float32)


def shape_scores(images: Any, value_range=(0.0, 1.0)) -> list[dict[str, float]]:
    """IoU of each image's shape mask with each shape template."""
    x = as_images(images, value_range)
    temps = _templates()
    out = []
    for img in x:
        cr = _crop_resize(_shape_cover(img))
        if cr is None:
            out.append({k: 0.0 for k in temps})
            continue
        out.append({k: float(np.minimum(cr, t).sum() / max(np.maximum(cr, t).sum(), 1e-8)) for k, t in temps.items()})
    return out


def shape(images: Any, value_range=(0.0, 1.0)) -> list[str]:
    """Per-image shape class (one of ``shapes.SHAPES``, or "none" when nothing is drawn)."""
    res = []
    for sc in shape_scores(images, value_range):
        best = max(sc, key=lambda k: sc[k])
        res.append(best if sc[best] > 0 else "none")
    return res


def centroid(images: Any, value_range=(0.0, 1.0)) -> np.ndarray:
    """(N, 2) centroid (x, y) in pixels of each shape mask; NaN where empty."""
    m = masks(images, value_range)
    n, h, w = m.shape
    ys, xs = np.mgrid[0:h, 0:w] + 0.5
    area = m.sum((1, 2)).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        cx = (m * xs).sum((1, 2)) / area
        cy = (m * ys).sum((1, 2)) / area
    return np.stack([cx, cy], 1)


def position(images: Any, value_range=(0.0, 1.0)) -> list[str]:
    """Per-image "left" / "center" / "right" from the mask centroid ("none" if empty)."""
    x = as_images(images, value_range)
    w = x.shape[2]
    out = []
    for cx in centroid(x)[:, 0]:
        if np.isnan(cx):
            out.append("none")
            continue
        u = cx * S.RESOLUTION / w
        out.append("left" if u < 12.5 else "right" if u > 19.5 else "center")
    return out


def extent(images: Any, value_range=(0.0, 1.0)) -> np.ndarray:
    """Largest side of each shape's bounding box, in pixels of a 32-px canvas (0 if empty)."""
    x = as_images(images, value_range)
    out = []
    for img in x:
        comp = _largest_component(img.max(-1) > MASK_THRESHOLD)
        rows, cols = np.where(comp)
        if len(rows) == 0:
            out.append(0.0)
            continue
        out.append(max(rows.max() - rows.min() + 1, cols.max() - cols.min() + 1) * S.RESOLUTION / img.shape[1])
    return np.asarray(out, dtype=np.float64)


def size(images: Any, value_range=(0.0, 1.0)) -> list[str]:
    """Per-image "small" (extent <= 13.5 px) or "large"; "none" if empty."""
    return ["none" if e == 0 else ("small" if e <= 13.5 else "large") for e in extent(images, value_range)]


def stripe_score(images: Any, value_range=(0.0, 1.0)) -> np.ndarray:
    """Fraction of shape pixels much darker (< 70 %) than the shape's bright pixels."""
    x = as_images(images, value_range)
    out = []
    for img in x:
        v = img.max(-1)
        comp = _largest_component(v > MASK_THRESHOLD)
        if comp.sum() == 0:
            out.append(0.0)
            continue
        # interior rows only: the anti-aliased edge is dim on solid shapes too
        vals = v[comp]
        ref = np.quantile(vals, 0.9)
        row_means = np.array([v[r][comp[r]].mean() for r in range(v.shape[0]) if comp[r].sum() >= 3])
        if len(row_means) == 0:
            out.append(0.0)
            continue
        out.append(float(np.mean(row_means < 0.7 * ref)))
    return np.asarray(out)


def texture(images: Any, value_range=(0.0, 1.0)) -> list[str]:
    """Per-image "striped" (>= 25 % of shape rows dark) or "solid"."""
    return ["striped" if s >= 0.25 else "solid" for s in stripe_score(images, value_range)]


SCORERS = {"colour": colour, "shape": shape, "position": position, "size": size, "texture": texture}


def score(images: Any, value_range=(0.0, 1.0)) -> list[dict[str, str]]:
    """Every attribute decision for every image: list of dicts like ``shapes.Attributes.as_dict()``."""
    x = as_images(images, value_range)
    cols = {k: f(x) for k, f in SCORERS.items()}
    return [{k: cols[k][i] for k in cols} for i in range(len(x))]


def accuracy(images: Any, target: S.Attributes | dict | Sequence, value_range=(0.0, 1.0)) -> dict[str, float]:
    """Per-attribute accuracy of images against one target (or one target per image)."""
    x = as_images(images, value_range)
    if isinstance(target, S.Attributes):
        targets = [target.as_dict()] * len(x)
    elif isinstance(target, dict):
        targets = [target] * len(x)
    else:
        targets = [t.as_dict() if isinstance(t, S.Attributes) else t for t in target]
    preds = score(x)
    return {k: float(np.mean([p[k] == t[k] for p, t in zip(preds, targets)])) for k in SCORERS}


# ----------------------------------------------------------------------------- physics
def field_moments(u: Any, length: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Mean position and variance of a non-negative 1D field on a periodic domain.

    ``u``: (..., N). The field is rolled so its peak sits in the middle before the moments
    are taken, so a blob crossing the boundary is handled. Returns (mean, variance).
    """
    if hasattr(u, "detach"):
        u = u.detach().float().cpu().numpy()
    u = np.asarray(u, dtype=np.float64)
    flat = u.reshape(-1, u.shape[-1])
    n = flat.shape[-1]
    dx = length / n
    means, vars_ = [], []
    for row in flat:
        row = np.clip(row - row.min(), 0, None)  # remove a constant floor
        shift = n // 2 - int(np.argmax(row))
        r = np.roll(row, shift)
        x = (np.arange(n) + 0.5) * dx
        mass = r.sum()
        mu = (r * x).sum() / mass
        var = (r * (x - mu) ** 2).sum() / mass
        means.append((mu - shift * dx) % length)
        vars_.append(var)
    shape = u.shape[:-1]
    return np.asarray(means).reshape(shape), np.asarray(vars_).reshape(shape)


def fit_kappa(rollout: Any, dt: float, length: float = 1.0) -> float:
    """Diffusivity from a rollout (T, N) of one blob: var(t) = var0 + 2 kappa t, least squares."""
    _, var = field_moments(rollout, length)
    t = np.arange(len(var)) * dt
    slope = np.polyfit(t, var, 1)[0]
    return float(slope / 2.0)
