#!/usr/bin/env bash
# The multi-GPU phase (docs/many-gpus.md): parallel units on ONE node with several GPUs (8 for the default degrees).
# It CANNOT run on the one-GPU device a task may be lent: it stops at once, saying so. On a node with enough GPUs it
# times a batch-3 window-step unit at 480x832 (real sizes, random weights, bf16, NCCL) at each degree, degree 1 as
# the baseline in the same run (bench/bench_sp.py --device cuda), then rebuilds the 3 s / 5 s latency estimate on
# 8 GPUs from those measured unit times in place of the model's inputs (bench/sp_estimate.py --measured).
# Writes $OUT/sp_gpu.{json,txt}, $OUT/sp_estimate.{json,txt} and $OUT/sp.log.
#   bash bench/device/sp_multi_gpu.sh                      # degrees 1,2,3,4,6,8
#   DEGREES=1,2,3 bash bench/device/sp_multi_gpu.sh        # what a smaller node holds
#   bash bench/device/sp_multi_gpu.sh --tiny               # dry run: tiny preset, CPU ranks over gloo, degrees 1,2
source "$(dirname "$0")/env.sh"
if [ "${1:-}" = "--tiny" ]; then
  shift
  DEGREES=${DEGREES:-1,2}
  device=(--device cpu --sections timing --preset tiny --warmup 0 --repeats 1)
else
  DEGREES=${DEGREES:-1,2,3,4,6,8}
  device=(--device cuda)
  largest=$(tr ',' '\n' <<<"$DEGREES" | sort -n | tail -n 1)
  gpus=$("$PYTHON" -c "import torch; print(torch.cuda.device_count())")
  if [ "$gpus" -lt "$largest" ]; then
    echo "degree $largest needs $largest GPUs on this node; it has $gpus (a one-GPU lent device cannot run this" \
         "phase): nothing measured" >&2
    exit 2
  fi
fi
"$PYTHON" bench/bench_sp.py "${device[@]}" --degrees "$DEGREES" --json "$OUT/sp_gpu.json" --txt "$OUT/sp_gpu.txt" \
  "$@" >"$OUT/sp.log" 2>&1 || { tail -n 20 "$OUT/sp.log"; exit 1; }
cat "$OUT/sp_gpu.txt"
"$PYTHON" bench/sp_estimate.py --measured "$OUT/sp_gpu.json" --json "$OUT/sp_estimate.json" \
  --txt "$OUT/sp_estimate.txt"
