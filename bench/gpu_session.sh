#!/usr/bin/env bash
# One command per stage on a bare GPU machine: build, test, bench (see bench/gpu_session.py).
#
#     bash bench/gpu_session.sh build|test|bench|all|status OUTDIR [--commit SHA] [options]
#     bash bench/gpu_session.sh all /tmp/gpu-dry --dry-run          # here, without a GPU
#
# OUTDIR receives the combined log, summary.json, junit.xml and the CSVs/PNG whatever fails; should
# the Python driver itself not start, its console output is written there instead.
cd "$(dirname "$0")/.." || exit 1
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON
elif [ -x .venv/bin/python ]; then PY=.venv/bin/python  # a development checkout (.ci/setup)
else PY=python3; fi
out=${2:-}
console=$(mktemp /tmp/gpu_session_console.XXXXXX)
"$PY" -u bench/gpu_session.py "$@" 2>&1 | tee "$console"
rc=${PIPESTATUS[0]}
if [ -n "$out" ] && [ ! -s "$out/session.log" ]; then
    mkdir -p "$out" && { echo "bench/gpu_session.py exited $rc before writing its log:"; cat "$console"; } \
        > "$out/session.log"
fi
rm -f "$console"
exit "$rc"
