#!/usr/bin/env bash
# tests/readme_setup.sh — README's "Setting up a main and a branch", followed
# as written on two fresh machines with the packaged unit file, brings up a
# main and a branch that sync (issue 15, done-when 5).
#
# Two containers, main-host and shop-host, on a private Docker network, each
# a Debian bookworm machine with systemd as PID 1 and PostgreSQL 15 (image
# branchsync-systemd:local from docker/systemd.Dockerfile, on top of
# branchsync-base:local from `docker/build.sh --base-only`; both built once,
# REBUILD_SYSTEMD=1 rebuilds the first). Each machine is prepared as an
# operator finds a fresh Debian one (Debian's default cluster, with the four
# settings README's *Prerequisites* ask for; an ERP database `erp` at the
# main) and has an operator `admin` with sudo. Then, as `admin`, the script
# runs README's commands, nothing else: the sh blocks (install, `tls
# issue`, the shop's credentials, `join`) are read out of README.md and run
# as they stand; the commands README gives inline (Prerequisites' `ALTER
# ROLE`, the configs' `install`, the tokens, `init`, `createdb`, `status`)
# are checked to be in README, word for word, before they run. The
# operator's own part: README's `…` (the superuser's password) is the
# password the script set; the main's address edited into the branch
# config; the token and the credentials carried from the main to the shop.
# `cargo build` is the one line replaced: the binary is built on this host
# (from the current tree, `cargo build --release -p branchsync-server`,
# when missing or older than the sources) and copied into the operator's
# checkout. A README command that fails fails the script; README no longer
# saying what the script runs fails it too (README_STRICT=0 makes the
# latter a warning, listed at the end).
#
# Finally: a sale at the main appears at the shop, a sale at the shop
# appears at the main, `branchsync status` at both shows the peer connected
# and both units are active.
#
# Needs root and a Docker engine. About 40 s once the images and the
# binary exist. KEEP=1 leaves the containers running for a look
# (`docker exec -it main-host bash`); remove them with
# `docker stop main-host shop-host; docker rm main-host shop-host;
# docker network rm branchsync-readme`.
# SYSTEMD_DOCKER_ARGS replaces the options that let systemd run in a
# container (see below).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
BASE_IMAGE=branchsync-base:local
IMAGE=branchsync-systemd:local
NET=branchsync-readme
MAIN=main-host
SHOP=shop-host
SYNC_TIMEOUT=${SYNC_TIMEOUT:-60}
PGPW=readme-superuser-pw   # the postgres superuser's password (Prerequisites)
t_start=$(date +%s)
say() { printf '[readme %4ss] %s\n' "$(( $(date +%s) - t_start ))" "$*"; }
die() { echo "readme_setup.sh: error: $*" >&2; exit 1; }
# README no longer says, word for word, what the script runs (its text
# changed under the script). README_STRICT=1, the default: a failure.
README_STRICT=${README_STRICT:-1}
deviations=()
deviation() {
  [ "$README_STRICT" = 0 ] || die "README_STRICT=1: $1"
  deviations+=("$1")
  say "WARNING (README_STRICT=0): $1"
}
# README's `…`: the superuser's password, the one Prerequisites set.
pw() { printf '%s' "${1//…/$PGPW}"; }

[ "$(id -u)" = 0 ] || die "needs root (docker, and debootstrap when the base image is missing)"
docker info >/dev/null 2>&1 || die "no Docker engine answers (docker info failed)"

