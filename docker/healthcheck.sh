#!/usr/bin/env bash
# branchsync-healthcheck — healthy when PostgreSQL accepts connections and the
# daemon is running and answers GET /health with 200 (http.listen set), or,
# without http.listen, when the daemon's process is alive.
# (/health is 200 whenever the daemon runs; it says nothing about the link to
# the main: see `branchsync status` for that.)
set -u
pg_isready -q -h /var/run/postgresql -p "${PGPORT:-5432}" -U postgres -d postgres || { echo "PostgreSQL is not ready"; exit 1; }
pid=$(cat /run/branchsync/daemon.pid 2>/dev/null) || { echo "branchsync is not started yet"; exit 1; }
kill -0 "$pid" 2>/dev/null || { echo "branchsync (pid $pid) is not running"; exit 1; }
port=$(cat /run/branchsync/http-port 2>/dev/null)
[ -n "$port" ] || { echo "branchsync runs (no http.listen: /health not checked)"; exit 0; }
exec 3<>"/dev/tcp/127.0.0.1/$port" || { echo "branchsync does not listen on 127.0.0.1:$port"; exit 1; }
printf 'GET /health HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n' >&3
read -r -t 4 status_line <&3 || { echo "no answer from /health"; exit 1; }
exec 3<&-
case "$status_line" in
  "HTTP/1.1 200"*|"HTTP/1.0 200"*) echo "ok"; exit 0 ;;
  *) echo "/health: ${status_line%$'\r'}"; exit 1 ;;
esac
