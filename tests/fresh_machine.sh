#!/usr/bin/env bash
# tests/fresh_machine.sh — README's first command on a machine that has Rust
# and nothing else (issue 15, done-when 6).
#
# A bare Debian root (debootstrap --variant=minbase: no compiler, no
# libclang, no PostgreSQL, no CA certificates) is imported as the image
# branchsync-bare:local (built once; REBUILD_BARE=1 rebuilds it). A copy of
# this checkout (HEAD, without target/) runs in it with the host's Rust
# toolchain mounted read-only (~/.rustup and ~/.cargo/bin: no toolchain can
# be downloaded here, so mounting it is the honest stand-in for "has Rust")
# and the host's network (cargo and apt reach their registries; the host's
# local CA certificates come along where its network needs them). Inside,
# README's first command, `bash scripts/demo.sh`, must install what is
# missing, build, and end with the demo PASSED.
#
# Needs root (debootstrap) and a Docker engine. Takes about 15 minutes on 2
# cores (the release build from nothing), so tests/run.sh does not run it;
# run it by hand: `bash tests/fresh_machine.sh` (FRESH_DOCKER_ARGS adds
# options to `docker run`, e.g. `--cpu-shares=2` beside other work).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
IMAGE=branchsync-bare:local
SUITE=${SUITE:-bookworm}
t_start=$(date +%s)
say() { printf '[fresh %4ss] %s\n' "$(( $(date +%s) - t_start ))" "$*"; }
die() { echo "fresh_machine.sh: error: $*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "needs root (debootstrap)"
docker info >/dev/null 2>&1 || die "no Docker engine answers"
rustup_home=${RUSTUP_HOME:-$HOME/.rustup}
cargo_bin=${CARGO_HOME:-$HOME/.cargo}/bin
[ -x "$cargo_bin/cargo" ] && [ -d "$rustup_home/toolchains" ] || die "no rustup toolchain at $rustup_home with cargo in $cargo_bin"

work=$(mktemp -d /var/tmp/branchsync-fresh.XXXXXX)
cleanup() { rm -rf "$work"; }
trap cleanup EXIT

if [ "${REBUILD_BARE:-0}" = 1 ] || ! docker image inspect "$IMAGE" >/dev/null 2>&1; then
  MIRROR=${MIRROR:-$(apt-cache policy 2>/dev/null | awk -v s="$SUITE/main" '$3==s {print $2; exit}')}
  [ -n "$MIRROR" ] || die "no Debian mirror found in the apt sources; set MIRROR=http://…/debian"
  command -v debootstrap >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null; }
  say "debootstrap --variant=minbase $SUITE from $MIRROR (nothing included)"
  debootstrap --variant=minbase "$SUITE" "$work/rootfs" "$MIRROR" >"$work/debootstrap.log" 2>&1 \
    || { tail -n 30 "$work/debootstrap.log" >&2; die "debootstrap failed"; }
  rm -rf "$work"/rootfs/var/cache/apt/archives/*.deb "$work"/rootfs/var/lib/apt/lists/*
  echo "deb $MIRROR $SUITE main" >"$work/rootfs/etc/apt/sources.list"
  : >"$work/rootfs/etc/resolv.conf"
  tar --numeric-owner -C "$work/rootfs" -c . | docker import --change 'ENV LANG=C.UTF-8' - "$IMAGE" >/dev/null
  rm -rf "$work/rootfs"
  say "imported $IMAGE"
fi

# What the bare root lacks is what the first command must install.
for tool in cc clang initdb; do
  if docker run --rm "$IMAGE" sh -c "command -v $tool || ls /usr/lib/postgresql/*/bin/$tool" >/dev/null 2>&1; then
    die "the bare image already has $tool: it would not show that the first command installs it"
  fi
done

# A network whose HTTPS goes through a proxy with its own CA (as here)
# trusts it through the machine's local CA certificates: the container gets
# them too (the ca-certificates package adds them to the bundle when the
# first command installs it), as any machine on that network would have.
local_cas=""
if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then local_cas=/usr/local/share/ca-certificates; fi

mkdir -p "$work/src"
git -C "$repo" archive HEAD | tar -x -C "$work/src"
say "running 'bash scripts/demo.sh' in $IMAGE (HEAD $(git -C "$repo" rev-parse --short HEAD), host toolchain mounted read-only)"
set +e
docker run --rm --network host --shm-size=1g ${FRESH_DOCKER_ARGS:-} \
  -v "$rustup_home:/opt/rustup:ro" -v "$cargo_bin:/opt/cargo-bin:ro" -v "$work/src:/src" \
  ${local_cas:+-v "$local_cas:/usr/local/share/ca-certificates:ro"} \
  -e RUSTUP_HOME=/opt/rustup -e CARGO_HOME=/root/.cargo -e RUSTUP_AUTO_INSTALL=0 \
  -e PATH=/opt/cargo-bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
  -w /src "$IMAGE" bash scripts/demo.sh 2>&1 | tee "$work/demo.log"
rc=${PIPESTATUS[0]}
set -e
[ "$rc" = 0 ] || die "the first command failed in the bare container (exit $rc)"
grep -q "PASSED" "$work/demo.log" || die "the demo did not say PASSED"
grep -q "scripts/demo.sh: installing" "$work/demo.log" || die "the first command did not say what it installs"
say "PASSED: README's first command ran the demo to PASSED on a bare Debian root with only Rust added"
