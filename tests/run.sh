#!/usr/bin/env bash
# The one test command: `bash tests/run.sh`.
# On a fresh machine it installs what is missing (PostgreSQL server binaries,
# libclang, faketime, headless Chromium; Tryton from PyPI into
# target/tryton-venv; a Rust toolchain check), builds the branchsync binary
# with failpoints, runs every test of the workspace against throwaway
# PostgreSQL clusters, builds the Docker images while the tests
# run, then runs two scenarios on the docker-compose stack (see below).
set -euo pipefail
cd "$(dirname "$0")/.."

# The PostgreSQL server binaries, libclang, a C compiler, CA certificates,
# libfaketime (a shop's clock run ahead) and headless Chromium with
# chromedriver (the operator page's test), installed when missing; exports
# BRANCHSYNC_PG_BIN.
# shellcheck source=scripts/prerequisites.sh
. scripts/prerequisites.sh
prerequisites "tests/run.sh" faketime browser

# Tryton 8.2 with its point of sale, from PyPI into target/tryton-venv when
# missing: tests/e2e/tryton.rs runs a head office and two shops on it.
tryton_venv="$PWD/target/tryton-venv"
if ! "$tryton_venv/bin/python3" -c 'import trytond.modules.sale_point, proteus, psycopg' 2>/dev/null; then
  echo "tests/run.sh: installing Tryton 8.2 with sale_point from PyPI into target/tryton-venv (tests/e2e/tryton.rs sells through it)" >&2
  if ! python3 -m venv "$tryton_venv" 2>/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
    python3 -m venv "$tryton_venv"
  fi
  "$tryton_venv/bin/pip" install -q 'trytond[postgresql]==8.2.1' 'trytond-sale-point==8.2.0' 'proteus==8.2.0'
fi
export BRANCHSYNC_TRYTON_BIN="$tryton_venv/bin"

features="branchsync-server/failpoints"
# The binaries and every test target in one build (cargo schedules them
# together; `cargo test` below then only runs them).
cargo build --workspace --bins --tests --features "$features"

# The compose target: the images (no registry needed) and the scenarios
# pos-offline and tryton-offline against the docker-compose stack, with real
# network disconnects (flapping-link runs on throwaway clusters in the e2e
# suite). Needs root (debootstrap) and a Docker engine; skipped with a note
# where those are missing, unless BRANCHSYNC_REQUIRE_COMPOSE=1 (CI).
# BRANCHSYNC_SKIP_COMPOSE=1 skips it. The images are built while the tests
# run (mostly downloads and unpacking; the tests wait for events, not for
# time): the image takes the binary just built (without debug info; a
# release build would add minutes and test a different build), and --erp
# also builds the Tryton image of the erp profile (wheels from PyPI on this
# host).
why_not=""
if [ "${BRANCHSYNC_SKIP_COMPOSE:-0}" = 1 ]; then why_not="skip";
elif [ "$(id -u)" != 0 ]; then why_not="not running as root (docker/build.sh needs debootstrap)";
elif ! command -v docker >/dev/null; then why_not="no docker CLI";
elif ! docker info >/dev/null 2>&1; then why_not="no Docker engine answers";
fi
if [ -z "$why_not" ] && ! docker compose version >/dev/null 2>&1 && ! command -v docker-compose >/dev/null; then
  echo "tests/run.sh: no compose client; installing docker-compose" >&2
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker-compose >/dev/null; } || why_not="docker-compose cannot be installed"
fi
if [ -n "$why_not" ] && [ "$why_not" != skip ] && [ "${BRANCHSYNC_REQUIRE_COMPOSE:-0}" = 1 ]; then
  echo "tests/run.sh: cannot run the compose scenarios: $why_not" >&2
  exit 1
fi
images_pid=""
images_log="$PWD/target/docker-build.log"
if [ -z "$why_not" ]; then
  echo "tests/run.sh: building the Docker images in the background while the tests run (log: $images_log)"
  # At the lowest CPU and I/O priority: the tests' daemons come first.
  BRANCHSYNC_BINARY="$PWD/target/debug/branchsync" nice -n 19 ionice -c 3 bash docker/build.sh --erp >"$images_log" 2>&1 &
  images_pid=$!
  trap '[ -n "$images_pid" ] && { pkill -TERM -P "$images_pid"; kill "$images_pid"; } 2>/dev/null; true' EXIT
fi

# Two test threads: every end-to-end test runs its own clusters and daemons.
cargo test --workspace --features "$features" -- --test-threads="${TEST_THREADS:-2}"
# Capture streams the slot by default; the other capture mode
# ([database] capture = "peek") runs the tests of capture's own faults too.
BRANCHSYNC_TEST_CAPTURE=peek cargo test -p branchsync-tests --features "$features" --test e2e -- \
  --test-threads="${TEST_THREADS:-2}" pg_restart:: convergence::main_and forged_marks::

if [ "$why_not" = skip ]; then
  echo "tests/run.sh: compose scenarios skipped (BRANCHSYNC_SKIP_COMPOSE=1)"
  exit 0
elif [ -n "$why_not" ]; then
  echo "tests/run.sh: compose scenarios skipped: $why_not"
  exit 0
fi
if ! wait "$images_pid"; then
  images_pid=""
  cat "$images_log" >&2
  echo "tests/run.sh: building the Docker images failed (above)" >&2
  exit 1
fi
images_pid=""
tail -n 3 "$images_log"
# tryton-offline: a Tryton server per site (the erp profile), selling through
# its point of sale while a shop is cut off.
for s in pos-offline tryton-offline; do
  echo "tests/run.sh: scenario $s on the compose target"
  ./target/debug/branchsync scenario run "scenarios/$s.toml" --target compose
done
