"""Every kind of CLI user error is one line on stderr, exit code 2, no traceback; a bug in interp is one line,
exit code 1 and a hint to rerun with --debug (which shows the traceback). Each case walks the real entry point
(recipes.cli.main, or `python -m recipes` in a subprocess) on a real model folder or the real zoo."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from recipes import cli

from ..conftest import tiny_gpt2

ROOT = Path(__file__).resolve().parents[2]
PROMPT = "The Eiffel Tower is located in the city of"


@pytest.fixture(scope="module")
def folder(tmp_path_factory, gpt2_tokenizer):
    path = tmp_path_factory.mktemp("models") / "tiny-gpt2"
    tiny_gpt2(n_layer=2).save_pretrained(path)
    gpt2_tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)  # read at import time


def _one_line_error(capsys, argv, code=2) -> str:
    rc = cli.main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == code, (rc, err)
    lines = [l for l in err.splitlines() if l.strip() and "warning" not in l]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"interp {argv[0]}: "), lines[0]
    return lines[0]


# (argv with {model} for the tiny folder, words the message must contain)
LM_CASES = {
    "missing --subject": (["trace", "--model", "{model}"], ["--subject", "--corrupted"]),
    "multi-token --target": (["trace", "--model", "{model}", "--subject", "Eiffel Tower", "--target", " Eiffelstadt"],
                             ["tokens", "single-token target"]),
    "multi-token --foil": (["trace", "--model", "{model}", "--corrupted", "The Colosseum is located in the city of",
                            "--target", " Paris", "--foil", " Romulusville"], ["tokens", "single-token"]),
    "layers out of range": (["trace", "--model", "{model}", "--subject", "Eiffel Tower", "--layers", "1-5"],
                            ["do not exist", "0..1"]),
    "layers not numbers": (["trace", "--model", "{model}", "--subject", "Eiffel Tower", "--layers", "a-b"],
                           ["'0-9'"]),
    "unknown kind": (["trace", "--model", "{model}", "--subject", "Eiffel Tower", "--kinds", "mlp,neurons"],
                     ["--kinds", "neurons"]),
    "subject not in prompt": (["trace", "--model", "{model}", "--subject", "Big Ben"], ["Big Ben"]),
    "prompts of different lengths": (["trace", "--model", "{model}", "--corrupted", "Rome is in",
                                      "--target", " Paris"], ["token lengths"]),
    "unknown site pattern": (["sites", "{model}", "blocks.1.resid_pr"], ["Did you mean", "blocks.1.resid_pre"]),
    "demo multi-token target": (["demo", "--model", "{model}", "--target", " Parisianville"], ["tokens"]),
    "missing local folder": (["trace", "--model", "./no-such-dir/model", "--subject", "x"],
                             ["no such local folder", "zoo name"]),
    "no device": (["sites", "{model}", "--device", "abacus"], ["--device", "not a torch device"]),
    "a file as model": (["sites", "{model}/config.json"], ["is a file", "folder"]),
}


@pytest.mark.parametrize("case", sorted(LM_CASES))
def test_each_lm_user_error_is_one_line_exit_2(case, folder, tmp_path, capsys):
    argv, words = LM_CASES[case]
    argv = [a.replace("{model}", str(folder)) for a in argv] + (["--out", str(tmp_path)] if argv[0] != "sites"
                                                               else [])
    line = _one_line_error(capsys, argv)
    for w in words:
        assert w in line, (w, line)


def test_mistyped_folder_is_reported_as_a_missing_folder_with_the_near_name(folder, capsys):
    typo = str(folder)[:-1] + "x"  # .../tiny-gpt2 -> .../tiny-gptx: the parent exists
    line = _one_line_error(capsys, ["sites", typo])
    assert "no such local folder" in line and repr(str(folder)) in line and "hub" not in line


def test_cuda_device_on_a_cpu_machine(folder, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    line = _one_line_error(capsys, ["sites", str(folder), "--device", "cuda"])
    assert "no CUDA device" in line and "--device cpu" in line


def test_hub_failure_is_whole_and_names_the_offline_choices(offline, capsys):
    line = _one_line_error(capsys, ["trace", "--model", "no-such-org/no-such-model", "--subject", "x"])
    assert "no-such-org/no-such-model" in line and "smollm2" in line and "offline" in line
    assert line.endswith("saved with save_pretrained.")  # the message is not cut
    for word in line.split():  # no URL cut in the middle: every URL ends at a word boundary with its path
        if word.startswith("http"):
            assert word.rstrip(").,'\"").count("/") >= 3, word


def test_mistyped_zoo_name_suggests_the_zoo_name(offline, capsys):
    line = _one_line_error(capsys, ["sites", "smollm"])
    assert "Did you mean the zoo model 'smollm2'" in line


@pytest.mark.parametrize("argv, words", [
    (["trace", "--model", "shapes-diffusion"], ["pipeline needs --subject", "--subject red"]),
    (["trace", "--model", "shapes-diffusion", "--subject", "purple"], ["'purple' is not in the prompt"]),
    (["trace", "--model", "shapes-diffusion", "--subject", "red", "--windows", "a-b"], ["--windows"]),
    (["trace", "--model", "shapes-diffusion", "--subject", "red", "--score", "colour"], ["ATTRIBUTE=VALUE"]),
])
def test_pipeline_user_errors_are_one_line(argv, words, tmp_path, capsys):
    line = _one_line_error(capsys, [*argv, "--out", str(tmp_path)])
    for w in words:
        assert w in line, (w, line)


@pytest.mark.parametrize("argv, words", [
    (["erase", "shapes-diffusion", "--concept", "red", "--method", "nosuch"], ["unknown method", "nosuch"]),
    (["erase", "shapes-diffusion", "--concept", "red", "--method", "uce", "quickfix", "--in-place"],
     ["--in-place"]),
    (["probe", "--model", "{model}", "--positions", "subject_first", "--data", "{data}"], ["needs a subject"]),
    (["report", "/no/such/folder"], ["is not a folder"]),
])
def test_other_commands_user_errors_are_one_line(argv, words, folder, tmp_path):
    """Recipes that `raise SystemExit("...")` or an InterpError, through `python -m recipes`: one line, exit 2."""
    (tmp_path / "rows.jsonl").write_text('{"prompt": "a b", "label": "x"}\n')
    argv = [a.replace("{data}", str(tmp_path / "rows.jsonl")).replace("{model}", str(folder)) for a in argv]
    argv = [*argv, "--out", str(tmp_path / "o")] if argv[0] in ("erase", "probe") else argv
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-m", "recipes", *argv], capture_output=True, text=True, env=env,
                       cwd=tmp_path, timeout=300)
    lines = [l for l in r.stderr.splitlines() if l.startswith(f"interp {argv[0]}")]
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(lines) == 1, r.stderr
    for w in words:
        assert w in lines[0], (w, lines[0])


@pytest.mark.parametrize("argv, words", [
    (["no-such-command"], ["invalid choice", "interp --help"]),
    (["trace", "--no-such-option"], ["unrecognized arguments", "--no-such-option"]),
    (["trace", "--samples", "many"], ["--samples", "invalid int value"]),
    (["trace", "--dtype", "float8"], ["--dtype", "invalid choice"]),
    (["steer", "--preset", "nonsense"], ["--preset", "invalid choice"]),
])
def test_usage_errors_are_one_line_exit_2(argv, words, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    for w in words:
        assert w in err, (w, err)


def test_an_internal_error_is_one_line_exit_1_and_debug_shows_the_traceback(folder, monkeypatch, capsys):
    import interp

    def broken(*a, **k):
        raise TypeError("simulated bug inside interp")

    monkeypatch.setattr(interp.Instrumented, "sites", broken)
    line = _one_line_error(capsys, ["sites", str(folder)], code=1)
    assert "internal error: TypeError: simulated bug inside interp" in line and "--debug" in line
    with pytest.raises(TypeError, match="simulated bug"):
        cli.main(["sites", str(folder), "--debug"])


def test_subprocess_entry_point_prints_no_traceback(folder, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-m", "recipes", "trace", "--model", str(folder), "--subject", "Eiffel Tower",
                        "--target", " Eiffelstadt", "--out", str(tmp_path)], capture_output=True, text=True, env=env,
                       cwd=tmp_path, timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert [l for l in r.stderr.splitlines() if l.startswith("interp trace: error:")], r.stderr


def test_target_without_leading_space_warns(folder, tmp_path, capsys):
    rc = cli.main(["trace", "--model", str(folder), "--subject", "Eiffel Tower", "--target", "Paris", "--samples", "2",
                   "--window", "1", "--kinds", "hidden", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 0 and "--target 'Paris' has no leading space" in err and "' Paris'" in err
    rc = cli.main(["trace", "--model", str(folder), "--subject", "Eiffel Tower", "--target", " Paris", "--samples", "2",
                   "--window", "1", "--kinds", "hidden", "--out", str(tmp_path)])
    assert rc == 0 and "leading space" not in capsys.readouterr().err


def test_zoo_train_exits_0(tmp_path, capsys):
    """`interp zoo-train` returns its metrics dict from the recipe; the command's exit code is still 0."""
    assert cli.main(["zoo-train", "physics", "--smoke", "--out", str(tmp_path / "physics"), "--quiet"]) == 0


def test_model_without_tokenizer_says_what_is_missing_at_first_use():
    import interp
    from interp import metrics
    from interp.errors import InterpError

    lm = interp.attach(tiny_gpt2(n_layer=1))
    with pytest.raises(InterpError, match=r"attach\(model, tokenizer=\.\.\.\)"):
        metrics.token_id(lm.tokenizer, " Paris")
    with pytest.raises(InterpError, match=r"attach\(model, tokenizer=\.\.\.\)"):
        lm.run("The Eiffel Tower")


def test_a_diffusion_command_prints_nothing_but_its_error(tmp_path):
    """No loading bars and no torchvision fallback notices around the one line (python -m recipes)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-m", "recipes", "trace", "--model", "shapes-diffusion", "--subject", "purple",
                        "--out", str(tmp_path)], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    want = "interp trace: error: --subject 'purple' is not in the prompt 'a large red circle on the left, solid'"
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [want], r.stderr
