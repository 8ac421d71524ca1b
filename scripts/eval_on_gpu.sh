#!/usr/bin/env bash
# msa-tiny's accuracy against memory size on one CUDA GPU, up to 100M tokens, in one bounded run.
#
#   OUT=results/ bash scripts/eval_on_gpu.sh [SECONDS]
#
# SKIP_KERNEL_TESTS=1 leaves step 1 out. Needs torch, tokenizers, safetensors, numpy and pyyaml (no Ray: the in-process backend). Steps:
#  1. the Triton kernel tests on the GPU, in the background (kernels.log);
#  2. a 16K smoke run with the Triton kernels; if it fails, again with MSA_KERNELS=reference
#     (the torch references on the GPU); if that fails too, the sweep runs on the CPU;
#  3. the sweep: niah_single and two_hop (with its one-round baseline), 20 examples each, at
#     16K, 10M, 32M, 64M and 100M tokens (or $SIZES); the background haystack grows from one size to the next and
#     each finished size is written to eval-gpu.json at once, so a run stopped at the deadline
#     keeps the sizes it finished.
set -u
OUT=${OUT:?set OUT to a folder for the results}
BUDGET=${1:-540}
START=$SECONDS
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$(pwd) PYTHONUNBUFFERED=1
left() { local t=$((BUDGET - (SECONDS - START))); echo $((t > 1 ? t : 1)); }
MSA="python3 -m msa_cluster.cluster.cli"

nvidia-smi -L 2>&1 | tee "$OUT/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())" | tee -a "$OUT/gpu.txt"
[ -n "${SKIP_KERNEL_TESTS:-}" ] || (timeout 240 python3 -m pytest -q -p no:cacheprovider tests/kernels/test_triton_kernels.py > "$OUT/kernels.log" 2>&1; echo "exit $?" >> "$OUT/kernels.log") &


DEVICE=cuda
smoke() { timeout 90 $MSA eval --device "$DEVICE" --sizes 16K --examples 1 --tasks two_hop --out "$OUT/smoke-$1.json" > "$OUT/smoke-$1.log" 2>&1; }
if smoke triton; then
  echo "smoke: cuda with the Triton kernels"
else
  tail -20 "$OUT/smoke-triton.log"
  export MSA_KERNELS=reference
  if smoke reference; then echo "smoke: cuda with the torch references"; else tail -20 "$OUT/smoke-reference.log"; DEVICE=cpu; echo "smoke: falling back to cpu"; fi
fi
SIZES=${SIZES:-16K,10M,32M,64M,100M}
[ "$DEVICE" = cpu ] && SIZES=${CPU_SIZES:-16K,1M,10M}
timeout "$(left)" $MSA eval --device "$DEVICE" --sizes "$SIZES" --examples 20 \
  --tasks niah_single,two_hop --out "$OUT/eval-gpu.json" 2>&1 | tee "$OUT/eval-gpu.log"
echo "sweep exit ${PIPESTATUS[0]} after $((SECONDS - START)) s"
wait; if [ -f "$OUT/kernels.log" ]; then tail -5 "$OUT/kernels.log"; fi
