"""Ahead-of-time compile every Triton kernel for a CUDA target (sm_90) without a GPU.

The interpreter runs kernels as numpy code and does not type-check them the way the real compiler
does; compiling to PTX here catches kernels that would only fail on a GPU. Runs in a subprocess
because this test session has TRITON_INTERPRET=1 set.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton")

SCRIPT = textwrap.dedent(
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from interp.kernels import triton as tk
    assert not tk.INTERPRETED
    target = GPUTarget("cuda", 90, 32)
    fails = []

    def comp(fn, sig, consts, name):
        try:
            k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=target,
                               options={"num_warps": 4})
            assert ".entry" in k.asm["ptx"]
            print("OK", name)
        except Exception as e:  # noqa: BLE001
            fails.append(name)
            print("FAIL", name, type(e).__name__, str(e)[:3000])

    def ints(names, t="i32"):
        return {n: t for n in names.split()}

    for m3 in (False, True):
        for keys in (False, True):
            sig = {"idx_ptr": "*i64", "key_ptr": "*i64", "last_ptr": "*i64", "first_ptr": "*i64", "K": "i32",
                   "code": "i64", **ints("si0 si1 D0 D1 D2"), "M3": "constexpr", "KEYS": "constexpr",
                   "FIRST": "constexpr", "BLOCK": "constexpr"}
            comp(tk._mark_kernel, sig, {"M3": m3, "KEYS": keys, "FIRST": True, "BLOCK": 1024},
                 f"mark m3={m3} keys={keys}")
    for dt in ("fp16", "bf16", "fp32"):
        sig = {"dst_ptr": f"*{dt}", "src_ptr": f"*{dt}", "didx_ptr": "*i64", "sidx_ptr": "*i64", "key_ptr": "*i64",
               "last_ptr": "*i64", "alpha_ptr": "*fp32", "alpha": "fp32", "code": "i64",
               **ints("dsi0 dsi1 D0 D1 D2 DS0 DS1 DS2 ssi0 ssi1 E0 E1 E2 ES0 ES1 ES2 F F2 sd1 sd2 ss1 ss2"),
               "M3": "constexpr", "KEYS": "constexpr", "SRC_ROWS": "constexpr", "ALPHA": "constexpr",
               "TWO_D": "constexpr", "BLOCK": "constexpr"}
        comp(tk._row_patch_kernel, sig, {"M3": True, "KEYS": False, "SRC_ROWS": False, "ALPHA": 2, "TWO_D": True,
                                         "BLOCK": 1024}, f"row_patch {dt} blend 2d heads")
        comp(tk._row_patch_kernel, sig, {"M3": False, "KEYS": True, "SRC_ROWS": True, "ALPHA": 0, "TWO_D": False,
                                         "BLOCK": 1024}, f"row_patch {dt} copy aliased dense keys")
        comp(tk._row_patch_kernel, sig, {"M3": False, "KEYS": False, "SRC_ROWS": False, "ALPHA": 1, "TWO_D": False,
                                         "BLOCK": 1024}, f"row_patch {dt} scalar blend")
        sig = {"x_ptr": f"*{dt}", "v_ptr": f"*{dt}", "idx_ptr": "*i64", "key_ptr": "*i64", "last_ptr": "*i64",
               "first_ptr": "*i64", "alpha_ptr": "*fp32", "alpha": "fp32", "code": "i64",
               **ints("si0 si1 D0 D1 S0 S1 F sx sv0 sv1"), "KEYS": "constexpr", "ALPHA_T": "constexpr",
               "RELATIVE": "constexpr", "RENORM": "constexpr", "BLOCK": "constexpr"}
        comp(tk._add_scaled_kernel, sig, {"KEYS": False, "ALPHA_T": True, "RELATIVE": True, "RENORM": True,
                                          "BLOCK": 4096}, f"add {dt} relative renorm")
        comp(tk._add_scaled_kernel, sig, {"KEYS": True, "ALPHA_T": False, "RELATIVE": False, "RENORM": False,
                                          "BLOCK": 4096}, f"add {dt} plain")
        sig = {"x_ptr": f"*{dt}", "idx_ptr": "*i64", "key_ptr": "*i64", "last_ptr": "*i64", "first_ptr": "*i64",
               "std_ptr": "*fp32", "std": "fp32", "seed_ptr": "*i64", "code": "i64",
               **ints("si0 si1 D0 D1 S0 S1 F sx"), "KEYS": "constexpr", "STD_T": "constexpr", "BLOCK": "constexpr"}
        comp(tk._noise_kernel, sig, {"KEYS": False, "STD_T": True, "BLOCK": 2048}, f"noise {dt}")
        comp(tk._noise_kernel, sig, {"KEYS": True, "STD_T": False, "BLOCK": 2048}, f"noise {dt} scalar std")
        sig = {"x_ptr": f"*{dt}", "idx_ptr": "*i64", "key_ptr": "*i64", "last_ptr": "*i64", "row_off_ptr": "*i64",
               "L_ptr": "*fp32", "R_ptr": "*fp32", "mu_ptr": "*fp32", "code": "i64",
               **ints("si0 si1 D0 D1 S0 S1 M F RK sx srow"), "HAS_MU": "constexpr", "ROWS": "constexpr",
               "KEYS": "constexpr", "HALF_DOT": "constexpr", "BLOCK_M": "constexpr", "BLOCK_F": "constexpr",
               "BLOCK_K": "constexpr"}
        comp(tk._project_kernel, sig, {"HAS_MU": True, "ROWS": 0, "KEYS": False, "HALF_DOT": dt != "fp32",
                                       "BLOCK_M": 32, "BLOCK_F": 64, "BLOCK_K": 64}, f"project {dt} idx k=64")
        comp(tk._project_kernel, sig, {"HAS_MU": False, "ROWS": 1, "KEYS": False, "HALF_DOT": False,
                                       "BLOCK_M": 16, "BLOCK_F": 128, "BLOCK_K": 16}, f"project {dt} all rows k=16")
        comp(tk._project_kernel, sig, {"HAS_MU": True, "ROWS": 2, "KEYS": True, "HALF_DOT": False,
                                       "BLOCK_M": 16, "BLOCK_F": 128, "BLOCK_K": 16}, f"project {dt} row offsets")
    comp(tk._philox_bits_kernel, {"out_ptr": "*i32", "seed_ptr": "*i64", "F": "i32", "BLOCK": "constexpr"},
         {"BLOCK": 1024}, "philox_bits")
    print("FAILED:", fails)
    """
)


def test_kernels_compile_for_cuda_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    try:
        out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired:
        pytest.fail("compiling the kernels for sm_90 took over 600 s")
    text = out.stdout + out.stderr
    if "FAILED: []" not in out.stdout:
        if "ptxas" in text and ("not found" in text or "No such file" in text):
            pytest.skip("no ptxas available to compile for CUDA: " + text[-500:])
        pytest.fail(text[-6000:])
