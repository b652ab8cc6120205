"""Probe maps on the constructed model: V = (a + b) mod 3 is written at (write_layer, last position)."""
import pytest
import torch

import interp
from interp import Result
from probes import collect, lm_probe_maps, peak, plot_maps, probe_map
from probes.toy import ToyLM


@pytest.mark.parametrize("write_layer", [1, 2])
def test_probe_map_is_at_chance_until_the_write_site_and_peaks_there(write_layer):
    m = ToyLM(write_layer=write_layer)
    lm = interp.attach(m)
    X, lab = m.dataset()
    res, _ = lm_probe_maps(lm, list(X), lab, "V", positions=[0, 1, 2, 3], types="pair", groups="pair",
                           progress=False)
    assert res.axes == ("model", "measure", "layer", "pos")
    acc = res.sel(model="trained", measure="accuracy").values
    chance = 1 / 3
    last = acc[:, 3]
    assert last[write_layer:].min() > 0.95                        # readable from the write site on
    assert last[:write_layer].max() < chance + 0.15               # not before it
    assert acc[:, :3].max() < chance + 0.15                       # never at the other positions
    assert int(torch.nonzero(last > 0.95)[0]) == write_layer      # the map's first peak is the write site
    # held-out (a, b) pairs: the trained model generalises, the random-init copy does not
    grp = res.sel(measure="group_accuracy")
    assert grp.sel(model="trained").values[write_layer, 3] > 0.95
    assert grp.sel(model="random-init").values[write_layer, 3] < 0.5


def test_probe_map_result_round_trips_and_plots(toy, tmp_path):
    m, lm = toy
    X, lab = m.dataset()
    ds = collect(lm, list(X), "blocks.*.resid_post", labels=lab, positions={"a": 0, "last": -1}, progress=False)
    res = probe_map(ds, "V", types="pair", progress=False)
    assert res.coord("measure") == ["accuracy", "control", "selectivity"]
    assert res.coord("pos") == ["a", "last"]
    again = Result.load(res.save(tmp_path / "map"))
    assert torch.equal(again.values, res.values) and again.coords == res.coords
    cell, val = peak(res)
    assert cell["pos"] == "last" and val > 0.95
    png = plot_maps(res, tmp_path / "map.png")
    assert png.stat().st_size > 5000
    sel = res.sel(measure="selectivity").values
    assert torch.allclose(sel, res.sel(measure="accuracy").values - res.sel(measure="control").values)


def test_probe_map_errors_name_the_problem(toy):
    m, lm = toy
    X, lab = m.dataset()
    ds = collect(lm, list(X), "blocks.0.resid_post", labels=lab, progress=False)
    with pytest.raises(KeyError, match="not a label"):
        probe_map(ds, "V", types="colour", progress=False)
    with pytest.raises(ValueError, match="single class"):
        probe_map(ds, [0] * len(ds), progress=False)
