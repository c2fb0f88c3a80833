#!/bin/bash
# One device call: the codebook-format Triton kernel tests compiled on the GPU, then the
# kernels against the fp16 dense matmul on Llama-3-70B shapes (1x16 and 2x8, groups of 8).
# From the repository root on a CUDA machine:
#   bash benchmarks/codebook_gpu_check.sh [OUTDIR] [PYTEST -k EXPRESSION] [BATCHES]
out=${1:-${OUT:-/tmp/codebook_gpu_check}}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv
timeout 150 python3 -m pytest --noconftest -q -p no:cacheprovider tests/test_codebook_kernels.py ${2:+-k "$2"} \
    >"$out/pytest.log" 2>&1; echo "pytest rc $?"; grep -E "^(FAILED|E  )" "$out/pytest.log" | head -8; tail -1 "$out/pytest.log"
timeout 150 python3 benchmarks/codebook_kernel_speed.py --batches "${3:-1,4,16,128}" \
    2>"$out/speed.err" | tee "$out/speed.log"; tail -3 "$out/speed.err"
