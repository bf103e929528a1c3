# scripts/prerequisites.sh — sourced by scripts/demo.sh and tests/run.sh.
#
# `prerequisites WHO [faketime] [browser]` installs, from the distribution's packages
# (Debian/Ubuntu, apt), what building and running branchsync needs and this
# machine lacks, after one line that says what it installs and why:
#   - the PostgreSQL server binaries (postgresql): the demo and the tests
#     start throwaway clusters (never the distribution's own);
#   - libclang (libclang-dev): the pg_query crate (PostgreSQL's parser, for
#     DDL replication) generates its bindings with it at build time;
#   - a C compiler and linker (gcc, libc6-dev): Rust links with it, and
#     pg_query and ring compile C;
#   - CA certificates (ca-certificates): cargo fetches crates over HTTPS;
#   - with `faketime`: libfaketime (the tests run a shop's clock ahead);
#   - with `browser`: headless Chromium and chromedriver (chromium,
#     chromium-driver): the operator page is tested in a real browser.
# It never installs Rust: without cargo it says how to get it and fails.
# Exports BRANCHSYNC_PG_BIN (the newest PostgreSQL >= 15 server binaries).

branchsync_pg_bin() {
  local v
  for v in 17 16 15; do
    if [ -x "/usr/lib/postgresql/$v/bin/initdb" ]; then echo "/usr/lib/postgresql/$v/bin"; return 0; fi
  done
  return 1
}

prerequisites() {
  local who=$1 want_faketime="" want_browser="" f a
  for a in "${@:2}"; do
    case $a in
      faketime) want_faketime=faketime ;;
      browser) want_browser=browser ;;
    esac
  done
  local packages=() reasons=()
  if ! branchsync_pg_bin >/dev/null; then
    packages+=(postgresql); reasons+=("the PostgreSQL server binaries")
  fi
  local have_libclang=""
  for f in /usr/lib/llvm-*/lib/libclang.so* /usr/lib/*/libclang-[0-9]*.so*; do
    if [ -e "$f" ]; then have_libclang=yes; break; fi
  done
  if [ -z "$have_libclang" ]; then
    packages+=(libclang-dev); reasons+=("libclang (pg_query's build)")
  fi
  if ! command -v cc >/dev/null; then
    packages+=(gcc libc6-dev); reasons+=("a C compiler and linker")
  fi
  if [ ! -e /etc/ssl/certs/ca-certificates.crt ]; then
    packages+=(ca-certificates); reasons+=("CA certificates (cargo's downloads)")
  fi
  if [ "$want_faketime" = faketime ] && ! ls /usr/lib/*/faketime/libfaketime.so.1 >/dev/null 2>&1; then
    packages+=(faketime); reasons+=("libfaketime (a shop's clock run ahead)")
  fi
  if [ "$want_browser" = browser ] && ! command -v chromedriver >/dev/null; then
    packages+=(chromium chromium-driver fonts-liberation); reasons+=("headless Chromium and chromedriver (the operator page's test)")
  fi
  if [ ${#packages[@]} -gt 0 ]; then
    local list
    list=$(IFS=,; echo "${reasons[*]}" | sed 's/,/, /g')
    echo "$who: installing $list: apt-get install ${packages[*]}" >&2
    local sudo=""
    if [ "$(id -u)" != 0 ]; then
      command -v sudo >/dev/null || { echo "$who: not root and no sudo: install ${packages[*]} first" >&2; return 1; }
      sudo=sudo
    fi
    command -v apt-get >/dev/null || { echo "$who: no apt-get here: install ${reasons[*]} with this system's package manager first" >&2; return 1; }
    $sudo apt-get update -qq || { echo "$who: apt-get update failed" >&2; return 1; }
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null \
      || { echo "$who: apt-get install ${packages[*]} failed" >&2; return 1; }
    if [[ " ${packages[*]} " == *" postgresql "* ]]; then
      # Debian starts a default cluster; branchsync's demo and tests never use it.
      $sudo systemctl stop postgresql 2>/dev/null || $sudo service postgresql stop 2>/dev/null || true
    fi
  fi
  BRANCHSYNC_PG_BIN=$(branchsync_pg_bin) || { echo "$who: no PostgreSQL >= 15 server binaries after the install" >&2; return 1; }
  export BRANCHSYNC_PG_BIN
  if ! command -v cargo >/dev/null; then
    echo "$who: cargo not found: install Rust first (https://rustup.rs, or your distribution's rustc and cargo 1.85 or newer)" >&2
    return 1
  fi
}
