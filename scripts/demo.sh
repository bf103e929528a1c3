#!/usr/bin/env bash
# The first command: `bash scripts/demo.sh` (arguments go to `branchsync
# demo`, e.g. --seed N). A head office and two shops on throwaway local
# PostgreSQL clusters; one shop sells offline for a simulated day, then
# reconnects, and every check must pass.
#
# On a machine with Rust but nothing else, it first installs (one line says
# what) the PostgreSQL server binaries, libclang and a C compiler from the
# distribution's packages: see scripts/prerequisites.sh. Then it builds the
# daemon in release mode and runs the demo.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/prerequisites.sh
. scripts/prerequisites.sh
prerequisites "scripts/demo.sh"
exec cargo run --release -p branchsync-server -- demo "$@"
