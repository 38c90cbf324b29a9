#!/usr/bin/env bash
# The stack's PostgreSQL (Debian's package), for compose.yaml and the Kubernetes manifests:
# at first start, initdb into $PGDATA with the superuser `jobrelay` and the password in
# $JOBRELAY_DB_PASSWORD_FILE (written by jobrelay-init-tokens), password authentication
# (scram-sha-256) for every network connection, and the database `jobrelay`; then postgres in
# the foreground. Later starts find the cluster and only run it. A cluster whose first start
# was cut off (no marker) is made again from nothing: it never held data.
set -euo pipefail
: "${PGDATA:=/var/lib/jobrelay/db}"
password_file=${JOBRELAY_DB_PASSWORD_FILE:?JOBRELAY_DB_PASSWORD_FILE names the password file}
bin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)
if [ ! -f "$PGDATA/.jobrelay-ready" ]; then
  rm -rf "$PGDATA"
  install -d -m 700 "$PGDATA"
  "$bin/initdb" -D "$PGDATA" -U jobrelay --pwfile="$password_file" \
    --auth-local=trust --auth-host=scram-sha-256 -E UTF8 --locale=C.UTF-8 >/dev/null
  {
    echo "listen_addresses = '*'"
    echo "unix_socket_directories = '$PGDATA'"
    echo "max_connections = 200"
  } >>"$PGDATA/postgresql.conf"
  echo "host all all all scram-sha-256" >>"$PGDATA/pg_hba.conf"
  "$bin/pg_ctl" -D "$PGDATA" -w -o "-c listen_addresses=''" start >/dev/null
  "$bin/createdb" -h "$PGDATA" -U jobrelay jobrelay
  "$bin/pg_ctl" -D "$PGDATA" -w -m fast stop >/dev/null
  touch "$PGDATA/.jobrelay-ready"
  echo "database cluster made in $PGDATA"
fi
exec "$bin/postgres" -D "$PGDATA"
