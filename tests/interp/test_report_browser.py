"""The HTML report in a real headless browser (Debian's `chromium`): it loads offline with no console errors, the
DOM holds one cell per value, and a screenshot shows the heatmap's colours. Skipped when chromium is absent."""
from __future__ import annotations

import re
import shutil
import subprocess

import pytest
import torch

from interp import Result

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install -y chromium; "
                                "the Makefile's setup tries it)")
OFFLINE = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-extensions", "--no-first-run",
           "--host-resolver-rules=MAP * ~NOTFOUND", "--proxy-server=127.0.0.1:9", "--enable-logging=stderr", "--v=0"]


def _browser(tmp_path, page, *extra, timeout=120):
    r = subprocess.run([CHROMIUM, *OFFLINE, f"--user-data-dir={tmp_path / 'profile'}", *extra, page.as_uri()],
                       capture_output=True, text=True, timeout=timeout)
    return r


def _console_errors(stderr: str) -> list[str]:
    return [l for l in stderr.splitlines() if "CONSOLE" in l or "Uncaught" in l]


def _heatmap():
    v = torch.linspace(-1, 1, 40).reshape(4, 10)
    return Result(v, ("layer", "pos"), {"layer": [0, 1, 2, 3], "pos": [f"{i}: w{i}" for i in range(10)]},
                  {"metric": "normalised logit diff", "title": "browser test"})


def test_page_loads_offline_without_console_errors_and_has_every_cell(tmp_path):
    page = tmp_path / "report.html"
    _heatmap().to_html(page, command="interp trace --model smollm2")
    r = _browser(tmp_path, page, "--dump-dom")
    assert r.returncode == 0, r.stderr[-2000:]
    assert _console_errors(r.stderr) == [], _console_errors(r.stderr)
    assert len(re.findall(r'<rect class="c"', r.stdout)) == 40 and "interp trace --model smollm2" in r.stdout


def test_the_console_check_catches_a_broken_script(tmp_path):
    """The check above can fail: a page whose script throws is reported."""
    page = tmp_path / "broken.html"
    page.write_text(_heatmap().to_html().replace("</body>", "<script>undefinedFunction();</script></body>"))
    r = _browser(tmp_path, page, "--dump-dom")
    assert any("undefinedFunction" in l for l in _console_errors(r.stderr)), r.stderr[-2000:]


def test_screenshot_shows_the_heatmap(tmp_path):
    from PIL import Image

    page, shot = tmp_path / "report.html", tmp_path / "shot.png"
    _heatmap().to_html(page)
    r = _browser(tmp_path, page, f"--screenshot={shot}", "--window-size=900,700", "--hide-scrollbars")
    assert shot.exists(), r.stderr[-2000:]
    px = torch.tensor(list(Image.open(shot).convert("RGB").get_flattened_data()), dtype=torch.int32)
    red = ((px[:, 0] > 150) & (px[:, 1] < 90) & (px[:, 2] < 90)).sum().item()
    blue = ((px[:, 2] > 140) & (px[:, 0] < 90) & (px[:, 1] < 140)).sum().item()
    cell = 34 * 18  # the strongest cells of each sign are fully saturated
    assert red > cell and blue > cell, (red, blue)
