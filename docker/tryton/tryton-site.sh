#!/usr/bin/env bash
# tryton-site — one Tryton server (with sale_point) for one site of the
# compose stack's "erp" profile; it talks to its own site's PostgreSQL over
# that site's LAN network, so it keeps selling while the site's link to the
# head office is cut.
#
#   run (default)   head office (TRYTON_SITE = TRYTON_MAIN_SITE): installs
#                   Tryton into the site's database with trytond-admin (the
#                   schema reaches the shops through branchsync, as a module
#                   install does), seeds it (company, chart, fiscal year, tax,
#                   two products, one POS per site: pos.py seed) and sets its
#                   numbering plan; a shop: waits until the head office's
#                   seed has reached its database, then sets its own
#                   numbering plan once. Then serves on 0.0.0.0:8000.
#   health          healthy when the server answers common.server.version
#   sell N [DATE]   N sales at this site's POS through this site's server
#                   (XML-RPC, as the admin user), paid cash and posted; one
#                   line per sale: "sale <receipt> <move> <total>"
#   anything else   executed as is (bash, trytond-admin …)
#
# Numbering plan (README, "Tryton"): every gapless counter
# (ir_sequence_strict) numbers with the site's own prefix, TRYTON_PREFIX +
# "/${year}/", and a shop restarts them at 1: its own series. The prefix and
# the next number are site-local columns in branchsync's Tryton preset, so
# no site's numbers are sent to or overwritten by another.
#
# Variables: TRYTON_SITE, TRYTON_MAIN_SITE (main), TRYTON_SITES (the POS
# names the seed creates: main,branch1,branch2), TRYTON_PREFIX, TRYTON_YEAR
# (the seed's fiscal year; default this year), TRYTON_DB_HOST, TRYTON_DB_PORT
# (5432), TRYTON_DB_NAME (erp), TRYTON_DB_USER, TRYTON_DB_PASSWORD,
# TRYTON_ADMIN_PASSWORD (the "admin" user's; set at the head office),
# TRYTON_WAIT (seconds to wait for the database or the seed; 1800).
set -euo pipefail

log() { echo "tryton-site[$SITE]: $*"; }
die() { echo "tryton-site[$SITE]: error: $*" >&2; exit 1; }

SITE=${TRYTON_SITE:?is required (this site: main, branch1, …)}
MAIN_SITE=${TRYTON_MAIN_SITE:-main}
DB=${TRYTON_DB_NAME:-erp}
WAIT=${TRYTON_WAIT:-1800}
STATE=/var/lib/trytond
export PGHOST=${TRYTON_DB_HOST:?is required (the site database host)} PGPORT=${TRYTON_DB_PORT:-5432}
export PGUSER=${TRYTON_DB_USER:?is required (the ERP role)} PGPASSWORD=${TRYTON_DB_PASSWORD:?is required} PGDATABASE=$DB
# trytond reads its configuration from TRYTOND_<SECTION>__<OPTION>.
TRYTOND_DATABASE__URI="postgresql://$(python3 -c 'import sys, urllib.parse as u; print(u.quote(sys.argv[1], safe="") + ":" + u.quote(sys.argv[2], safe=""))' "$PGUSER" "$PGPASSWORD")@$PGHOST:$PGPORT/"
export TRYTOND_DATABASE__URI TRYTOND_DATABASE__PATH=$STATE TRYTOND_WEB__LISTEN=0.0.0.0:8000
export TRYTON_DB=$DB TRYTON_SITES=${TRYTON_SITES:-main,branch1,branch2}

sql() { psql -X -q -At -v ON_ERROR_STOP=1 "$@"; }

answers() {
  python3 - <<'PY'
import json, sys, urllib.request
req = urllib.request.Request('http://127.0.0.1:8000/rpc/', data=json.dumps({'id': 1, 'method': 'common.server.version', 'params': []}).encode(), headers={'Content-Type': 'application/json'})
try:
    print(json.load(urllib.request.urlopen(req, timeout=4))['result'])
except Exception as e:
    print(f"Tryton does not answer on 8000: {e}")
    sys.exit(1)
PY
}

