#!/usr/bin/env bash
# Docker's HEALTHCHECK: the role's /health on its port (PORT, else the role's default:
# server and up 5000, client 9000). /health needs no token.
set -u
for port in ${PORT:-5000 9000}; do
  if curl -fsS --max-time 2 "http://127.0.0.1:$port/health" >/dev/null 2>&1; then
    exit 0
  fi
done
exit 1
