#!/bin/bash
# One device call: the Triton kernel tests compiled on the GPU, then the tile sweep on
# Llama-3-70B shapes (int4 g128; act-order; 3-bit). From the repository root on a CUDA
# machine: bash benchmarks/gpu_check.sh [OUTDIR]
out=${1:-${OUT:-/tmp/gpu_check}}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
timeout 170 python3 -m pytest --noconftest -q -p no:cacheprovider tests/test_kernels.py -k "triton or bench" \
    >"$out/pytest.log" 2>&1; echo "pytest rc $?"; tail -4 "$out/pytest.log"
timeout 250 python3 benchmarks/triton_tune.py --json "$out/tune.json" 2>"$out/tune.err" | tee "$out/tune.log"
timeout 60 python3 benchmarks/triton_tune.py --shapes 8192x8192 --batches 1,32 --act-order \
    --json "$out/tune_act.json" 2>>"$out/tune.err" | tee -a "$out/tune.log"
timeout 40 python3 benchmarks/triton_tune.py --shapes 8192x8192 --batches 1,32 --bits 3 \
    --json "$out/tune_3bit.json" 2>>"$out/tune.err" | tee -a "$out/tune.log"
