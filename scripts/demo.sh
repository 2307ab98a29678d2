#!/usr/bin/env bash
# One-command demo: builds the relay, starts a throwaway PostgreSQL with
# wal_level=logical, creates the outbox table, and runs `outbox-relay demo`
# (relay + sample writer + consumer on librdkafka's in-process mock broker),
# printing each event as it arrives in Kafka with its commit → Kafka latency.
# Ctrl-C stops everything and removes the temporary cluster.
#
#   scripts/demo.sh [--rate N] [--count N]
set -euo pipefail
cd "$(dirname "$0")/.."

find_pg_bindir() {
  if [[ -n "${PG_BINDIR:-}" ]]; then echo "$PG_BINDIR"; return; fi
  for v in 17 16 15 14; do
    if [[ -x "/usr/lib/postgresql/$v/bin/initdb" ]]; then echo "/usr/lib/postgresql/$v/bin"; return; fi
  done
  if command -v initdb >/dev/null 2>&1; then dirname "$(command -v initdb)"; return; fi
}

BINDIR="$(find_pg_bindir || true)"
if [[ -z "$BINDIR" ]]; then
  if [[ $EUID -eq 0 ]] && command -v apt-get >/dev/null; then
    echo "==> installing PostgreSQL 15 (apt)"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql-15 >/dev/null
    BINDIR=/usr/lib/postgresql/15/bin
  else
    echo "PostgreSQL server binaries not found: install postgresql (e.g. apt-get install postgresql-15) or set PG_BINDIR" >&2
    exit 1
  fi
fi

echo "==> building outbox-relay (release)"
cargo build --release --quiet
RELAY="$PWD/target/release/outbox-relay"

WORK="$(mktemp -d /tmp/outbox-relay-demo.XXXXXX)"
chmod 755 "$WORK"
PORT="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
AS_PG=()
if [[ $EUID -eq 0 ]]; then
  chown postgres: "$WORK"
  AS_PG=(runuser -u postgres --)
fi

cleanup() {
  echo "==> stopping PostgreSQL and removing $WORK"
  "${AS_PG[@]}" "$BINDIR/pg_ctl" -D "$WORK/data" -m immediate stop >/dev/null 2>&1 || true
  rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

echo "==> starting a throwaway PostgreSQL ($("$BINDIR/postgres" --version)) on port $PORT"
"${AS_PG[@]}" "$BINDIR/initdb" -D "$WORK/data" -U postgres --auth=trust -E UTF8 >/dev/null
"${AS_PG[@]}" "$BINDIR/pg_ctl" -D "$WORK/data" -l "$WORK/postgres.log" -w -o \
  "-c port=$PORT -c listen_addresses=127.0.0.1 -c unix_socket_directories=$WORK -c wal_level=logical" start >/dev/null

URL="postgres://postgres@127.0.0.1:$PORT/postgres"
"$BINDIR/psql" -q -X -v ON_ERROR_STOP=1 "$URL" -f sql/01_outbox_table.sql -f sql/02_publication.sql -f sql/05_emit.sql

echo "==> running the relay demo (Ctrl-C to stop)"
"$RELAY" demo --postgres-url "$URL" "$@"
