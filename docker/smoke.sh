#!/usr/bin/env bash
# docker/smoke.sh — end-to-end smoke test of the compose demo.
#
#   1. docker-compose -p branchsync-smoke up -d; wait until the three sites
#      are healthy and both branches are connected to the main
#   2. products at the main, sales (orders + lines) at branch1, a keyless
#      audit row at branch2, a local_cache row everywhere (must stay local)
#   3. wait until the three sites hold identical per-table checksums
#   4. cut branch1 off (docker network disconnect); wait until the main sees
#      it gone; sell at branch1 and at branch2, change a price at the main
#   5. reconnect branch1; wait for identical checksums again; check key
#      stripes, conflicts, local tables
#   6. docker-compose down -v (always, also on failure or Ctrl-C)
#
# Needs the images (docker/build.sh builds them when missing). Environment:
#   SMOKE_PROJECT (branchsync-smoke), SMOKE_TIMEOUT seconds per wait (120),
#   SMOKE_KEEP=1 leaves the stack up for inspection.
# Published ports default to 17070/17071-17073/15433-15435 so that the smoke
# stack does not collide with a demo stack on the default ports.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/.." && pwd)
cd "$repo"
PROJECT=${SMOKE_PROJECT:-branchsync-smoke}
TIMEOUT=${SMOKE_TIMEOUT:-120}
export MAIN_SYNC_PORT=${MAIN_SYNC_PORT:-17070} MAIN_HTTP_PORT=${MAIN_HTTP_PORT:-17071} \
       BRANCH1_HTTP_PORT=${BRANCH1_HTTP_PORT:-17072} BRANCH2_HTTP_PORT=${BRANCH2_HTTP_PORT:-17073} \
       MAIN_PG_PORT=${MAIN_PG_PORT:-15433} BRANCH1_PG_PORT=${BRANCH1_PG_PORT:-15434} BRANCH2_PG_PORT=${BRANCH2_PG_PORT:-15435}
SITES=(main branch1 branch2)
TABLES=(products orders order_lines audit_log)

t_start=$(date +%s)
elapsed() { echo $(( $(date +%s) - t_start )); }
say() { printf '[smoke %4ss] %s\n' "$(elapsed)" "$*"; }
failed=""
fail() { failed="$*"; echo "smoke: FAILED: $*" >&2; exit 1; }

if docker compose version >/dev/null 2>&1; then
  COMPOSE=(docker compose -p "$PROJECT")
elif command -v docker-compose >/dev/null; then
  COMPOSE=(docker-compose -p "$PROJECT")
else
  fail "neither 'docker compose' nor 'docker-compose' is installed"
fi

cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  if [ "$rc" != 0 ]; then
    echo "---------------- last log lines of each site ----------------" >&2
    for s in "${SITES[@]}"; do
      echo "==== $s" >&2
      "${COMPOSE[@]}" logs --no-color --tail=40 "$s" 2>&1 | grep -v -e 'logical decoding' -e 'DETAIL:' -e 'STATEMENT:' | tail -n 25 >&2 || true
    done
  fi
  if [ "${SMOKE_KEEP:-0}" = 1 ]; then
    say "SMOKE_KEEP=1: leaving the stack up; remove it with: ${COMPOSE[*]} down -v"
  else
    say "tearing down: ${COMPOSE[*]} down -v"
    "${COMPOSE[@]}" down -v --remove-orphans >/dev/null 2>&1 || echo "smoke: warning: down -v failed" >&2
  fi
  if [ "$rc" = 0 ]; then
    say "PASSED in $(elapsed)s"
  else
    echo "smoke: FAILED after $(elapsed)s${failed:+: $failed}" >&2
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'failed="interrupted"; exit 130' INT TERM

