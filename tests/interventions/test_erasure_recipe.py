"""`interp erase` end to end on a tiny random shapes pipeline saved to disk: checkpoints per method with a
manifest, the source untouched, a report with JSON + grid, and clear refusals."""
import json

import pytest
import torch

from recipes.cli import main

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    from interp.zoo.architectures import build_diffusion_pipeline

    folder = tmp_path_factory.mktemp("erase") / "tiny-sd"
    build_diffusion_pipeline(0, width=8).save_pretrained(folder)
    return folder


def _snapshot(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_erase_cli_writes_checkpoints_and_report(source, tmp_path, capsys):
    before = _snapshot(source)
    rc = main(
        [
            "erase",
            str(source),
            "--concept",
            "red",
            "--method",
            "uce",
            "leace",
            "--out",
            str(tmp_path / "out"),
            "--report",
            str(tmp_path / "rep"),
            "--steps",
            "2",
            "--eval-prompts",
            "2",
            "--n-per-prompt",
            "1",
            "--quiet",
        ]
    )
    assert rc == 0
    for m in ("uce", "leace"):
        man = json.loads((tmp_path / "out" / m / "interp_edit.json").read_text())
        assert man["method"] == m and man["concept"] == "red" and man["source"] == str(source.resolve())
        assert (tmp_path / "out" / m / "unet" / "diffusion_pytorch_model.safetensors").exists()
    rep = json.loads((tmp_path / "rep" / "erasure_report.json").read_text())
    assert set(rep["methods"]) == {"uce", "leace"} and "original" in rep
    assert {"concept_rate_before", "relative_drop", "efficacy_ok", "specificity_ok"} <= set(
        rep["methods"]["uce"]["comparison"]
    )
    assert (tmp_path / "rep" / "erasure_grid.png").stat().st_size > 1000
    from interp import Result

    res = Result.load(tmp_path / "rep" / "erasure_result")
    assert res.axes == ("model", "metric") and res.coord("model") == ["original", "uce", "leace"]
    assert (
        float(res.sel(model="original", metric="probe_concept_rate").values)
        == rep["value_probe"]["original"]["concept_rate"]
    )
    assert _snapshot(source) == before
    assert "uce: red rate" in capsys.readouterr().out


def test_erase_cli_checks_the_checkpoint_with_plain_diffusers(source, tmp_path):
    rc = main(["erase", str(source), "--concept", "red", "--method", "quickfix", "--out", str(tmp_path / "qf"),
               "--check-plain", "--steps", "2", "--report", str(tmp_path / "rep"), "--eval-prompts", "0", "--no-probe"])
    assert rc == 0
    chk = json.loads((tmp_path / "rep" / "erasure_report.json").read_text())["methods"]["quickfix"][
        "plain_diffusers_check"
    ]
    assert chk["checked"] and chk["reproduces"] and chk["max_abs_diff"] < 1e-4


def test_erase_cli_refusals(source, tmp_path, capsys):
    def refused(argv, words):  # a user error: one line on stderr, exit code 2
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert words in err and len(err.splitlines()) == 1, err

    refused(["erase", str(source), "--concept", "red", "--method", "uce", "time", "--in-place"], "exactly one --method")
    refused(["erase", str(source), "--concept", "van gogh", "--method", "uce"], "--prompts and --guide")
    refused(["erase", str(source), "--concept", "red", "--method", "uce", "--out", str(source)], "source")  # never it
    refused(["erase", str(source), "--concept", "red", "--method", "esd"], "unknown method")
    refused(["erase", str(source), "--concept", "red", "--guide", "reddish-orange", "--method", "uce"],
            "same number of tokens")
