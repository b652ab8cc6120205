"""Library figures are drawn on Figure objects: a notebook's matplotlib backend is never switched."""
import matplotlib
import torch

import interp
from interventions.steering import plot_dose_response
from probes.dictionaries.report import plot_density


def test_library_plots_leave_the_backend_alone(tmp_path, monkeypatch):
    switched = []
    monkeypatch.setattr(matplotlib, "use", lambda *a, **k: switched.append(a))
    dose = interp.Result(torch.rand(2, 3), ("vector", "alpha"), {"vector": ["steer", "random"], "alpha": [0, 1, 2]})
    density = interp.Result(torch.tensor([0.0, 0.1, 0.01, 0.5]), ("feature",), attrs={"rows": 100})
    for path in (plot_dose_response(dose, tmp_path / "a" / "dose.png", title="t"),
                 plot_density(density, tmp_path / "b" / "density.png", title="t")):
        assert path.stat().st_size > 1000
    assert switched == []