cid() { "${COMPOSE[@]}" ps -q "$1"; }
sql() {  # sql SITE SQL... -> unaligned, tuples only
  local site=$1; shift
  docker exec -i "${CID[$site]}" psql -X -q -At -v ON_ERROR_STOP=1 -U postgres -d erp -c "SET TimeZone = 'UTC'" "$@"
}
status_json() { docker exec "${CID[$1]}" branchsync status --json 2>/dev/null || true; }
# wait_for SECONDS DESCRIPTION COMMAND...: polls every second.
wait_for() {
  local limit=$1 what=$2 t0
  shift 2
  t0=$(date +%s)
  say "waiting: $what"
  until "$@"; do
    [ $(( $(date +%s) - t0 )) -lt "$limit" ] || fail "timed out after ${limit}s waiting for: $what"
    sleep 1
  done
  say "ok ($(( $(date +%s) - t0 ))s): $what"
}

checksums() {  # one line per table: name|rows|md5 of the sorted rows
  local q="" t
  for t in "${TABLES[@]}"; do
    q+="${q:+ UNION ALL }SELECT '$t', count(*), md5(coalesce(string_agg(x::text, '|' ORDER BY x::text), '')) FROM $t x"
  done
  sql "$1" -c "$q ORDER BY 1"
}
LAST_SUMS=""
converged() {  # converged "products=N orders=N ..." : identical everywhere and the expected row counts
  local expect=$1 s ref="" cur t n
  LAST_SUMS=""
  for s in "${SITES[@]}"; do
    cur=$(checksums "$s") || return 1
    LAST_SUMS+="$s:"$'\n'"$cur"$'\n'
    if [ -z "$ref" ]; then ref=$cur; elif [ "$cur" != "$ref" ]; then return 1; fi
  done
  for t in $expect; do
    n=$(grep "^${t%%=*}|" <<<"$ref" | cut -d'|' -f2)
    [ "$n" = "${t#*=}" ] || return 1
  done
}
wait_converged() {
  local t0
  t0=$(date +%s)
  say "waiting: identical checksums at main, branch1, branch2 ($1)"
  until converged "$1"; do
    if [ $(( $(date +%s) - t0 )) -ge "$TIMEOUT" ]; then
      echo "$LAST_SUMS" >&2
      fail "the sites did not converge within ${TIMEOUT}s (expected $1; checksums above)"
    fi
    sleep 1
  done
  say "ok ($(( $(date +%s) - t0 ))s): converged:"
  checksums main | sed 's/^/      /'
}
sell() {  # sell SITE ORDERS LINES_PER_ORDER: one transaction per order
  local site=$1 n=$2 lines=$3 i q=""
  for i in $(seq 1 "$n"); do
    q+="BEGIN; WITH o AS (INSERT INTO orders (shop, total, note) VALUES ('$site', 0, 'smoke $i') RETURNING id),
      l AS (INSERT INTO order_lines (order_id, product_id, qty, price)
            SELECT o.id, p.id, 1 + g % 3, p.price FROM o, generate_series(1, $lines) g
            JOIN LATERAL (SELECT id, price FROM products ORDER BY id OFFSET (g % 10) LIMIT 1) p ON true RETURNING qty * price AS amount)
      UPDATE orders SET total = (SELECT sum(amount) FROM l) WHERE id = (SELECT id FROM o); COMMIT;"
  done
  sql "$site" -c "$q"
}
healthy() {
  local s st
  for s in "${SITES[@]}"; do
    st=$(docker inspect -f '{{.State.Health.Status}}' "${CID[$s]}" 2>/dev/null) || return 1
    [ "$st" = healthy ] || return 1
  done
}
main_sees() {  # main_sees BRANCH true|false
  status_json main | grep -Eq "\"$1\":\\{[^}]*\"connected\":$2"
}
both_connected() { main_sees branch1 true && main_sees branch2 true; }
products_at_branch1() { [ "$(sql branch1 -c 'SELECT count(*) FROM products')" = 10 ]; }

# ------------------------------------------------------------------ 0. images
if ! docker image inspect branchsync:local >/dev/null 2>&1; then
  say "image branchsync:local missing: running docker/build.sh"
  "$here/build.sh" || fail "docker/build.sh failed"
fi

