#!/bin/bash
# One device call: the kernel tests compiled on the GPU, the tile sweep, and `bench kernels`.
# Run from the repository root on a CUDA machine: bash benchmarks/gpu_check.sh [OUTDIR]
out=${1:-${OUT:-/tmp/gpu_check}}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
timeout 200 python3 -m pytest --noconftest -q -p no:cacheprovider tests/test_kernels.py -k "not real_packed" \
    >"$out/pytest.log" 2>&1; echo "pytest rc $?"; tail -5 "$out/pytest.log"
timeout 300 python3 benchmarks/triton_tune.py --json "$out/tune.json" 2>"$out/tune.err" | tee "$out/tune.log"
timeout 120 python3 benchmarks/kernel_speed.py --batches 1,4,8,32,256 | tee "$out/bench.log"
timeout 60 python3 benchmarks/kernel_speed.py --bits 3 --act-order --shapes 8192x8192 --batches 1,32 | tee -a "$out/bench.log"
