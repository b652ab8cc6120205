"""benchmarks/kernels.py runs (tiny size) and prints the table; its GPU self-check works."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

BENCH = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "kernels.py")


def _load():
    spec = importlib.util.spec_from_file_location("interp_bench_kernels", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_benchmark_table_on_cpu(monkeypatch, capsys):
    monkeypatch.setenv("INTERP_KERNELS", "torch")
    _load().main(["--sizes", "tiny", "--reps", "1"])
    out = capsys.readouterr().out
    assert "no CUDA device: the ops run the torch REFERENCE" in out
    for op in ("patch", "blend", "add relative", "noise+patch", "project k=64", "copy bandwidth"):
        assert op in out
    assert "speed-up" in out and "% copy" in out


def test_benchmark_self_check_with_triton(monkeypatch, capsys):
    pytest.importorskip("triton")
    from interp.kernels import triton as tk

    assert tk.INTERPRETED
    _load().check_against_reference(torch.device("cpu"), torch.float32)
    out = capsys.readouterr().out
    assert "check: OK" in out, out
