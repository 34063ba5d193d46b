# Sourced by run.sh and run_modes.sh: the repository root, the carried wheels installed to a temporary target
# (--no-index: the GPU machine reaches no registry) ahead of the image's packages, and $OUT.
cd "$(dirname "${BASH_SOURCE[0]}")/../.." || exit 1
STARTED=$(date +%s)
PYTHON=${PYTHON:-python3}
OUT=${OUT:-bench/results/device}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
WHEELS=${WHEELS:-.whl}
if compgen -G "$WHEELS/*.whl" >/dev/null; then
  SITE=$(mktemp -d /tmp/stable-avatar-site-XXXXXX)
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
    "$WHEELS"/*.whl || { echo "installing the carried wheels failed" >&2; exit 1; }
  export PYTHONPATH="$SITE:$PWD"
  echo "installed $(ls "$WHEELS"/*.whl | wc -l) carried wheels into $SITE"
else
  export PYTHONPATH="$PWD"
  echo "no wheels in $WHEELS (make device-wheels; carry [\".whl\"]): using the installed packages"
fi

# kit ARGS...: bench/bench_gpu.py under what is left of BUDGET_S (default 480 s = 8 minutes, counted from the
# start of the script, wheel install included), killed at that limit; the JSON and table are rewritten after
# every phase, so what finished is in $OUT either way. --tiny: the tiny preset on the CPU (a dry run).
kit() {
  local budget=${BUDGET_S:-480} args=()
  if [ "${1:-}" = "--tiny" ]; then
    shift
    args=(--preset tiny --device cpu --quick)
  fi
  local left=$(( budget - ($(date +%s) - STARTED) ))
  "$PYTHON" -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, \
'cuda', torch.cuda.is_available())"
  timeout -k 10 "$left" "$PYTHON" bench/bench_gpu.py "${args[@]}" --out-dir "$OUT" --budget-s $(( left - 15 )) \
    "$@" >"$OUT/bench.log" 2>&1
  local code=$?
  [ $code = 124 ] && echo "stopped at the budget of $budget s: $OUT/gpu.json holds the phases that finished"
  tail -n 5 "$OUT/bench.log"
  cat "$OUT/gpu.txt" 2>/dev/null
  return $code
}
