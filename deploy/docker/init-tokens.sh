#!/usr/bin/env bash
# Writes the stack's secrets at first start into the directory given (a volume shared with the
# server and the clients), mode 600, and leaves them alone on later starts:
#   client.token  the token the server sends to every client (JOBRELAY_CLIENT_TOKEN_FILE)
#   user-1.token  the token of user 1 (an admin), to send as `Authorization: Bearer`
#   users.toml    the server's users file (JOBRELAY_USERS_FILE) holding that token
#   join.token    the token a client that dials out gives to join (JOBRELAY_JOIN_TOKEN_FILE)
#   db.password   the password of the stack's PostgreSQL user `jobrelay` (JOBRELAY_DB_PASSWORD_FILE)
set -euo pipefail
dir=${1:-/run/jobrelay/tokens}
umask 077
mkdir -p "$dir"
token() { head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n'; }
if [ ! -s "$dir/client.token" ]; then
  token > "$dir/client.token.tmp" && mv "$dir/client.token.tmp" "$dir/client.token"
  echo "wrote $dir/client.token"
fi
if [ ! -s "$dir/users.toml" ]; then
  user=$(token)
  printf '%s' "$user" > "$dir/user-1.token"
  printf '[[users]]\ntoken = "%s"\nuser_id = 1\nadmin = true\n' "$user" > "$dir/users.toml.tmp"
  mv "$dir/users.toml.tmp" "$dir/users.toml"
  echo "wrote $dir/users.toml and $dir/user-1.token"
fi
if [ ! -s "$dir/join.token" ]; then
  token > "$dir/join.token.tmp" && mv "$dir/join.token.tmp" "$dir/join.token"
  echo "wrote $dir/join.token"
fi
if [ ! -s "$dir/db.password" ]; then
  token > "$dir/db.password.tmp" && mv "$dir/db.password.tmp" "$dir/db.password"
  echo "wrote $dir/db.password"
fi
chmod 600 "$dir"/*
