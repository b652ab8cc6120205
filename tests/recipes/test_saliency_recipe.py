"""`interp saliency` (recipes/saliency.py): the map mode writes an overlay PNG and a loadable Result."""
import pytest

from interp import Result
from recipes import cli, saliency


def test_saliency_cli_writes_maps_and_overlay(tmp_path):
    out = tmp_path / "sal"
    parser = cli.build_parser()
    args = parser.parse_args(["saliency", "--model", "shapes-flow",
                              "--prompt", "a large blue square on the right, solid",
                              "--concepts", "blue,square", "--steps", "2", "--out", str(out)])
    assert args.func(args) == 0
    res = Result.load(out / "maps")
    assert res.axes == ("image", "concept", "y", "x") and res.coords["concept"] == ["blue", "square"]
    assert res.attrs["method"] == "concept_attention" and (out / "overlay.png").stat().st_size > 1000


def test_saliency_candidates_cover_every_block():
    c = saliency.candidates("sd3", 4)
    assert {"method": "cross", "layers": [3]} in c and len([x for x in c if x["method"] == "concept"]) == 64
    assert all(x["method"] == "cross" for x in saliency.candidates("unet", 4))
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["saliency", "--method", "keys"])
