"""Synthetic "coloured shapes" data with known ground truth.

Every image is one shape on a black background, described by a caption such as
``"a small red circle on the left, striped"``. The attributes are:

- colour: 6 fully saturated hues (red, yellow, green, cyan, blue, magenta)
- shape: circle, square, triangle, cross
- position: left, center, right (horizontal centre of the shape)
- size: small (half extent 5 px) or large (half extent 8 px) on a 32x32 canvas
- texture: solid, or striped (horizontal stripes: 2 rows full colour, 2 rows at 45 % brightness,
  so the hue is the same everywhere inside the shape)

Images are float32 arrays in [0, 1], shape (H, W, 3). ``render`` is deterministic; ``sample``
draws attributes and a small sub-pixel jitter from a seeded generator.
"""
from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass

import numpy as np

RESOLUTION = 32
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (1.0, 0.0, 0.0),
    "yellow": (1.0, 1.0, 0.0),
    "green": (0.0, 1.0, 0.0),
    "cyan": (0.0, 1.0, 1.0),
    "blue": (0.0, 0.0, 1.0),
    "magenta": (1.0, 0.0, 1.0),
}
#: hue of each colour in degrees (HSV)
HUES: dict[str, float] = {"red": 0.0, "yellow": 60.0, "green": 120.0, "cyan": 180.0, "blue": 240.0, "magenta": 300.0}
SHAPES = ("circle", "square", "triangle", "cross")
POSITIONS = ("left", "center", "right")
SIZES = ("small", "large")
TEXTURES = ("solid", "striped")
ATTRIBUTES = {"colour": tuple(COLOURS), "shape": SHAPES, "position": POSITIONS, "size": SIZES, "texture": TEXTURES}

#: horizontal centre (in units of the 32-px canvas) of each position
POSITION_X = {"left": 9.0, "center": 16.0, "right": 23.0}
#: half extent in pixels of each size (on a 32-px canvas)
SIZE_HALF = {"small": 5.0, "large": 8.0}
STRIPE_DIM = 0.45
STRIPE_PERIOD = 4


@dataclass(frozen=True)
class Attributes:
    colour: str
    shape: str
    position: str
    size: str
    texture: str

    def caption(self) -> str:
        where = "in the center" if self.position == "center" else f"on the {self.position}"
        return f"a {self.size} {self.colour} {self.shape} {where}, {self.texture}"

    def as_dict(self) -> dict[str, str]:
        return asdict(self)


def all_attributes() -> list[Attributes]:
    """Every combination (6 x 4 x 3 x 2 x 2 = 288), in a fixed order."""
    return [Attributes(*c) for c in itertools.product(COLOURS, SHAPES, POSITIONS, SIZES, TEXTURES)]


def parse_caption(caption: str) -> Attributes:
    """Inverse of ``Attributes.caption``."""
    words = caption.replace(",", " ").split()
    found = {}
    for key, values in ATTRIBUTES.items():
        hits = [w for w in words if w in values]
        if len(hits) != 1:
            raise ValueError(f"caption {caption!r} does not name exactly one {key}")
        found[key] = hits[0]
    return Attributes(**found)


def held_out_attributes() -> list[Attributes]:
    """The held-out captions: 8 combinations never shown in training.

    Chosen so that every colour, shape, position, size and texture still appears in training
    (this measures composition, not unseen words); every colour and every shape is held out at least once.
    """
    out = []
    for i, colour in enumerate(COLOURS):
        for j, shape in enumerate(SHAPES):
            if (i + 2 * j) % 3 == 0:
                pos = POSITIONS[(i + j) % 3]
                size = SIZES[(i + j) % 2]
                tex = TEXTURES[(i // 2 + j) % 2]
                out.append(Attributes(colour, shape, pos, size, tex))
    return out


def train_attributes() -> list[Attributes]:
    held = set(held_out_attributes())
    return [a for a in all_attributes() if a not in held]


def shape_mask(shape: str, cx: float, cy: float, half: float, resolution: int = RESOLUTION) -> np.ndarray:
    """Anti-aliased coverage (float in [0, 1]) of a shape, 4x4 supersampled."""
    ss = 4
    coords = (np.arange(resolution * ss) + 0.5) / ss
    x, y = np.meshgrid(coords, coords)  # x: column, y: row (down)
    dx, dy = x - cx, y - cy
    if shape == "circle":
        m = dx**2 + dy**2 <= half**2
    elif shape == "square":
        h = half * 0.88
        m = (np.abs(dx) <= h) & (np.abs(dy) <= h)
    elif shape == "triangle":
        # upward isosceles triangle: apex at top, base at bottom
        top, bottom = cy - half, cy + half
        frac = np.clip((y - top) / (2 * half), 0, 1)
        m = (y >= top) & (y <= bottom) & (np.abs(dx) <= half * frac)
    elif shape == "cross":
        arm = half * 0.36
        m = ((np.abs(dx) <= half) & (np.abs(dy) <= arm)) | ((np.abs(dy) <= half) & (np.abs(dx) <= arm))
    else:
        raise ValueError(f"unknown shape {shape!r}; choose one of {SHAPES}")
    m = m.astype(np.float32).reshape(resolution, ss, resolution, ss).mean(axis=(1, 3))
    return m


def render(attrs: Attributes, resolution: int = RESOLUTION, jitter: tuple[float, float] = (0.0, 0.0)) -> np.ndarray:
    """Render one image, float32 (H, W, 3) in [0, 1]. ``jitter`` shifts the centre (pixels)."""
    scale = resolution / RESOLUTION
    cx = (POSITION_X[attrs.position] + jitter[0]) * scale
    cy = (RESOLUTION / 2 + jitter[1]) * scale
    half = SIZE_HALF[attrs.size] * scale
    cover = shape_mask(attrs.shape, cx, cy, half, resolution)
    colour = np.asarray(COLOURS[attrs.colour], dtype=np.float32)
    shade = np.ones((resolution, 1), dtype=np.float32)
    if attrs.texture == "striped":
        period = max(2, int(round(STRIPE_PERIOD * scale)))
        rows = np.arange(resolution)
        shade[(rows % period) >= period // 2] = STRIPE_DIM
    img = cover[..., None] * shade[..., None] * colour
    return img.astype(np.float32)


def sample(seed: int, n: int = 1, attributes: list[Attributes] | None = None,
           resolution: int = RESOLUTION, jitter: float = 1.0):
    """Draw ``n`` examples deterministically from ``seed``.

    Returns ``(images, captions, attrs)``: float32 array (n, H, W, 3) in [0, 1], list of
    captions, list of ``Attributes``. ``attributes`` restricts the draw (default: training set).
    """
    rng = np.random.default_rng(seed)
    pool = attributes if attributes is not None else train_attributes()
    idx = rng.integers(0, len(pool), size=n)
    jit = rng.uniform(-jitter, jitter, size=(n, 2))
    attrs = [pool[i] for i in idx]
    if n:
        images = np.stack([render(a, resolution, tuple(j)) for a, j in zip(attrs, jit)])
    else:
        images = np.zeros((0, resolution, resolution, 3), np.float32)
    return images, [a.caption() for a in attrs], attrs


def caption_words() -> list[str]:
    """Every word (and punctuation) a caption can contain."""
    words = {"a", "on", "the", "in", ","}
    for values in ATTRIBUTES.values():
        words.update(values)
    return sorted(words)


def to_tensor(images: np.ndarray):
    """(n, H, W, 3) in [0, 1] -> torch (n, 3, H, W) in [-1, 1] (the models' pixel range)."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() * 2 - 1
