#!/bin/bash
# Runs the main's daemon under heaptrack (Debian's `heaptrack` package) and
# every other branchsync command as usual: a heap profile of the main during
# a benchmark round (heaptrack sees allocations through malloc: not with
# the server's optional `mimalloc` feature). Use it as the harness's binary:
#   BRANCHSYNC_BIN=$PWD/scripts/heaptrack-main.sh BENCH_ROUNDS=1 BENCH_BACKLOG=lines \
#     cargo bench -p branchsync-tests --bench versus_native
#   heaptrack_print -f /tmp/heaptrack-main.zst --print-peaks 1 | less
# The profiled daemon runs about three times slower; its figures say where
# memory goes, not how fast anything is.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
bin="${BRANCHSYNC_REAL_BIN:-$here/target/release/branchsync}"
# `run --config FILE`: the main's config is the one that listens.
if [ "${1:-}" = "run" ] && [ "${2:-}" = "--config" ] && grep -q '^listen' "${3:-/dev/null}" 2>/dev/null; then
  exec heaptrack -o "${HEAPTRACK_OUT:-/tmp/heaptrack-main}" "$bin" "$@"
fi
exec "$bin" "$@"
