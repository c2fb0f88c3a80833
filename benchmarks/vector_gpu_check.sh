#!/bin/bash
# One device call: the vector-format Triton kernel tests compiled on the GPU, then the
# kernels against the fp16 dense matmul on Llama-3-70B shapes (v8 k65536, v4 k256, v8
# k65536 + 256 residual). From the repository root on a CUDA machine:
#   bash benchmarks/vector_gpu_check.sh [OUTDIR] [PYTEST -k EXPRESSION] [BATCHES]
out=${1:-${OUT:-/tmp/vector_gpu_check}}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv
timeout 240 python3 -m pytest --noconftest -q -p no:cacheprovider tests/test_vector_kernels.py ${2:+-k "$2"} \
    >"$out/pytest.log" 2>&1; echo "pytest rc $?"; grep -E "^(FAILED|E  )" "$out/pytest.log" | head -8; tail -1 "$out/pytest.log"
timeout 240 python3 benchmarks/vector_kernel_speed.py --batches "${3:-1,2,4,16,128}" \
    2>"$out/speed.err" | tee "$out/speed.log"; tail -3 "$out/speed.err"
