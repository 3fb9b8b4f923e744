#!/usr/bin/env bash
# Download the wheels the GPU machine lacks (bench/gpu_wheels.py: pinned list, checks) into a
# git-ignored folder, default .whl/, for CPython 3.12 manylinux x86_64, then check them: one
# version of each, none already in the GPU image, the requirement closure, and the total size.
#
#     bash bench/gpu_wheels.sh [FOLDER]
#
# Needs a package index (run it where pip can download) and, for the import checks, the
# environment of .ci/setup (.venv, with mergekit installed).
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${1:-.whl}
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
PLATFORMS=()
for p in manylinux1_x86_64 manylinux2010_x86_64 manylinux2014_x86_64 manylinux_2_17_x86_64 \
         manylinux_2_24_x86_64 manylinux_2_27_x86_64 manylinux_2_28_x86_64 manylinux_2_31_x86_64 \
         manylinux_2_34_x86_64 manylinux_2_35_x86_64 manylinux_2_39_x86_64; do
    PLATFORMS+=(--platform "$p")
done
download() {  # folder, pins...
    local dir=$1
    shift
    mkdir -p "$dir"
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        "${PLATFORMS[@]}" -d "$dir" "$@" 2> >(grep -v "^WARNING: Location" >&2)
}
mapfile -t PINS < <("$PY" bench/gpu_wheels.py pins)
mapfile -t FALLBACK < <("$PY" bench/gpu_wheels.py pins --fallback)
# Other versions of the pinned packages, left by an earlier pin: one version of each travels.
declare -A PINNED
for pin in "${PINS[@]}" "${FALLBACK[@]}"; do
    PINNED[$(echo "${pin%%==*}" | tr 'A-Z.-' 'a-z__')]=${pin#*==}
done
for f in "$DEST"/*.whl "$DEST"/fallback/*.whl; do
    [ -e "$f" ] || continue
    stem=$(basename "$f" .whl)
    name=$(echo "${stem%%-*}" | tr 'A-Z.-' 'a-z__')
    rest=${stem#*-}
    if [ -n "${PINNED[$name]:-}" ] && [ "${rest%%-*}" != "${PINNED[$name]}" ]; then
        echo "removing $f (pinned: ${PINNED[$name]})"
        rm -f "$f"
    fi
done
download "$DEST" "${PINS[@]}"
download "$DEST/fallback" "${FALLBACK[@]}"
"$PY" bench/gpu_wheels.py check "$DEST"
if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    # What travels: tracked and untracked-not-ignored files, plus the wheel folder.
    tree=$(git ls-files -z -co --exclude-standard | xargs -0 -r stat -c %s 2>/dev/null | awk '{s+=$1} END {print s+0}')
    wheels=$(du -sb "$DEST" | cut -f1)
    total=$((tree + wheels))
    echo "working tree $((tree / 1024)) KiB + wheels $((wheels / 1024)) KiB = $((total / 1024)) KiB" \
         "(limit 65536 KiB)"
    [ "$total" -le $((64 << 20)) ] || { echo "error: over 64 MiB together" >&2; exit 1; }
fi
