#!/bin/sh
# docker-compose.yml: give the relay's role (created by sql/03_relay_role.sql with a
# placeholder password) the password from the relay_db_password secret. Runs once,
# as an init script of the postgres image, when the data volume is new.
set -eu
: "${RELAY_DB_PASSWORD_FILE:?set RELAY_DB_PASSWORD_FILE to the secret file}"
password="$(head -n 1 "$RELAY_DB_PASSWORD_FILE")"
# psql's :'var' quotes the value as a literal, whatever it contains.
psql -v ON_ERROR_STOP=1 -v relay_password="$password" \
     --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" <<'SQL'
ALTER ROLE outbox_relay PASSWORD :'relay_password';
SQL
