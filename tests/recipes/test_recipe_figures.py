"""Recipe figures are drawn on interp.results.figure / save_figure: running a recipe never switches the caller's
matplotlib backend (a notebook's inline backend stays), and no library or recipe source calls matplotlib.use."""
import re
from pathlib import Path

import matplotlib
import torch

import interp
from recipes.attribution_diffusion import plot_curves
from recipes.saliency import overlay

ROOT = Path(__file__).resolve().parents[2]


def test_no_source_switches_the_backend():
    pattern = re.compile(r"matplotlib\.use\(|plt\.switch_backend\(")
    hits = [str(p.relative_to(ROOT)) for d in ("interp", "recipes", "interventions", "probes")
            for p in (ROOT / d).rglob("*.py") if pattern.search(p.read_text(encoding="utf-8"))]
    assert hits == []


def test_recipe_figures_leave_the_backend_alone(tmp_path, monkeypatch):
    switched = []
    monkeypatch.setattr(matplotlib, "use", lambda *a, **k: switched.append(a))
    backend = matplotlib.get_backend()
    curve = interp.Result(torch.rand(2, 3), ("row", "start"), {"row": ["restore", "ablate"], "start": [0, 2, 4]})
    a = plot_curves({"text": curve}, tmp_path / "curves.png", steps=6)
    images, maps = torch.rand(2, 3, 16, 16), [torch.rand(4, 4), torch.rand(4, 4)]
    b = overlay(images, maps, None, tmp_path / "sub" / "overlay.png", ["image", "map a", "map b"], "title",
                grid=[maps, maps], row_labels=["row 0", "row 1"])
    assert b == tmp_path / "sub" / "overlay.png"
    for path in (tmp_path / "curves.png", b):
        assert path.stat().st_size > 1000 and path.read_bytes()[:4] == b"\x89PNG"
    assert a is None and switched == [] and matplotlib.get_backend() == backend
