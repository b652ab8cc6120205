#!/usr/bin/env bash
# Everything interp checks and measures on a CUDA GPU, as one short script (at most 8 minutes on an H200).
#
#     bash benchmarks/gpu_run.sh            # from the repository root; results go to $OUT (default /tmp/interp-gpu)
#
# Stages, most important first, each under its own time limit so that one slow stage cannot starve the rest:
#   1. benchmarks/kernels.py: each Triton op checked against the torch reference on the GPU, then the
#      fp16 table (op time, GB/s, % of copy bandwidth, speed-up over the unfused torch sequence), and bf16 at
#      the large size; then the projection kernel's launch configurations (--project-sweep);
#   2. tests/interp/test_cuda.py: runs, grids and sweeps on CUDA equal the same on CPU (compiled kernels);
#   3. tests/kernels/test_kernels_triton.py on CUDA: the kernels' property tests (layouts, dtypes,
#      duplicates, empty index sets) against the reference, compiled instead of interpreted;
#   4. benchmarks/patching.py --device cuda: interp vs nnsight (TransformerLens if installed) on the GPU.
# Python packages missing on the machine can travel as wheels in .whl/ (see docs/PERFORMANCE.md).
set -u
OUT=${OUT:-/tmp/interp-gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" TQDM_DISABLE=1
unset TRITON_INTERPRET
PY=${PY:-python3}
if compgen -G ".whl/*.whl" > /dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/interp-site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/interp-site"
fi
stage() {  # stage NAME SECONDS CMD...   (STAGES="a b" runs only the stages named)
  local name=$1 limit=$2; shift 2
  if [ -n "${STAGES:-}" ] && [[ " $STAGES " != *" $name "* ]]; then return; fi
  echo "=== $name (limit ${limit}s): $*" | tee -a "$OUT/summary.txt"
  local t0=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.txt" 2>&1
  local rc=$?
  tail -n 60 "$OUT/$name.txt"
  echo "=== $name: exit $rc after $((SECONDS - t0))s" | tee -a "$OUT/summary.txt"
}
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  $PY -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
} 2>&1 | tee "$OUT/env.txt"
stage kernels_fp16 90 $PY benchmarks/kernels.py
stage kernels_bf16 40 $PY benchmarks/kernels.py --dtype bfloat16 --sizes large
stage project_sweep 100 $PY benchmarks/kernels.py --project-sweep
stage test_cuda 90 env INTERP_TEST_DEVICE=cuda $PY -m pytest -q -p no:cacheprovider tests/interp/test_cuda.py
stage kernel_properties ${PROPERTY_LIMIT:-100} env INTERP_TEST_DEVICE=cuda INTERP_KERNEL_EXAMPLES=${EXAMPLES:-40} \
  $PY -m pytest -q -p no:cacheprovider tests/kernels/test_kernels_triton.py
stage patching 100 $PY benchmarks/patching.py --device cuda --skip tl --repeats 3 --pairs minimal,random
cat "$OUT/summary.txt"
