#!/usr/bin/env bash
# The second device call (docs/gpu.md): every memory mode on one set of weights (seconds and peak memory per stage,
# output against full), then torch.compile of the DiT (warm-up, forward, the clip compiled), under 8 minutes.
# Writes $OUT/gpu.json, $OUT/gpu.txt and $OUT/bench.log.
#   bash bench/device/run_modes.sh           # on the GPU machine (carry [".whl"])
#   bash bench/device/run_modes.sh --tiny    # dry run: tiny preset on the CPU
source "$(dirname "$0")/env.sh"
tiny=(); [ "${1:-}" = "--tiny" ] && { tiny=(--tiny); shift; }
kit "${tiny[@]}" --phases card memory_modes load preprocess compile "$@"
