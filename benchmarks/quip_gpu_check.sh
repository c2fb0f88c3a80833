#!/bin/bash
# One device call: the incoherent-format Triton kernel tests compiled on the GPU, then the
# E8P path against the fp16 dense matmul on Llama-3-70B shapes, then one layer's QuIP#
# fit on the GPU against GPTQ 2-bit. From the repository root on a CUDA machine:
#   bash benchmarks/quip_gpu_check.sh [OUTDIR]
out=${1:-${OUT:-/tmp/quip_gpu_check}}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
nvidia-smi --query-gpu=name,memory.total --format=csv
timeout 200 python3 -m pytest --noconftest -q -p no:cacheprovider tests/test_quip_kernels.py \
    >"$out/pytest.log" 2>&1; echo "pytest rc $?"; grep -E "^(FAILED|E  )" "$out/pytest.log" | head -8; tail -1 "$out/pytest.log"
timeout 200 python3 benchmarks/quip_kernel_speed.py 2>"$out/speed.err" | tee "$out/speed.log"; tail -3 "$out/speed.err"
timeout 150 python3 benchmarks/quip_layer.py --device cuda --rows 0 --shape 8192x8192 2>&1 | tee "$out/layer.log"
