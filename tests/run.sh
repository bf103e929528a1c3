#!/usr/bin/env bash
# The one test command: `bash tests/run.sh`.
# On a fresh machine it installs what is missing (PostgreSQL server binaries,
# a Rust toolchain check), builds the branchsync binary with failpoints, and
# runs every test of the workspace against throwaway PostgreSQL clusters.
set -euo pipefail
cd "$(dirname "$0")/.."

pg_bin=""
for v in 17 16 15; do
  if [ -x "/usr/lib/postgresql/$v/bin/initdb" ]; then pg_bin="/usr/lib/postgresql/$v/bin"; break; fi
done
if [ -z "$pg_bin" ]; then
  echo "tests/run.sh: PostgreSQL server binaries not found; installing postgresql from the distribution's packages" >&2
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq postgresql >/dev/null
  # Debian starts a default cluster; the tests never use it.
  $SUDO systemctl stop postgresql 2>/dev/null || $SUDO service postgresql stop 2>/dev/null || true
  for v in 17 16 15; do
    if [ -x "/usr/lib/postgresql/$v/bin/initdb" ]; then pg_bin="/usr/lib/postgresql/$v/bin"; break; fi
  done
fi
[ -n "$pg_bin" ] || { echo "tests/run.sh: no PostgreSQL >= 15 server binaries after install" >&2; exit 1; }
export BRANCHSYNC_PG_BIN="$pg_bin"
command -v cargo >/dev/null || { echo "tests/run.sh: cargo not found; install Rust (rustup) first" >&2; exit 1; }
# The pg_query crate (PostgreSQL's parser, for DDL replication) generates its
# bindings with libclang at build time.
have_libclang=""
for f in /usr/lib/llvm-*/lib/libclang.so* /usr/lib/*/libclang-[0-9]*.so*; do
  if [ -e "$f" ]; then have_libclang=yes; break; fi
done
if [ -z "$have_libclang" ]; then
  echo "tests/run.sh: libclang not found (needed to build pg_query); installing libclang-dev" >&2
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq libclang-dev >/dev/null
fi

# libfaketime runs a test cluster's clock ahead (a shop PC an hour fast).
if ! ls /usr/lib/*/faketime/libfaketime.so.1 >/dev/null 2>&1; then
  echo "tests/run.sh: libfaketime not found; installing faketime" >&2
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq faketime >/dev/null
fi

features="branchsync-server/failpoints"
cargo build --workspace --bins --features "$features"
# Two test threads: every end-to-end test runs its own clusters and daemons.
cargo test --workspace --features "$features" -- --test-threads="${TEST_THREADS:-2}"
