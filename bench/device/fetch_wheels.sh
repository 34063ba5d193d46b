#!/usr/bin/env bash
# `make device-wheels`: the wheels of bench/device/wheels.txt for the GPU machine (Python 3.12, manylinux x86-64),
# --no-deps, into .whl/ (git-ignored; a device call carries it: carry [".whl"]). Prints the total size and fails
# above the 50 MiB the working tree's 64 MiB per call leaves for them.
set -euo pipefail
cd "$(dirname "$0")/../.."
DEST=${WHEEL_DIR:-.whl}
LIMIT_MIB=${WHEEL_LIMIT_MIB:-50}
PYTHON=${PYTHON:-python3}
mkdir -p "$DEST"
mapfile -t WANTED < <(grep -v '^\s*#' bench/device/wheels.txt | grep -v '^\s*$')
# One version of each: a wheel of another version left from an earlier pin would stop the install there.
for file in "$DEST"/*.whl; do
  [ -e "$file" ] || continue
  base=$(basename "$file")
  keep=0
  for pin in "${WANTED[@]}"; do
    name=${pin%%==*}; version=${pin##*==}
    norm=$(echo "$name" | tr '-' '_')
    case "${base,,}" in "${norm,,}-${version}-"*) keep=1 ;; esac
  done
  [ $keep = 1 ] || { echo "removing $base (not in bench/device/wheels.txt)"; rm -f "$file"; }
done
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$DEST" "${WANTED[@]}"
count=$(ls "$DEST"/*.whl | wc -l)
bytes=$(du -cb "$DEST"/*.whl | tail -1 | cut -f1)
mib=$(awk -v b="$bytes" 'BEGIN { printf "%.1f", b / 1048576 }')
ls -l "$DEST"/*.whl | awk '{ printf "  %8.1f MiB  %s\n", $5 / 1048576, $NF }'
echo "device wheels: $count files, $mib MiB in $DEST (limit $LIMIT_MIB MiB)"
if [ "$count" -ne "${#WANTED[@]}" ]; then echo "expected ${#WANTED[@]} wheels, found $count" >&2; exit 1; fi
awk -v b="$bytes" -v l="$LIMIT_MIB" 'BEGIN { exit !(b <= l * 1048576) }' || { echo "over $LIMIT_MIB MiB" >&2; exit 1; }
