#!/usr/bin/env bash
# Makes the image `debian:bookworm-slim` on a machine whose Docker engine cannot pull it (no
# registry reachable), so the project's Dockerfile builds unchanged: a minimal Debian made
# with debootstrap from the host's own Debian mirror, with the packages the images need
# already installed (the Dockerfile then finds them and skips apt), imported into the engine.
#
# Cached: if the engine already has the image, nothing is done (FORCE=1 rebuilds it).
# Needs root, debootstrap (installed with apt-get when missing) and a Docker engine.
# Takes about 2-4 minutes on a 2-core machine with a nearby mirror (see RELIABILITY.md).
set -euo pipefail

IMAGE=${IMAGE:-debian:bookworm-slim}
SUITE=${SUITE:-bookworm}
# What the Dockerfile's runtime, load-balancer and db stages install (keep in step with it).
PACKAGES=${PACKAGES:-bash,bubblewrap,util-linux,ca-certificates,curl,tini,haproxy,gawk,postgresql}

if [ "${FORCE:-0}" != 1 ] && docker image inspect "$IMAGE" >/dev/null 2>&1; then
  echo "$IMAGE already in the engine; not rebuilt (FORCE=1 to rebuild)"
  exit 0
fi

# The mirror this machine's apt uses, so the base comes from where its packages come from.
mirror=${MIRROR:-}
if [ -z "$mirror" ]; then
  mirror=$(grep -hoE '^(URIs:|deb) +[a-z]+://[^ ]+' /etc/apt/sources.list /etc/apt/sources.list.d/* 2>/dev/null \
    | grep -vE 'security|cloud|nodesource' | awk '{print $2}' | grep -E '/debian/?$' | head -n 1 || true)
fi
mirror=${mirror:-http://deb.debian.org/debian}

if ! command -v debootstrap >/dev/null 2>&1; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap
fi

start=$(date +%s)
root=$(mktemp -d /var/tmp/jobrelay-base.XXXXXX)
trap 'rm -rf "$root"' EXIT
echo "debootstrap $SUITE from $mirror into $root (packages: $PACKAGES)"
debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$root" "$mirror" >"$root.log" 2>&1 \
  || { tail -n 30 "$root.log" >&2; rm -f "$root.log"; exit 1; }
rm -f "$root.log"
# Like the official slim image: no package lists or caches, apt pointed at the same mirror.
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/var/cache/apt/archives/*.deb
echo "deb $mirror $SUITE main" > "$root/etc/apt/sources.list"
tar -C "$root" -c . | docker import --change 'CMD ["bash"]' - "$IMAGE" >/dev/null
echo "$IMAGE imported in $(( $(date +%s) - start )) s"