work=$(mktemp -d /var/tmp/branchsync-readme.XXXXXX)
started=()
net_created=0
cleanup() {
  local rc=$?
  if [ "$rc" != 0 ] && [ "${#started[@]}" -gt 0 ]; then
    for h in "${started[@]}"; do
      for u in branchsync@main branchsync@branch1; do
        docker exec "$h" test -e "/etc/branchsync/${u#branchsync@}.toml" 2>/dev/null || continue
        echo "----- $h: journalctl -u $u (last 40 lines)" >&2
        docker exec "$h" journalctl -u "$u" -n 40 --no-pager >&2 2>&1 || true
      done
    done
  fi
  if [ "${KEEP:-0}" = 1 ] && [ "$net_created" = 1 ]; then
    say "KEEP=1: leaving ${started[*]} and network $NET running"
  else
    for h in "${started[@]}"; do
      # `docker stop` sends SIGRTMIN+3: systemd shuts down and removes its
      # cgroups (a SIGKILL would leave them behind on a cgroup v1 host).
      docker stop -t 20 "$h" >/dev/null 2>&1 || true
      docker rm -f "$h" >/dev/null 2>&1 || true
    done
    [ "$net_created" = 0 ] || docker network rm "$NET" >/dev/null 2>&1 || true
  fi
  rm -rf "$work"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ------------------------------------------------------------------ binary
# Built from the current tree (uncommitted changes included), never while
# another cargo runs in this tree (a cargo elsewhere, another checkout's
# CI say, has a target directory of its own and is no concern).
cargo_here() {
  local p cwd
  for p in $(pgrep -x cargo || true); do
    cwd=$(readlink "/proc/$p/cwd" 2>/dev/null) || continue
    case "$cwd/" in "$repo"/*) echo "$p"; return 0 ;; esac
  done
  return 1
}
bin=${BRANCHSYNC_BINARY:-$repo/target/release/branchsync}
if [ -z "${BRANCHSYNC_BINARY:-}" ]; then
  waited=0
  while p=$(cargo_here); do
    [ "$waited" = 1 ] || say "waiting for cargo in $repo to end (pid $p: $(tr '\0' ' ' <"/proc/$p/cmdline" 2>/dev/null | cut -c1-100))"
    waited=1; sleep 5
  done
  stale=""
  if [ -x "$bin" ]; then
    stale=$(cd "$repo" && find server engine proto Cargo.toml Cargo.lock -type f -newer "$bin" -print -quit)
  fi
  if [ ! -x "$bin" ] || [ -n "$stale" ]; then
    say "cargo build --release -p branchsync-server (${stale:+$stale is newer than the binary; }about 5 minutes from nothing)"
    (cd "$repo" && cargo build --release -q -p branchsync-server) || die "cargo build failed"
  fi
fi
[ -x "$bin" ] || die "no branchsync binary at $bin"
"$bin" join --help >/dev/null 2>&1 || die "$bin has no 'join' subcommand (built from an older tree?)"
# Debug info is a third of the binary; a machine does not need it.
if command -v objcopy >/dev/null; then objcopy --strip-debug "$bin" "$work/branchsync"; else cp "$bin" "$work/branchsync"; fi
say "binary: $("$work/branchsync" --version) ($(du -m "$work/branchsync" | cut -f1) MB)"

# ------------------------------------------------------------------ images
if ! docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
  say "building $BASE_IMAGE (docker/build.sh --base-only: debootstrap, a few minutes)"
  bash "$repo/docker/build.sh" --base-only || die "docker/build.sh --base-only failed"
fi
if [ "${REBUILD_SYSTEMD:-0}" = 1 ] || ! docker image inspect "$IMAGE" >/dev/null 2>&1; then
  say "building $IMAGE from docker/systemd.Dockerfile (apt-get install systemd sudo …, about a minute)"
  old_id=$(docker image inspect -f '{{.Id}}' "$IMAGE" 2>/dev/null || true)
  # No build context needed; the legacy builder (no buildx plugin here).
  DOCKER_BUILDKIT=0 docker build -q --build-arg BASE="$BASE_IMAGE" -t "$IMAGE" - \
    <"$repo/docker/systemd.Dockerfile" >"$work/build.log" 2>&1 \
    || { cat "$work/build.log" >&2; die "docker build of $IMAGE failed"; }
  new_id=$(docker image inspect -f '{{.Id}}' "$IMAGE")
  if [ -n "$old_id" ] && [ "$old_id" != "$new_id" ]; then docker rmi "$old_id" >/dev/null 2>&1 || true; fi
fi

# ------------------------------------------------------------------ machines
# systemd as PID 1 needs to mount and to manage cgroups. --privileged would
# do, but it asks for every capability, and an engine that lacks one itself
# (this one has no CAP_SYS_RESOURCE: "unable to apply caps: operation not
# permitted") cannot start such a container; so the capabilities systemd
# and the unit's sandboxing use are named instead.
if [ -n "${SYSTEMD_DOCKER_ARGS:-}" ]; then
  read -r -a sd_args <<<"$SYSTEMD_DOCKER_ARGS"
else
  sd_args=(--security-opt seccomp=unconfined --security-opt apparmor=unconfined
           --cgroupns=host -v /sys/fs/cgroup:/sys/fs/cgroup:rw
           --tmpfs /run --tmpfs /run/lock)
  for c in SYS_ADMIN NET_ADMIN SYS_PTRACE SYS_NICE SYS_TIME SYS_BOOT IPC_LOCK IPC_OWNER \
           LINUX_IMMUTABLE SYS_RAWIO SYS_TTY_CONFIG LEASE AUDIT_CONTROL MAC_ADMIN \
           MAC_OVERRIDE SYSLOG WAKE_ALARM BLOCK_SUSPEND AUDIT_READ DAC_READ_SEARCH; do
    sd_args+=(--cap-add "$c")
  done
fi
for h in "$MAIN" "$SHOP"; do
  ! docker container inspect "$h" >/dev/null 2>&1 \
    || die "a container $h exists (KEEP=1 of an earlier run?): docker stop $MAIN $SHOP; docker rm $MAIN $SHOP; docker network rm $NET"
done
! docker network inspect "$NET" >/dev/null 2>&1 || die "a network $NET exists (KEEP=1 of an earlier run?): docker network rm $NET"
docker network create "$NET" >/dev/null
net_created=1
for h in "$MAIN" "$SHOP"; do
  started+=("$h")
  docker run -d --name "$h" --hostname "$h" --network "$NET" "${sd_args[@]}" "$IMAGE" >/dev/null \
    || die "cannot start $h with systemd as PID 1 (set SYSTEMD_DOCKER_ARGS)"
done
as_root() { local h=$1; shift; docker exec -i "$h" bash -euo pipefail -c "$*"; }
for h in "$MAIN" "$SHOP"; do
  for _ in $(seq 60); do
    s=$(docker exec "$h" systemctl is-system-running 2>/dev/null || true)
    case "$s" in running|degraded) break ;; esac
    sleep 0.5
  done
  case "$s" in running|degraded) ;; *) die "$h: systemd did not come up (is-system-running: ${s:-nothing})" ;; esac
done
say "$MAIN and $SHOP up: systemd $(docker exec "$MAIN" systemctl --version | head -n1 | awk '{print $2}') as PID 1 on network $NET"

# Each machine as its operator finds it: PostgreSQL 15 installed with
# Debian's default cluster (the package's postinst runs pg_createcluster;
# the base image dropped it), and an operator account with sudo (no
# password prompt: nobody types here). README's Prerequisites give the
# four settings, not a command: pg_conftool's, then a restart. The postgres
# role has no password yet (README's own command sets it, below).
for h in "$MAIN" "$SHOP"; do
  as_root "$h" "
    useradd --create-home --shell /bin/bash --groups sudo admin
    echo 'admin ALL=(ALL:ALL) NOPASSWD: ALL' >/etc/sudoers.d/admin   # no password prompt in a script
    pg_createcluster 15 main >/dev/null
    pg_conftool 15 main set wal_level logical
    pg_conftool 15 main set track_commit_timestamp on
    pg_conftool 15 main set max_replication_slots 64
    pg_conftool 15 main set max_wal_senders 10
    systemctl daemon-reload
    systemctl start postgresql@15-main
  " >"$work/prep-$h.log" 2>&1 || { cat "$work/prep-$h.log" >&2; die "$h: preparing PostgreSQL failed"; }
done
say "PostgreSQL $(as_root "$MAIN" "sudo -u postgres psql -AtX -c 'show server_version'" | cut -d' ' -f1) at both (wal_level = logical, track_commit_timestamp = on, max_replication_slots = 64, max_wal_senders = 10)"

# The main's ERP, selling before branchsync arrives.
as_root "$MAIN" "sudo -u postgres createdb erp && sudo -u postgres psql -qX -v ON_ERROR_STOP=1 -d erp" >"$work/erp.log" 2>&1 <<'SQL' || { cat "$work/erp.log" >&2; die "creating the main's ERP database failed"; }
CREATE TABLE products (
  id serial PRIMARY KEY, sku text NOT NULL UNIQUE, name text NOT NULL,
  price numeric(10,2) NOT NULL, stock integer NOT NULL DEFAULT 0);
CREATE TABLE orders (
  id serial PRIMARY KEY, shop text NOT NULL, created_at timestamptz NOT NULL DEFAULT now(),
  total numeric(12,2) NOT NULL DEFAULT 0);
CREATE TABLE order_lines (
  id serial PRIMARY KEY, order_id integer NOT NULL REFERENCES orders(id) ON DELETE CASCADE,
  product_id integer NOT NULL REFERENCES products(id), qty integer NOT NULL, price numeric(10,2) NOT NULL);
INSERT INTO products (sku, name, price, stock) VALUES
  ('TEA-1', 'Green tea', 3.50, 100), ('MUG-1', 'Mug', 7.90, 40), ('BIS-1', 'Biscuits', 2.20, 250);
WITH o AS (INSERT INTO orders (shop, total) VALUES ('main', 11.40) RETURNING id)
INSERT INTO order_lines (order_id, product_id, qty, price)
  SELECT o.id, p.id, 1, p.price FROM o, products p WHERE p.sku IN ('TEA-1', 'MUG-1');
SQL
say "$MAIN: database erp (products, orders, order_lines; 3 products, 1 order)"

# The operator's checkout: the repository's files as in this tree, and the
# binary that `cargo build --release -p branchsync-server` gives.
for h in "$MAIN" "$SHOP"; do
  (cd "$repo" && git ls-files -z | tar --null --ignore-failed-read -T - -cf - 2>/dev/null) \
    | as_root "$h" "install -d -o admin -g admin /home/admin/branchsync && tar -x -C /home/admin/branchsync --no-same-owner && install -d -o admin -g admin /home/admin/branchsync/target/release && chown -R admin:admin /home/admin/branchsync"
  docker cp "$work/branchsync" "$h:/home/admin/branchsync/target/release/branchsync"
  as_root "$h" "chown admin:admin /home/admin/branchsync/target/release/branchsync"
done
say "operator checkout at ~admin/branchsync on both, with target/release/branchsync"

# ------------------------------------------------------------------ README
# README's Prerequisites and setup sections, and helpers to take README's
# own commands out of them.
awk '/^## Prerequisites/ {f=1; next} /^## / {f=0} f' "$repo/README.md" >"$work/prereq.md"
awk '/^## Setting up a main and a branch/ {f=1; next} /^## / {f=0} f' "$repo/README.md" >"$work/setup.md"
[ -s "$work/prereq.md" ] || die "README has no section '## Prerequisites'"
[ -s "$work/setup.md" ] || die "README has no section '## Setting up a main and a branch'"
# Running text, its line breaks and indents as single spaces.
tr -s ' \n' '  ' <"$work/prereq.md" >"$work/prereq.flat"
tr -s ' \n' '  ' <"$work/setup.md" >"$work/setup.flat"
# The first ```sh block of the setup section that contains $1, de-indented.
readme_block() {
  awk -v pat="$1" '
    /^ *```sh *$/ { inb = 1; buf = ""; ind = match($0, /[^ ]/) - 1; next }
    inb && /^ *``` *$/ { inb = 0; if (index(buf, pat)) { printf "%s", buf; found = 1; exit } next }
    inb { line = $0; for (i = 0; i < ind && substr(line, 1, 1) == " "; i++) line = substr(line, 2); buf = buf line "\n" }
    END { if (!found) exit 1 }' "$work/setup.md" || die "README's setup section has no sh block with '$1'"
}
# README's setup section (--prereq: its Prerequisites) still says $1, word
# for word.
readme_says() {
  local f=$work/setup.flat where="setup section"
  if [ "$1" = --prereq ]; then f=$work/prereq.flat; where="Prerequisites"; shift; fi
  grep -qF -- "$1" "$f" || deviation "README's $where no longer says: $1"
}
# A README block is still exactly what the script expects of it.
block_is() { # $1 name, $2 file, $3 expected
  [ "$(cat "$2")" = "$3" ] || deviation "README's $1 block changed; it reads: $(cat "$2")"
}
# Run README's command(s) as the operator, in the checkout (-w DIR: there).
# The command is shown on the script's own output (fd 3), whatever its
# output is sent to.
exec 3>&1
as_admin() {
  local wd=/home/admin/branchsync
  if [ "$1" = -w ]; then wd=$2; shift 2; fi
  local h=$1; shift
  printf '%s\n' "$*" | sed "s/^/    [$h admin]\$ /" >&3
  # No stdin: a command that would prompt (a password) fails instead of waiting.
  docker exec -u admin -w "$wd" -e HOME=/home/admin "$h" bash -euo pipefail -c "$*" </dev/null
}
# As as_admin, with the operator's paste on stdin.
as_admin_stdin() {
  local h=$1; shift
  printf '%s\n' "$*" | sed "s/^/    [$h admin]\$ /" >&3
  docker exec -i -u admin -w /home/admin/branchsync -e HOME=/home/admin "$h" bash -euo pipefail -c "$*"
}
# Run a README command whose output goes to a log; on failure show the log and stop.
run_logged() { # $1 log name, $2 what, then as_admin's arguments
  local log=$work/$1.log what=$2; shift 2
  as_admin "$@" >"$log" 2>&1 || { sed 's/^/    | /' "$log" >&2; die "$what failed (README's command as written)"; }
}

# --- Prerequisites: the superuser's password, README's command, at both.
c_password="sudo -u postgres psql -c \"ALTER ROLE postgres PASSWORD '…'\""
readme_says --prereq "$c_password"
readme_says --prereq "give it to \`init\` and \`join\` in \`PGPASSWORD\`"
for h in "$MAIN" "$SHOP"; do
  run_logged "password-$h" "$h: setting the postgres role's password" "$h" "$(pw "$c_password")"
done
say "postgres role's password set at both (Prerequisites' ALTER ROLE)"

# --- At every site, once: the install block.
readme_block "useradd" >"$work/install.sh"
grep -qx 'cargo build --release -p branchsync-server' "$work/install.sh" || deviation "README's install block no longer has the cargo build this script replaces: $(cat "$work/install.sh")"
# `cargo build` is replaced: the binary is already in target/release/.
grep -vx 'cargo build --release -p branchsync-server' "$work/install.sh" >"$work/install-nocargo.sh"
for h in "$MAIN" "$SHOP"; do
  run_logged "install-$h" "$h: README's install block" "$h" "$(cat "$work/install-nocargo.sh")"
done
cat "$work/install-$MAIN.log"
say "install block done at both (binary, user branchsync, /etc/branchsync, /var/lib/branchsync, unit file, daemon-reload)"

# --- 1. Main.
c_main_cfg="sudo install -o branchsync -m 0640 packaging/main.toml /etc/branchsync/main.toml"
readme_says "$c_main_cfg"
as_admin "$MAIN" "$c_main_cfg"
# "and edit it (the database, the shops)": packaging/main.toml already names
# this setup's database (erp on 127.0.0.1:5432 as postgres) and its one shop
# (branch1, index 1, /etc/branchsync/branch1.token): nothing to edit. That
# is also step 2's "[[sync.peers]] entry at the main", there before the
# main starts: no reload.
c_main_token="head -c 32 /dev/urandom | base64 | sudo -u branchsync tee /etc/branchsync/branch1.token >/dev/null"
readme_says "$c_main_token"
as_admin "$MAIN" "$c_main_token"
c_init="sudo -u branchsync PGPASSWORD='…' branchsync init --config /etc/branchsync/main.toml"
readme_says "$c_init"
run_logged init "main: branchsync init" "$MAIN" "$(pw "$c_init")"
# Its report (stdout), without the log lines (stderr, timestamped).
report() { grep -v '^[0-9]\{4\}-[0-9][0-9]-[0-9][0-9]T' "$1" | sed 's/^/    | /'; }
report "$work/init.log"
c_main_enable="sudo systemctl enable --now branchsync@main"
readme_says "$c_main_enable"
as_admin "$MAIN" "$c_main_enable" 2>&1 | sed 's/^/    | /'
say "main: init done, branchsync@main $(docker exec "$MAIN" systemctl is-active branchsync@main || true)"

# --- Each shop's credentials, issued at the main.
readme_block "tls issue" >"$work/issue.sh"
block_is "credentials (tls issue)" "$work/issue.sh" \
  "sudo -u branchsync branchsync tls issue branch1 --out /tmp/branch1-tls --config /etc/branchsync/main.toml"
run_logged issue "main: README's tls issue block" "$MAIN" "$(cat "$work/issue.sh")"
sed 's/^/    | /' "$work/issue.log"
as_root "$MAIN" "test -s /tmp/branch1-tls/ca.pem && test -s /tmp/branch1-tls/cert.pem && test -s /tmp/branch1-tls/key.pem" \
  || die "main: tls issue wrote no ca.pem, cert.pem, key.pem in /tmp/branch1-tls"
say "main: branch1's credentials in /tmp/branch1-tls ($(as_root "$MAIN" "ls -l /tmp/branch1-tls | tail -n +2 | awk '{print \$1, \$3, \$NF}' | paste -sd ' '"))"

# --- 3. Branch config, from packaging/branch.toml.
c_branch_cfg="sudo install -o branchsync -m 0640 packaging/branch.toml /etc/branchsync/branch1.toml"
readme_says "$c_branch_cfg"
as_admin "$SHOP" "$c_branch_cfg"
# "then edit it": the operator's edit, the main's address.
as_admin "$SHOP" "sudo sed -i 's/^main = \"head-office.example:7070\"/main = \"$MAIN:7070\"/' /etc/branchsync/branch1.toml"
as_root "$SHOP" "grep -q '^main = \"$MAIN:7070\"' /etc/branchsync/branch1.toml" || die "packaging/branch.toml has no 'main = \"head-office.example:7070\"' line to edit"
# The shop's token: README's tee, the main's token pasted into it (the
# operator reads it at the main with sudo: it is the branchsync user's).
c_shop_token="sudo -u branchsync tee /etc/branchsync/token >/dev/null"
readme_says "$c_shop_token"
docker exec -u admin "$MAIN" sudo cat /etc/branchsync/branch1.token >"$work/token"
as_admin_stdin "$SHOP" "$c_shop_token" <"$work/token"
cmp -s "$work/token" <(docker exec "$SHOP" cat /etc/branchsync/token) || die "shop: /etc/branchsync/token is not the main's branch1.token"
rm -f "$work/token"
# The credentials carried from the main (the operator's copy: sudo at the
# main, key.pem is the branchsync user's) to ~admin/branch1-tls at the shop,
# and README's block run there.
docker exec -u admin "$MAIN" sudo tar -C /tmp/branch1-tls -cf - ca.pem cert.pem key.pem \
  | docker exec -i -u admin "$SHOP" bash -c "mkdir -p ~/branch1-tls && tar -xf - -C ~/branch1-tls"
readme_says "install the shop's credentials (above), owned by the daemon's user"
readme_block "/etc/branchsync/tls/" >"$work/tls-install.sh"
block_is "shop's credentials (install)" "$work/tls-install.sh" \
  "sudo install -d -o branchsync -g branchsync -m 0750 /etc/branchsync/tls
sudo install -o branchsync -g branchsync -m 0600 ca.pem cert.pem key.pem /etc/branchsync/tls/"
run_logged tls-install "shop: README's credentials block" -w /home/admin/branch1-tls "$SHOP" "$(cat "$work/tls-install.sh")"
perms=$(as_root "$SHOP" "stat -c '%n %U:%G %a' /etc/branchsync/tls /etc/branchsync/tls/ca.pem /etc/branchsync/tls/cert.pem /etc/branchsync/tls/key.pem")
grep -qx '/etc/branchsync/tls/key.pem branchsync:branchsync 600' <<<"$perms" || die "shop: credentials not as README installs them: $perms"
say "shop: /etc/branchsync/branch1.toml (main = \"$MAIN:7070\"), token, credentials ($(tr '\n' ';' <<<"$perms" | sed 's/;$//; s/;/; /g'))"

# --- 2. A new branch joins while the chain keeps selling.
c_createdb="sudo -u postgres createdb erp"
readme_says "create an empty database for it (\`$c_createdb\`)"
as_admin "$SHOP" "$c_createdb"
readme_says "\`PGPASSWORD\` as for \`init\`"
readme_block "branchsync join" >"$work/join.sh"
block_is "join" "$work/join.sh" \
  "sudo -u branchsync PGPASSWORD='…' branchsync join --config /etc/branchsync/branch1.toml
sudo systemctl enable --now branchsync@branch1"
readme_says "Then run \`join\` (step 2), which runs \`init\` at its end"
# The block as README has it; its first line timed and its output shown.
join_cmd=$(head -n 1 "$work/join.sh")
enable_cmd=$(tail -n +2 "$work/join.sh")
t_join=$(date +%s)
run_logged join "shop: branchsync join" "$SHOP" "$(pw "$join_cmd")"
report "$work/join.log"
say "shop: joined in $(( $(date +%s) - t_join ))s"
as_admin "$SHOP" "$enable_cmd" 2>&1 | sed 's/^/    | /'
as_admin "$SHOP" "rm -rf ~/branch1-tls"   # the operator's copy of the shop's key

# ------------------------------------------------------------------ checks
psql_at() { local h=$1; shift; docker exec -i "$h" sudo -u postgres psql -AtqX -v ON_ERROR_STOP=1 -d erp -c "$*"; }
for t in products orders order_lines; do
  m=$(psql_at "$MAIN" "SELECT count(*) FROM $t"); s=$(psql_at "$SHOP" "SELECT count(*) FROM $t")
  [ "$m" = "$s" ] || die "after join: $t has $m rows at the main, $s at the shop"
done
say "shop holds the main's rows after join (products, orders, order_lines)"

sale() { # $1 host, $2 shop name -> the new order's id
  psql_at "$1" "WITH o AS (INSERT INTO orders (shop, total) VALUES ('$2', 5.70) RETURNING id),
    l AS (INSERT INTO order_lines (order_id, product_id, qty, price)
          SELECT o.id, p.id, 1, p.price FROM o, products p WHERE p.sku IN ('TEA-1', 'BIS-1') RETURNING order_id)
    SELECT DISTINCT order_id FROM l"
}
wait_sale() { # $1 host, $2 order id
  local deadline=$(( $(date +%s) + SYNC_TIMEOUT ))
  while [ "$(date +%s)" -lt "$deadline" ]; do
    [ "$(psql_at "$1" "SELECT count(*) FROM order_lines WHERE order_id = $2")" = 2 ] && return 0
    sleep 0.5
  done
  return 1
}
id_main=$(sale "$MAIN" main)
t0=$(date +%s)
wait_sale "$SHOP" "$id_main" || die "the main's sale (order $id_main) did not reach the shop in ${SYNC_TIMEOUT}s"
say "sale at the main (order $id_main, 2 lines) is at the shop ($(( $(date +%s) - t0 ))s)"
id_shop=$(sale "$SHOP" branch1)
t0=$(date +%s)
wait_sale "$MAIN" "$id_shop" || die "the shop's sale (order $id_shop) did not reach the main in ${SYNC_TIMEOUT}s"
say "sale at the shop (order $id_shop, 2 lines) is at the main ($(( $(date +%s) - t0 ))s)"
[ $(( id_main % 100 )) = 0 ] && [ $(( id_shop % 100 )) = 1 ] || die "key stripes: the main's order is $id_main, the shop's $id_shop (expected ≡ 0 and 1 mod 100)"

# 4. `branchsync status` at each, as README gives it (as the daemon's user;
# at the shop "likewise", with the shop's configuration); both units active.
c_status="sudo -u branchsync branchsync status --config /etc/branchsync/main.toml"
readme_says "$c_status"
readme_says "shows, per peer: connected or not"
status_at() { # $1 host, $2 config
  docker exec -u admin -w /home/admin "$1" bash -c "${c_status%/etc/branchsync/main.toml}$2"
}
status_ok() { # $1 host, $2 config, $3 peer
  local out
  out=$(status_at "$1" "$2" 2>/dev/null) || return 1
  printf '%s\n' "$out" | grep -qx "peer $3: connected"
}
for pair in "$MAIN /etc/branchsync/main.toml branch1" "$SHOP /etc/branchsync/branch1.toml main"; do
  read -r h cfg peer <<<"$pair"
  deadline=$(( $(date +%s) + 15 ))
  until status_ok "$h" "$cfg" "$peer"; do
    [ "$(date +%s)" -lt "$deadline" ] || {
      status_at "$h" "$cfg" >&2 || true
      die "$h: branchsync status does not show $peer connected"; }
    sleep 1
  done
  printf '    [%s admin]$ %s\n' "$h" "${c_status%/etc/branchsync/main.toml}$cfg"
  status_at "$h" "$cfg" 2>&1 | sed "s/^/    [$h status] /"
done
for pair in "$MAIN branchsync@main" "$SHOP branchsync@branch1"; do
  read -r h unit <<<"$pair"
  st=$(docker exec "$h" systemctl is-active "$unit" || true)
  [ "$st" = active ] || die "$h: $unit is $st"
done
say "status shows the peer connected at both; branchsync@main and branchsync@branch1 are active"

if [ "${#deviations[@]}" -gt 0 ]; then
  say "README_STRICT=0: README no longer says what the script ran at ${#deviations[@]} place(s):"
  for w in "${deviations[@]}"; do echo "    - $w"; done
fi
echo "README setup: PASSED ($(( $(date +%s) - t_start )) s)"
