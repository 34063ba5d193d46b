#!/usr/bin/env bash
# `make device-check`: the device kit on the GPU image's versions, here on the CPU: a Python 3.12 environment with
# bench/device/image-packages.txt (torch 2.11, transformers 5.17, ...) and without what the image lacks, plus the
# carried wheels of `make device-wheels`, runs both device scripts at tiny size and must finish without an error.
# The environment (~5 GB) is kept in $DEVICE_VENV and rebuilt when the package list changes.
set -euo pipefail
cd "$(dirname "$0")/../.."
VENV=${DEVICE_VENV:-/tmp/stable-avatar-device-venv}
OUT=${DEVICE_CHECK_OUT:-/tmp/stable-avatar-device-check}
PY312=${PY312:-}
if [ -z "$PY312" ]; then
  for candidate in python3.12 "$(pyenv root 2>/dev/null || echo /nonexistent)"/versions/3.12*/bin/python3.12; do
    if "$candidate" --version >/dev/null 2>&1; then PY312=$candidate; break; fi
  done
fi
[ -n "$PY312" ] || { echo "no working python3.12 found (set PY312)" >&2; exit 1; }
if [ ! -f "$VENV/.installed" ] || [ bench/device/image-packages.txt -nt "$VENV/.installed" ]; then
  rm -rf "$VENV"
  "$PY312" -m venv "$VENV"
  "$VENV/bin/pip" install -q -r bench/device/image-packages.txt
  # What the carried wheels bring: out again where a dependency pulled it in (typer pulls pydantic).
  "$VENV/bin/pip" uninstall -y -q $(grep -v '^\s*#' bench/device/wheels.txt | grep -v '^\s*$' | sed 's/==.*//' \
    | grep -v -x typing-extensions)
  touch "$VENV/.installed"
fi
for module in diffusers pydantic ffmpeg imageio_ffmpeg; do  # the image lacks them: so must this environment
  if "$VENV/bin/python" -c "import $module" 2>/dev/null; then
    echo "$module is importable in $VENV, but the GPU image lacks it: the check would prove nothing" >&2; exit 1
  fi
done
bash bench/device/fetch_wheels.sh
rm -rf "$OUT" && mkdir -p "$OUT/run" "$OUT/modes"
status=0
OUT="$OUT/run" PYTHON="$VENV/bin/python" BUDGET_S=600 bash bench/device/run.sh --tiny || status=1
OUT="$OUT/modes" PYTHON="$VENV/bin/python" BUDGET_S=600 bash bench/device/run_modes.sh --tiny || status=1
"$VENV/bin/python" - "$OUT" <<'PY' || status=1
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
for call, phases in (("run", ["card", "load", "preprocess", "forward", "sdpa", "vae_decode", "e2e"]),
                     ("modes", ["card", "memory_modes", "load", "preprocess", "compile"])):
    result = json.loads((out / call / "gpu.json").read_text())
    meta = result["meta"]
    missing = [p for p in phases if p not in result]
    print(f"{call}: python {meta['python']}, torch {meta['torch']}, diffusers {meta['diffusers']}; "
          f"errors {sorted(result['errors'])}, skipped {sorted(result['skipped'])}, missing {missing}")
    if result["errors"] or missing or not meta["python"].startswith("3.12") or not meta["torch"].startswith("2.11"):
        sys.exit(1)
PY
echo "device check: $([ $status = 0 ] && echo passed || echo FAILED) (results in $OUT)"
exit $status
