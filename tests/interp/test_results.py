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


def _labelled():
    tokens = ["The", " E", "iff", "el", " Tower", " of", " the", " city", " of"]
    labels = [f"{p}:{t}{'*' if p in (1, 2) else ''}" for p, t in enumerate(tokens[:8])]
    return Result(torch.arange(24.0).reshape(3, 8) / 7, ("layer", "pos"), {"layer": [0, 1, 2], "pos": labels},
                  {"metric": "indirect effect on p(' Paris')"})


def test_eq_compares_values_labels_and_attrs():
    a = _labelled()
    b = Result(a.values.clone(), a.axes, dict(a.coords), dict(a.attrs))
    assert a == b and not (a != b)
    assert a != Result(a.values + 1e-7, a.axes, a.coords, a.attrs)  # bit for bit, not approximately
    assert a != Result(a.values.double(), a.axes, a.coords, a.attrs)
    assert a != Result(a.values, ("l", "p"), {}, a.attrs)
    assert a != Result(a.values, a.axes, a.coords, {**a.attrs, "seed": 1})
    nan = Result(torch.tensor([1.0, float("nan")]), ("x",))
    assert nan == Result(torch.tensor([1.0, float("nan")]), ("x",))
    assert (a == "a string") is False
    with pytest.raises(TypeError):
        hash(a)


def test_repr_is_short_and_says_what_the_result_holds():
    big = Result(torch.randn(300, 400), ("layer", "pos"), attrs={"metric": "logit diff"})
    text = repr(big)
    assert len(text) < 200 and "layer=300 x pos=400" in text and "float32" in text and "logit diff" in text
    assert "tensor(" not in text


def test_sel_by_token_text():
    res = _labelled()
    assert res.sel(pos=" Tower").values.tolist() == res.values[:, 4].tolist()
    assert res.sel(pos=" E").values.tolist() == res.values[:, 1].tolist()  # the subject mark '*' is not part of it
    assert res.sel(pos="4: Tower").values.tolist() == res.values[:, 4].tolist()
    assert res.sel(pos=3, layer=2).values.item() == res.values[2, 3].item()
    assert res.sel(pos=-1).values.tolist() == res.values[:, -1].tolist()
    with pytest.raises(KeyError, match="no such label"):
        res.sel(pos=" Paris")
    with pytest.raises(KeyError, match="no axis 'head'"):
        res.sel(head=0)
    two = Result(torch.zeros(1, 3), ("layer", "pos"), {"pos": ["0:The", "1: of", "2: of"]})
    with pytest.raises(KeyError, match="ambiguous"):
        two.sel(pos=" of")
    assert two.sel(pos="2: of").shape == (1,)


def test_plot_leaves_the_matplotlib_backend_alone(tmp_path):
    import matplotlib

    before = matplotlib.get_backend()
    _labelled().plot(tmp_path / "h.png", title="a long title " * 12)
    assert matplotlib.get_backend() == before
    from PIL import Image

    img = Image.open(tmp_path / "h.png")
    assert img.size[0] > 300 and img.size[1] > 200


def test_to_html_is_one_offline_page(tmp_path):
    res = _labelled()
    html = res.to_html(tmp_path / "r.html", command="interp trace --model smollm2")
    assert (tmp_path / "r.html").read_text() == html
    assert html.startswith("<!DOCTYPE html>") and "interp trace --model smollm2" in html
    assert "http://" not in html.replace('xmlns="http://www.w3.org/2000/svg"', "") and "https://" not in html
    assert "<script src" not in html and "<link" not in html  # nothing fetched
    assert html.count('class="c"') == 24 and "4: Tower" in html  # one cell per value, token labels
    assert f'data-v="{float(res.values[2, 5]):.6g}"' in html  # hover values are the numbers
    assert "_repr_html_" in dir(res) and 'class="interp-result"' in res._repr_html_()


def test_images_are_embedded_as_data_uris(tmp_path):
    imgs = Result(torch.rand(3, 3, 8, 8), ("image", "c", "h", "w"), {"image": ["clean", "corrupted", "restored"]})
    html = imgs.to_html()
    assert html.count("data:image/png;base64,") == 3 and "restored" in html


def test_report_dir_collects_results_pngs_and_the_command(tmp_path):
    import json

    from interp.errors import InterpError
    from interp.report import report_dir

    _labelled().save(tmp_path / "run" / "mlp")
    _labelled().plot(tmp_path / "run" / "extra_grid.png")
    (tmp_path / "run" / "summary.json").write_text(json.dumps({"command": "interp trace --x 1", "seed": 3}))
    page = report_dir(tmp_path / "run").read_text()
    assert "interp trace --x 1" in page and page.count('class="c"') == 24 and "extra_grid" in page
    with pytest.raises(InterpError, match="no saved interp Result"):
        (tmp_path / "empty").mkdir()
        report_dir(tmp_path / "empty")


def test_html_hover_shows_the_confidence_interval():
    res = _labelled()
    res.attrs.update(ci_low=res.values - 0.5, ci_high=res.values + 0.25, level=0.95)
    html = res.to_html()
    v = float(res.values[1, 2])
    assert f'data-v="{v:.6g} [{v - 0.5:.4g}, {v + 0.25:.4g}]"' in html


def test_plot_names_the_interval(tmp_path):
    res = _labelled()
    assert res._ci_note() == ""
    res.attrs.update(ci_low=res.values - 0.5, ci_high=res.values + 0.25, level=0.9)
    assert res._ci_note() == " (mean; 90% CI half-width up to 0.375)"
    res.plot(tmp_path / "ci.png")
