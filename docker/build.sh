#!/usr/bin/env bash
# docker/build.sh — build the branchsync images without pulling anything.
#
#   1. Base image (default branchsync-base:local): used as is when
#      BRANCHSYNC_BASE_IMAGE is set or the image already exists; otherwise a
#      Debian bookworm root filesystem with PostgreSQL 15 is built with
#      debootstrap from this machine's own apt mirror and `docker import`ed.
#      Needs root (debootstrap + chroot).
#   2. Daemon image branchsync:local from docker/Dockerfile, with the base as
#      the build argument BASE, and the branchsync binary built on this host
#      (`cargo build --release -p branchsync-server`; the host must have the
#      same or an older glibc than the image: Debian 12 or older).
#
# Environment:
#   BRANCHSYNC_BASE_IMAGE  base to build on (e.g. debian:bookworm-slim where a
#                          registry is reachable; the Dockerfile then installs
#                          postgresql-15 with apt). Default: branchsync-base:local,
#                          built here when missing.
#   REBUILD_BASE=1         rebuild branchsync-base:local even if it exists.
#   BRANCHSYNC_IMAGE       daemon image tag (default branchsync:local).
#   BRANCHSYNC_BINARY      use this binary instead of building one with cargo.
#   MIRROR                 Debian mirror for debootstrap (default: the one apt uses).
#   SUITE                  Debian suite (default bookworm).
#
#   3. With --erp, also the Tryton image branchsync-tryton:local (the compose
#      stack's "erp" profile) from docker/tryton/Dockerfile: FROM the base,
#      Python from the Debian mirror, Tryton 8.2 with sale_point from wheels
#      fetched from PyPI on this host (`pip wheel`, into docker/tryton/wheels;
#      this host's python3 must be the base's, 3.11).
#
# Options: --base-only, --no-cargo (use target/release/branchsync as it is),
#          --erp (also build branchsync-tryton:local).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/.." && pwd)
SUITE=${SUITE:-bookworm}
LOCAL_BASE=branchsync-base:local
BASE=${BRANCHSYNC_BASE_IMAGE:-$LOCAL_BASE}
IMAGE=${BRANCHSYNC_IMAGE:-branchsync:local}
base_only=0
use_cargo=1
erp=0
TRYTON_IMAGE=${BRANCHSYNC_TRYTON_IMAGE:-branchsync-tryton:local}
for a in "$@"; do
  case "$a" in
    --base-only) base_only=1 ;;
    --no-cargo) use_cargo=0 ;;
    --erp) erp=1 ;;
    -h|--help) sed -n '2,33p' "$0"; exit 0 ;;
    *) echo "build.sh: unknown option $a (try --help)" >&2; exit 2 ;;
  esac
done

t_start=$(date +%s)
say() { printf '[build %4ss] %s\n' "$(( $(date +%s) - t_start ))" "$*"; }
die() { echo "build.sh: error: $*" >&2; exit 1; }

command -v docker >/dev/null || die "the docker CLI is not installed"
docker info >/dev/null 2>&1 || die "cannot reach the Docker engine (docker info failed; are you root or in the docker group?)"

