#!/usr/bin/env bash
# Issue 11's GPU checks in one go, for a session that is lent a GPU machine (torch 2.11, triton 3.6,
# no Ray there). Run from the repository root with the device tool, e.g.
#     run(command="bash bench/gpu_check.sh", timeout_s=540)
# It writes every output under $OUT (or ./gpu_out): the device, the kernel tests, the bf16 numerics
# and the routing / batching / attention benchmarks. Each step has its own time limit so that a
# hang in one still leaves the others' results; the whole script stays under ~8 minutes.
# Record the numbers with the device name in BENCHMARKS.md (never extrapolate them from a CPU run).
set -u
OUT="${OUT:-$PWD/gpu_out}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONDONTWRITEBYTECODE=1

{
  date -u
  nvidia-smi || true
  python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name(0))"
} > "$OUT/device.txt" 2>&1

# 1. every kernel test on CUDA (Triton kernels against their references, the CUDA dispatch test)
timeout 240 python -m pytest -q -p no:cacheprovider -o addopts= tests/kernels > "$OUT/pytest_kernels.txt" 2>&1
echo "pytest tests/kernels rc=$?" >> "$OUT/summary.txt"

# 2. bf16 prefill and decode against the reference, CPU == GPU routing, and the benchmarks
timeout 240 python bench/bench_gpu.py > "$OUT/bench_gpu.txt" 2>&1
echo "bench/bench_gpu.py rc=$?" >> "$OUT/summary.txt"

# 3. the kernel benchmark at model scale (Triton dispatchers against the references)
timeout 120 python bench/bench_kernels.py --size large > "$OUT/bench_kernels_large.txt" 2>&1
echo "bench/bench_kernels.py --size large rc=$?" >> "$OUT/summary.txt"

cat "$OUT/summary.txt"
tail -n 12 "$OUT/bench_gpu.txt"
