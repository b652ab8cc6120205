"""`interp trace` on a diffusers pipeline folder: files written, numbers consistent with the saved Results."""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_diffusion_helpers import tiny_sd  # noqa: E402

from interp import Result  # noqa: E402
from recipes.cli import main  # noqa: E402


def test_interp_trace_on_a_pipeline_folder(tmp_path):
    tiny_sd().save_pretrained(tmp_path / "pipe")
    out = tmp_path / "out"
    rc = main(
        [
            "trace",
            "--model",
            str(tmp_path / "pipe"),
            "--prompt",
            "a small red circle on the left, solid",
            "--subject",
            "red",
            "--steps",
            "2",
            "--guidance",
            "3",
            "--samples",
            "2",
            "--layers",
            "1",
            "--components",
            "unet.mid,unet.up.1.resnet.*",
            "--windows",
            "steps",
            "--no-influence",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["subject"] == "red" and summary["corrupted_metric"] < summary["clean_metric"]
    assert summary["grid"]["cells"] == 11 * 1 + 3 * 3  # 11 prompt tokens x 1 layer + 3 components x (all, 0, 1)
    den = Result.load(out / "trace_denoiser.json")
    assert den.coords["component"] == ["unet.mid", "unet.up.1.resnet.0", "unet.up.1.resnet.1"]
    assert abs(summary["top"][0]["effect"] - float(den.values.max())) < 1e-6 or summary["top"][0]["map"] != "denoiser"
    for f in ("trace_denoiser.png", "trace_images.png", "trace_text_text_encoder_resid_post.png", "trace_cells.csv"):
        assert (out / f).stat().st_size > 500, f