# ------------------------------------------------------------------ 1. up
say "starting the stack: ${COMPOSE[*]} up -d"
"${COMPOSE[@]}" down -v --remove-orphans >/dev/null 2>&1 || true
"${COMPOSE[@]}" up -d 2>&1 | sed 's/^/      /' || fail "compose up failed"
declare -A CID
for s in "${SITES[@]}"; do
  CID[$s]=$(cid "$s")
  [ -n "${CID[$s]}" ] || fail "no container for service $s"
done
NET=$(docker inspect -f '{{range $k, $v := .NetworkSettings.Networks}}{{$k}} {{end}}' "${CID[branch1]}" | tr ' ' '\n' | grep '_shops$' | head -n1)
[ -n "$NET" ] || fail "branch1 is not on a *_shops network"
wait_for "$TIMEOUT" "all three sites healthy" healthy
wait_for "$TIMEOUT" "branch1 and branch2 connected to the main" both_connected

# ------------------------------------------------------------------ 2. writes
say "main: 10 products; branch1: 5 sales of 3 lines; branch2: a keyless audit_log row; local_cache rows at every site"
sql main -c "INSERT INTO products (name, price, stock) SELECT 'product ' || g, 1.50 * g, 100 FROM generate_series(1, 10) g"
wait_for "$TIMEOUT" "the products reach branch1" products_at_branch1
sell branch1 5 3
sql branch2 -c "INSERT INTO audit_log (event, payload) VALUES ('till opened', '{\"till\": 2, \"cash\": 150.00}')"
for s in "${SITES[@]}"; do sql "$s" -c "INSERT INTO local_cache VALUES ('site', '$s')"; done
wait_converged "products=10 orders=5 order_lines=15 audit_log=1"

# ------------------------------------------------------------------ 3. partition
say "cutting branch1 off: docker network disconnect $NET"
docker network disconnect "$NET" "${CID[branch1]}"
wait_for "$TIMEOUT" "the main notices branch1 is gone" main_sees branch1 false
say "selling while cut off: branch1 4 sales of 2 lines, branch2 2 sales of 1 line; main raises product 1's price"
sell branch1 4 2
sell branch2 2 1
sql main -c "UPDATE products SET price = price + 1 WHERE id = (SELECT min(id) FROM products)"
sleep 2
n=$(sql main -c "SELECT count(*) FROM orders WHERE shop = 'branch1'")
[ "$n" = 5 ] || fail "the main has $n branch1 orders while branch1 is cut off (expected 5): the partition did not hold"
n=$(sql branch1 -c "SELECT count(*) FROM orders WHERE shop = 'branch2'")
[ "$n" = 0 ] || fail "branch1 received branch2's sales while cut off"
say "ok: the main has not seen branch1's new sales, branch1 has not seen branch2's"

# ------------------------------------------------------------------ 4. heal
say "reconnecting branch1: docker network connect --alias branch1 $NET"
docker network connect --alias branch1 "$NET" "${CID[branch1]}"
wait_converged "products=10 orders=11 order_lines=25 audit_log=1"

# ------------------------------------------------------------------ 5. checks
bad=$(sql main -c "SELECT count(*) FROM orders WHERE id % 100 <> CASE shop WHEN 'main' THEN 0 WHEN 'branch1' THEN 1 WHEN 'branch2' THEN 2 END")
[ "$bad" = 0 ] || fail "$bad order(s) have an id outside their site's key stripe"
for s in "${SITES[@]}"; do
  v=$(sql "$s" -c "SELECT string_agg(v, ',') FROM local_cache")
  [ "$v" = "$s" ] || fail "local_cache at $s holds \"$v\" (excluded tables must stay local)"
  c=$(sql "$s" -c "SELECT count(*) FROM branchsync.conflicts")
  [ "$c" = 0 ] || fail "$s recorded $c conflict(s)"
  p=$(sql "$s" -c "SELECT count(*) FROM branchsync.parked")
  [ "$p" = 0 ] || fail "$s has $p parked row(s)"
done
say "ok: ids on their stripes, local_cache stayed local, no conflicts, nothing parked"