case "${1:-run}" in
  run) ;;
  health) answers; exit ;;
  sell)
    shift
    [ $# -ge 1 ] || die "usage: sell N [DATE]"
    # One login (a session), then the till's calls, as Tryton's client does.
    export TRYTON_URL="http://127.0.0.1:8000/$DB/rpc/" TRYTON_USER=admin TRYTON_PASSWORD=${TRYTON_ADMIN_PASSWORD:-admin}
    exec python3 /usr/local/bin/pos.py sell "$SITE" "$@"
    ;;
  *) exec "$@" ;;
esac

# Waits until `$2` (SQL) answers "t", at most $WAIT seconds; $1 says what for.
wait_for() {
  local what=$1 q=$2 i=0 said=0
  while [ "$(sql -c "$q" 2>/dev/null || true)" != t ]; do
    i=$((i + 1))
    [ "$i" -ge "$WAIT" ] && die "gave up after ${WAIT}s waiting for $what"
    if [ $((i % 30)) = 1 ] && [ "$said" -lt 20 ]; then log "waiting for $what"; said=$((said + 1)); fi
    sleep 1
  done
}

wait_for "the site's database at $PGHOST:$PGPORT (role $PGUSER)" "SELECT true"
year=${TRYTON_YEAR:-$(date +%Y)}
prefix="${TRYTON_PREFIX:?is required (the document prefix of this site, e.g. HQ or S1)}/\${year}/"
# (Tables looked up first: a query on a table that is not there yet would
# fill the server log with errors while waiting.)
has_tables="SELECT to_regclass('public.ir_module') IS NOT NULL AND to_regclass('public.sale_point') IS NOT NULL AND to_regclass('public.sale_point_payment_method') IS NOT NULL"
installed="SELECT EXISTS (SELECT FROM ir_module WHERE name = 'sale_point' AND state = 'activated')"
seeded="SELECT EXISTS (SELECT FROM sale_point_payment_method WHERE name = 'Cash') AND EXISTS (SELECT FROM sale_point WHERE name = '$SITE')"
tables_and() { echo "SELECT CASE WHEN ($has_tables) THEN ($1) ELSE false END"; }

if [ "$SITE" = "$MAIN_SITE" ]; then
  if [ "$(sql -c "$(tables_and "$installed")" 2>/dev/null || true)" != t ]; then
    log "installing Tryton with sale_point into $DB (trytond-admin; a few minutes; branchsync carries the schema to the shops)"
    pwfile=$(mktemp); printf '%s\n' "${TRYTON_ADMIN_PASSWORD:-admin}" >"$pwfile"
    TRYTONPASSFILE=$pwfile trytond-admin -d "$DB" --all -u sale_point --activate-dependencies --email admin@example.com
    rm -f "$pwfile"
  fi
  if [ "$(sql -c "$(tables_and "$seeded")" 2>/dev/null || true)" != t ]; then
    # A counter created later at one site (a new fiscal year) arrives
    # elsewhere without its site-local next number: it starts at 1. Run as
    # the table's owner, so the change replicates to every shop.
    sql -c "ALTER TABLE ir_sequence_strict ALTER COLUMN number_next_internal SET DEFAULT 1"
    log "seeding: company, chart of accounts, fiscal year $year, tax, products, one POS per site ($TRYTON_SITES)"
    python3 /usr/local/bin/pos.py seed "$year"
    sql -c "UPDATE ir_sequence_strict SET prefix = '$prefix'"
    log "numbering plan: every gapless counter numbers $prefix<n>"
  fi
else
  wait_for "Tryton and the head office's seed to arrive from the head office (through branchsync)" "$(tables_and "$seeded")"
  marker=$STATE/.numbering-plan-$SITE
  if [ ! -f "$marker" ]; then
    # This shop's own series: its prefix on every counter it holds, each
    # restarted at 1, and the prefix a counter created later elsewhere takes
    # when it arrives (a shop's own schema change: it stays here).
    sql -c "ALTER TABLE ir_sequence_strict ALTER COLUMN prefix SET DEFAULT '$prefix'" \
        -c "UPDATE ir_sequence_strict SET prefix = '$prefix', number_next_internal = 1"
    date -u +%FT%TZ >"$marker"
    log "numbering plan: every gapless counter numbers $prefix<n>, from 1"
  fi
fi
log "serving on 0.0.0.0:8000 (database $DB)"
# -d: the database's pool is loaded at start (without it, Tryton 8.2's first
# login fails with KeyError 'res.user').
exec trytond -d "$DB"
