"""Bad inputs raise clear errors and write nothing; backend selection."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import interp.kernels as K
from interp.kernels import KernelBackendError, KernelError, KernelIndexError


@pytest.fixture(params=["torch", "triton"])
def backend_name(request, monkeypatch):
    if request.param == "triton":
        pytest.importorskip("triton")
    monkeypatch.setenv("INTERP_KERNELS", request.param)
    return request.param


def _xy():
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 3, 4, generator=g), torch.randn(2, 3, 4, generator=g)


def expect(exc, match, fn, *args, **kw):
    x = args[0].clone()
    with pytest.raises(exc, match=match):
        fn(*args, **kw)
    assert torch.equal(args[0], x), "a failed call must not write"


def test_index_out_of_range(backend_name):
    x, y = _xy()
    i = torch.tensor([[0, 0], [1, 3]])
    ok = torch.tensor([[0, 0], [0, 0]])
    expect(
        KernelIndexError,
        r"dst_idx\[1\] = \(1, 3\) is out of range for dst of shape \[2, 3, 4\] \(expected 0 <= row < 2, 0 <= pos < 3",
        K.row_patch,
        x,
        y,
        i,
        ok,
    )
    expect(KernelIndexError, r"src_idx\[1\] = \(1, 3\) is out of range for src", K.row_patch, x, y, ok, i)
    expect(IndexError, r"negative|out of range", K.row_patch, x, y, torch.tensor([[-1, 0]]), torch.tensor([[0, 0]]))
    expect(KernelIndexError, r"idx\[1\] = \(1, 3\) is out of range for x", K.add_scaled, x, torch.ones(4), i, 1.0)
    expect(KernelIndexError, r"idx\[1\] = \(1, 3\)", K.noise, x, i, 1.0, torch.tensor([1, 2]))
    expect(KernelIndexError, r"idx\[1\] = \(1, 3\)", K.project, x, torch.ones(4, 1), torch.ones(1, 4), None, i)
    h = torch.zeros(2, 3, 4, 5)
    expect(
        KernelIndexError,
        r"0 <= head < 4",
        K.head_patch,
        h,
        h.clone(),
        torch.tensor([[0, 0, 4]]),
        torch.tensor([[0, 0, 0]]),
    )


def test_dtype_and_device_mismatch(backend_name):
    x, y = _xy()
    i = torch.tensor([[0, 0]])
    expect(
        KernelError, r"dtype mismatch: dst is torch.float32 but src is torch.float16", K.row_patch, x, y.half(), i, i
    )
    expect(KernelError, r"device mismatch: src is on meta but dst is on cpu", K.row_patch, x, y.to("meta"), i, i)
    expect(
        KernelError, r"dst_idx must be an integer \(int64\) tensor, got torch.float32", K.row_patch, x, y, i.float(), i
    )
    expect(KernelError, r"dst must be float16, bfloat16, float32 or float64, got torch.int64",
           K.row_patch, x.long(), y.long(), i, i)


def test_shape_errors(backend_name):
    x, y = _xy()
    i = torch.tensor([[0, 0]])
    expect(
        KernelError,
        r"dst_idx must have shape \[K, 2\] or \[K, 3\], got \[1, 4\]",
        K.row_patch,
        x,
        y,
        torch.zeros(1, 4, dtype=torch.long),
        i,
    )
    expect(KernelError, r"same shape", K.row_patch, x, y, i, torch.tensor([[0, 0], [0, 0]]))
    expect(
        KernelError,
        r"feature-size mismatch: dst features \[4\] .* src features \[5\]",
        K.row_patch,
        x,
        torch.zeros(2, 3, 5),
        i,
        i,
    )
    expect(KernelError, r"alpha must be a float or a tensor of shape \[1\]", K.row_patch, x, y, i, i, torch.ones(2))
    expect(
        KernelError,
        r"head_patch expects dst of shape \[N, T, H, Dh\]",
        K.head_patch,
        x,
        y,
        torch.zeros(1, 3, dtype=torch.long),
        torch.zeros(1, 3, dtype=torch.long),
    )
    expect(
        KernelError, r"v must have shape \[F\] = \[4\] or \[K, F\] = \[1, 4\]", K.add_scaled, x, torch.ones(5), i, 1.0
    )
    expect(KernelError, r"norm must be None or 'relative', got 'l2'", K.add_scaled, x, torch.ones(4), i, 1.0, norm="l2")
    expect(KernelError, r"x must have shape \[N, T, F\]", K.add_scaled, x[0], torch.ones(4), i, 1.0)
    expect(KernelError, r"L must have shape \[F, k\] with F = 4", K.project, x, torch.ones(5, 2), torch.ones(2, 4))
    expect(KernelError, r"R must have shape \[k, F\] = \[2, 4\]", K.project, x, torch.ones(4, 2), torch.ones(3, 4))
    expect(
        KernelError,
        r"mu must have shape \[F\] = \[4\]",
        K.project,
        x,
        torch.ones(4, 2),
        torch.ones(2, 4),
        torch.ones(3),
    )
    expect(KernelError, r"seeds must have shape \[K\] = \[1\]", K.noise, x, i, 1.0, torch.tensor([1, 2]))
    expect(KernelError, r"seeds must be an integer", K.noise, x, i, 1.0, torch.tensor([1.0]))
    expect(
        KernelError, r"std must be a float or a tensor of shape \[1\]", K.noise, x, i, torch.ones(3), torch.tensor([1])
    )


def test_bad_env_value(monkeypatch):
    monkeypatch.setenv("INTERP_KERNELS", "cuda")
    with pytest.raises(
        KernelError, match=r"INTERP_KERNELS='cuda' is not a valid choice; expected one of 'auto', 'torch', 'triton'"
    ):
        K.backend(torch.zeros(1))


def test_backend_selection(monkeypatch):
    monkeypatch.delenv("INTERP_KERNELS", raising=False)
    assert K.backend(torch.zeros(1)) == "torch"  # CPU -> reference
    monkeypatch.setenv("INTERP_KERNELS", "torch")
    assert K.backend(torch.zeros(1)) == "torch"
    monkeypatch.setenv("INTERP_KERNELS", "triton")
    assert K.backend(torch.zeros(1)) == "triton"


def test_float64_is_reference_only(monkeypatch):
    pytest.importorskip("triton")
    x = torch.zeros(1, 1, 2, dtype=torch.float64)
    i = torch.tensor([[0, 0]])
    monkeypatch.setenv("INTERP_KERNELS", "auto")
    K.row_patch(x, x.clone() + 1, i, i)  # reference handles fp64
    assert x.sum() == 2
    monkeypatch.setenv("INTERP_KERNELS", "triton")
    with pytest.raises(
        KernelError, match=r"triton kernels support float16, bfloat16 and float32 tensors, got torch.float64"
    ):
        K.row_patch(x, x.clone(), i, i)


def test_triton_on_cpu_without_interpreter_is_a_clear_error():
    pytest.importorskip("triton")
    code = textwrap.dedent(
        """
        import torch, interp.kernels as K
        x = torch.zeros(2, 3, 4)
        i = torch.tensor([[0, 0]])
        try:
            K.row_patch(x, x.clone() + 1, i, i)
        except K.KernelBackendError as e:
            print("ERR:", e)
        print("SUM:", float(x.sum()))
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["INTERP_KERNELS"] = "triton"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert "ERR:" in out.stdout, out.stdout + out.stderr
    assert "needs Triton's interpreter" in out.stdout and "TRITON_INTERPRET=1" in out.stdout
    assert "SUM: 0.0" in out.stdout
    assert issubclass(KernelBackendError, RuntimeError)
