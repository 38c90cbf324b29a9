#!/usr/bin/env bash
# The image's entrypoint: `server`, `client` or `up` (then that role's own flags), or any
# other command (e.g. `jobrelay submit ...`, `bash`). Configuration is the same as outside a
# container: flags, and the variables the binary reads (PORT, DATA_PATH, JOBRELAY_CONFIG,
# JOBRELAY_CLIENT_TOKEN_FILE, JOBRELAY_USERS_FILE, SERVICE_<NAME>_UPLOAD_URL, DATABASE_URL,
# ...). This adds only what a container needs: listen on every interface of the container
# (JOBRELAY_BIND), keep the data under the volume /var/lib/jobrelay, and build DATABASE_URL
# from JOBRELAY_DB_HOST and JOBRELAY_DB_PASSWORD_FILE when they are given.
set -euo pipefail
role=${1:-up}
bind=${JOBRELAY_BIND:-0.0.0.0}
case "$role" in
  server)
    shift
    export DATA_PATH=${DATA_PATH:-/var/lib/jobrelay/server}
    # The stack's PostgreSQL: its host, and the password from a file (never in the
    # environment of the container's definition), as DATABASE_URL for the server.
    if [ -n "${JOBRELAY_DB_HOST:-}" ] && [ -z "${DATABASE_URL:-}" ]; then
      password=$(cat "${JOBRELAY_DB_PASSWORD_FILE:?JOBRELAY_DB_PASSWORD_FILE names the password file}")
      export DATABASE_URL="postgres://${JOBRELAY_DB_USER:-jobrelay}:${password}@${JOBRELAY_DB_HOST}:${JOBRELAY_DB_PORT:-5432}/${JOBRELAY_DB_NAME:-jobrelay}"
    fi
    exec /usr/local/bin/jobrelay server --bind "$bind" "$@"
    ;;
  client)
    shift
    export DATA_PATH=${DATA_PATH:-/var/lib/jobrelay/client}
    exec /usr/local/bin/jobrelay client --bind "$bind" "$@"
    ;;
  up)
    shift
    export JOBRELAY_UP_HOST=${JOBRELAY_UP_HOST:-$bind}
    exec /usr/local/bin/jobrelay up --data-dir "${JOBRELAY_DATA_DIR:-/var/lib/jobrelay/up}" "$@"
    ;;
  *)
    exec "$@"
    ;;
esac
