"""`interp probe` end to end on a tiny saved Llama with a JSONL data file, and its input errors."""
import json

import pytest

from interp import Result
from recipes.cli import main
from recipes.probe import LANDMARKS, TEMPLATES, _positions, landmark_task, read_jsonl


def test_probe_cli_writes_a_loadable_map(tiny_llama_dir, tmp_path):
    data = tmp_path / "d.jsonl"
    lines = []
    for country, places in list(LANDMARKS.items())[:3]:
        for p in places:
            for t in TEMPLATES[:2]:
                lines.append(json.dumps({"prompt": t.format(p), "label": country, "subject": p}))
    data.write_text("\n".join(lines))
    out = tmp_path / "out"
    rc = main(["probe", "--model", str(tiny_llama_dir), "--data", str(data), "--positions", "subject_last,last",
               "--no-random", "--folds", "3", "--out", str(out)])
    assert rc == 0
    res = Result.load(out / "probe_map")
    assert res.axes == ("model", "measure", "layer", "pos") and res.coord("pos") == ["subject_last", "last"]
    assert res.coord("measure") == ["accuracy", "control", "selectivity", "group_accuracy"]
    assert (out / "probe_map.png").stat().st_size > 5000
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n"] == 36 and abs(summary["chance"] - 1 / 3) < 1e-6


def test_landmark_task_and_input_errors(tmp_path):
    rows = landmark_task()
    assert len(rows["prompt"]) == len(TEMPLATES) * sum(len(v) for v in LANDMARKS.values())
    assert all(s in p for p, s in zip(rows["prompt"], rows["subject"]))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        read_jsonl(str(bad))
    with pytest.raises(ValueError, match="needs a subject"):
        _positions("subject_last", has_subjects=False)
    with pytest.raises(ValueError, match="unknown position"):
        _positions("middle", has_subjects=True)
