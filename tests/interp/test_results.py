"""Result: labelled axes, dataframe, top-k, disk round trip, pictures."""
import json

import pytest
import torch

from interp import Result


def _result():
    v = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    return Result(v, ("layer", "pos"), {"layer": [0, 1], "pos": ["The", " Eiff", "el"]}, {"metric": "logit diff"})


def test_round_trip_through_disk(tmp_path):
    r = _result()
    path = r.save(tmp_path / "sub" / "sweep")
    assert path.suffix == ".json" and (tmp_path / "sub" / "sweep.safetensors").exists()
    assert json.loads(path.read_text())["axes"] == ["layer", "pos"]
    back = Result.load(path)
    assert torch.equal(back.values, r.values) and back.axes == r.axes and back.coords == r.coords
    assert back.attrs == r.attrs
    assert not list(tmp_path.glob("sub/.*tmp"))  # atomic writes leave no temporaries


def test_dataframe_top_and_sel():
    r = _result()
    df = r.to_dataframe()
    assert list(df.columns) == ["layer", "pos", "value"] and len(df) == 6
    assert df[(df.layer == 1) & (df.pos == "el")].value.item() == 5.0
    assert r.top(2) == [({"layer": 1, "pos": "el"}, 5.0), ({"layer": 1, "pos": " Eiff"}, 4.0)]
    assert torch.equal(r.sel(layer=1).values, torch.tensor([3.0, 4.0, 5.0]))


def test_plot_writes_a_png(tmp_path):
    p = _result().plot(tmp_path / "heat.png")
    assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    imgs = Result(torch.rand(4, 3, 8, 8), ("sample", "c", "h", "w"), {"sample": ["a", "b", "c", "d"]})
    assert imgs.plot(tmp_path / "grid.png").read_bytes()[:4] == b"\x89PNG"


def test_bad_shapes_are_reported():
    with pytest.raises(ValueError, match="2 dims but 1 axis"):
        Result(torch.zeros(2, 2), ("layer",))
    with pytest.raises(ValueError, match="axis 'pos' has 2 entries but 3"):
        Result(torch.zeros(2, 2), ("layer", "pos"), {"pos": [1, 2, 3]})
