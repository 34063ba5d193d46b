#!/usr/bin/env bash
# The first device call (docs/gpu.md): StableAvatar 1.3B sizes, random weights, bf16, 480x832, under 8 minutes:
# the card, loading, each preprocessing model, the DiT forward at batch 1 and 3, the attention kernel, the VAE decode
# of a 5 s clip, that clip end to end (as many steps as fit, extrapolated to 50), then the step-cache and split-row
# comparisons if time is left. Writes $OUT/gpu.json, $OUT/gpu.txt and $OUT/bench.log.
#   bash bench/device/run.sh            # on the GPU machine (carry [".whl"])
#   bash bench/device/run.sh --tiny     # dry run: tiny preset on the CPU
source "$(dirname "$0")/env.sh"
tiny=(); [ "${1:-}" = "--tiny" ] && { tiny=(--tiny); shift; }
kit "${tiny[@]}" --phases card load preprocess forward sdpa vae_decode e2e acceleration split_rows "$@"
