"""`interp check` on the real SmolLM2-135M (cached offline by interp.zoo): every identity, patch and grid
comparison within 1e-5, with the layer-prefix replay and positional packs in use."""
from __future__ import annotations

import pytest

import interp
from interp.check import check


@pytest.mark.slow
def test_smollm2_passes_check():
    from interp.zoo import load

    lm = interp.attach(load("smollm2"))
    report = check(lm, batches=(1, 3))
    assert report.ok and report.max_diff <= 1e-5, report.table()
    kinds = {r.kind for r in report.rows}
    assert "grid column head (prefix+packs)" in kinds and "grid full head (prefix+packs)" in kinds
    assert "sum resid_post=resid_mid+mlp.out" in kinds and "patch attn.k" in kinds
