#!/bin/bash
# One device call: the Triton kernel tests compiled on the GPU, then each path's default
# tiles on Llama-3-70B shapes (int4 g128; act-order). From the repository root on a CUDA
# machine: bash benchmarks/gpu_check.sh [OUTDIR] [PYTEST -k EXPRESSION] [BATCHES]
# (the full sweep of tiles: benchmarks/triton_tune.py)
out=${1:-${OUT:-/tmp/gpu_check}}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv
timeout 130 python3 -m pytest --noconftest -q -p no:cacheprovider tests/test_kernels.py -k "${2:-triton or bench}" \
    >"$out/pytest.log" 2>&1; echo "pytest rc $?"; grep -E "^(FAILED|E  )" "$out/pytest.log" | head -8; tail -1 "$out/pytest.log"
timeout 110 python3 benchmarks/triton_tune.py --quick --batches "${3:-1,4,8,32,256,2048}" --json "$out/tune.json" \
    2>"$out/tune.err" | tee "$out/tune.log"