# ---------------------------------------------------------------- base image
build_base() {
  [ "$(id -u)" = 0 ] || die "building $LOCAL_BASE needs root (debootstrap, chroot); run as root or set BRANCHSYNC_BASE_IMAGE"
  if [ -z "${MIRROR:-}" ]; then
    # The URI apt itself uses for "$SUITE/main" (deb822 or one-line sources, proxies too).
    MIRROR=$(apt-cache policy 2>/dev/null | awk -v s="$SUITE/main" '$3==s {print $2; exit}')
  fi
  if [ -z "${MIRROR:-}" ]; then
    MIRROR=$( { grep -hs '^URIs:' /etc/apt/sources.list.d/*.sources | awk '{print $2}'
                grep -hs '^deb ' /etc/apt/sources.list /etc/apt/sources.list.d/*.list \
                  | sed -E 's/^deb +(\[[^]]*\] +)?//' | awk '{print $1}'
              } | grep -v -- '-security' | head -n1 || true)
  fi
  [ -n "${MIRROR:-}" ] || die "no Debian mirror found in the apt sources; set MIRROR=http://…/debian"
  # debootstrap does not read apt.conf: pass on an apt HTTP proxy.
  eval "$(apt-config shell http_proxy Acquire::http::Proxy 2>/dev/null || true)"
  export http_proxy
  if ! command -v debootstrap >/dev/null; then
    say "installing debootstrap"
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null; } \
      || die "cannot install debootstrap"
  fi
  # An init for PID 1: tini (or dumb-init) when the mirror has it.
  local init_pkg=""
  for p in tini dumb-init; do
    if apt-cache show "$p" >/dev/null 2>&1; then init_pkg=$p; break; fi
  done
  local include="postgresql-15,ca-certificates,iproute2${init_pkg:+,$init_pkg}"
  local work
  work=$(mktemp -d /var/tmp/branchsync-rootfs.XXXXXX)
  # shellcheck disable=SC2064
  trap "rm -rf '$work'" EXIT
  local rootfs=$work/rootfs
  local t0
  t0=$(date +%s)
  say "debootstrap $SUITE (minbase + $include) from $MIRROR into $rootfs (about a minute)"
  if ! debootstrap --variant=minbase --include="$include" "$SUITE" "$rootfs" "$MIRROR" >"$work/debootstrap.log" 2>&1; then
    tail -n 30 "$work/debootstrap.log" >&2
    die "debootstrap failed (full log above, last 30 lines)"
  fi
  say "debootstrap done in $(( $(date +%s) - t0 ))s; $(du -sm "$rootfs" | cut -f1) MB before trimming"
  # Trim: .debs, apt lists, docs, man pages, foreign locales; the package's
  # default cluster (containers run initdb themselves); host files docker
  # replaces at run time anyway.
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* \
         "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/* \
         "$rootfs"/var/log/*.log "$rootfs"/var/cache/debconf/*-old
  find "$rootfs"/usr/share/locale -mindepth 1 -maxdepth 1 ! -name 'en*' ! -name locale.alias -exec rm -rf {} +
  rm -rf "$rootfs"/var/lib/postgresql/15/main "$rootfs"/etc/postgresql/15/main
  : >"$rootfs"/etc/resolv.conf
  : >"$rootfs"/etc/hostname
  # apt inside the image: the same mirror, so a derived image can apt-get install.
  echo "deb $MIRROR $SUITE main" >"$rootfs"/etc/apt/sources.list
  say "trimmed to $(du -sm "$rootfs" | cut -f1) MB"
  chroot "$rootfs" /usr/lib/postgresql/15/bin/postgres --version >/dev/null \
    || die "the rootfs's postgres does not run"
  say "docker import -> $LOCAL_BASE"
  tar --numeric-owner -C "$rootfs" -c . | docker import \
    --change 'ENV PATH=/usr/lib/postgresql/15/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --message "debootstrap $SUITE minbase + $include from $MIRROR" \
    - "$LOCAL_BASE" >/dev/null
  rm -rf "$work"
  trap - EXIT
  say "base image $LOCAL_BASE built in $(( $(date +%s) - t0 ))s ($(docker image inspect -f '{{.Size}}' "$LOCAL_BASE" | awk '{printf "%d MB", $1/1000000}'))"
}

if [ -n "${BRANCHSYNC_BASE_IMAGE:-}" ]; then
  say "base: $BASE (from BRANCHSYNC_BASE_IMAGE)"
elif [ "${REBUILD_BASE:-0}" = 1 ] || ! docker image inspect "$LOCAL_BASE" >/dev/null 2>&1; then
  build_base
else
  say "base: $LOCAL_BASE exists (REBUILD_BASE=1 rebuilds it)"
fi
[ "$base_only" = 1 ] && exit 0

# ---------------------------------------------------------------- binary
bin_src=${BRANCHSYNC_BINARY:-$repo/target/release/branchsync}
if [ -z "${BRANCHSYNC_BINARY:-}" ] && [ "$use_cargo" = 1 ]; then
  command -v cargo >/dev/null || die "cargo not found; build target/release/branchsync elsewhere or set BRANCHSYNC_BINARY"
  t0=$(date +%s)
  say "cargo build --release -p branchsync-server"
  (cd "$repo" && cargo build --release -q -p branchsync-server) || die "cargo build failed"
  say "cargo done in $(( $(date +%s) - t0 ))s"
fi
[ -x "$bin_src" ] || die "no branchsync binary at $bin_src (run cargo build --release -p branchsync-server)"
mkdir -p "$here/bin"
# Debug info is a third of the binary; the image does not need it.
if command -v objcopy >/dev/null; then
  objcopy --strip-debug "$bin_src" "$here/bin/branchsync.tmp"
else
  cp "$bin_src" "$here/bin/branchsync.tmp"
fi
chmod 755 "$here/bin/branchsync.tmp"
mv "$here/bin/branchsync.tmp" "$here/bin/branchsync"
install -m 755 "$here/entrypoint.sh" "$here/bin/branchsync-entrypoint"
install -m 755 "$here/healthcheck.sh" "$here/bin/branchsync-healthcheck"
say "binary: $("$here/bin/branchsync" --version) ($(du -m "$here/bin/branchsync" | cut -f1) MB, from $bin_src)"

# ---------------------------------------------------------------- images
# The legacy builder: the Docker CLI here has no buildx plugin, and the
# Dockerfiles need nothing BuildKit-specific.
export DOCKER_BUILDKIT=${DOCKER_BUILDKIT:-0}
build_image() {  # $1 = tag, $2 = context, $3 = what
  local old_id new_id t0
  old_id=$(docker image inspect -f '{{.Id}}' "$1" 2>/dev/null || true)
  t0=$(date +%s)
  say "docker build -t $1 --build-arg BASE=$BASE $2"
  if ! docker build -t "$1" --build-arg BASE="$BASE" "$2" 2>&1 \
    | { grep -v -e 'DEPRECATED: The legacy builder' -e 'BuildKit is currently disabled' -e 'environment-variable\.$' \
                -e 'Install the buildx component' -e 'docs.docker.com/go/buildx' -e '^ *$' || true; } \
    | sed 's/^/    /'; then
    die "docker build of $1 failed"
  fi
  new_id=$(docker image inspect -f '{{.Id}}' "$1")
  if [ -n "$old_id" ] && [ "$old_id" != "$new_id" ]; then
    # The previous build, now untagged; kept if a container still uses it.
    docker rmi "$old_id" >/dev/null 2>&1 && say "removed the previous $1 (${old_id:7:12})" || true
  fi
  say "$3 $1 built in $(( $(date +%s) - t0 ))s ($(docker image inspect -f '{{.Size}}' "$1" | awk '{printf "%d MB", $1/1000000}'))"
}
build_image "$IMAGE" "$here" "daemon image"

if [ "$erp" = 1 ]; then
  tryton=$here/tryton
  pkgs=('trytond[postgresql]==8.2.1' 'trytond-sale-point==8.2.0' 'proteus==8.2.0')
  if [ ! -f "$tryton/wheels/.complete" ]; then
    command -v python3 >/dev/null || die "--erp needs python3 with pip on this host (it fetches Tryton's wheels from PyPI)"
    t0=$(date +%s)
    say "pip wheel ${pkgs[*]} -> $tryton/wheels (from PyPI)"
    rm -rf "$tryton/wheels"
    python3 -m pip wheel -q --disable-pip-version-check -w "$tryton/wheels" "${pkgs[@]}" >&2 \
      || die "cannot fetch Tryton's wheels from PyPI (pip wheel failed)"
    touch "$tryton/wheels/.complete"
    say "$(ls "$tryton/wheels" | grep -c '\.whl$') wheels in $(( $(date +%s) - t0 ))s"
  fi
  mkdir -p "$tryton/bin"
  install -m 755 "$tryton/tryton-site.sh" "$tryton/bin/tryton-site"
  install -m 644 "$repo/tests/tryton/pos.py" "$tryton/bin/pos.py"
  build_image "$TRYTON_IMAGE" "$tryton" "Tryton image"
fi
say "done in $(( $(date +%s) - t_start ))s"
