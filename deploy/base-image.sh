#!/usr/bin/env bash
# Make the local stand-in for the official python:3.11-slim base image: a minimal Debian bookworm
# root filesystem from debootstrap (its python3 is 3.11), trimmed, and imported into podman's image
# store. Needed only where no image registry can be reached; with one, the Dockerfile's default
# base is used instead. Idempotent: does nothing when the image is already there.
#
#   deploy/base-image.sh [TAG]        (default localhost/vae-base:bookworm; needs root, debootstrap, podman)
set -euo pipefail

TAG=${1:-${BASE_IMAGE:-localhost/vae-base:bookworm}}
SUITE=${SUITE:-bookworm}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
export CONTAINERS_CONF=${CONTAINERS_CONF:-$(cd "$(dirname "$0")" && pwd)/containers.conf}

if podman image exists "$TAG"; then
    echo "base image $TAG: already there"
    exit 0
fi

root=$(mktemp -d /var/tmp/vae-base.XXXXXX)
trap 'rm -rf "$root"' EXIT
echo "base image $TAG: debootstrap $SUITE from $MIRROR into $root"
# minbase: only Essential packages and apt; python3 brings python3.11 and its standard library.
debootstrap --variant=minbase --include=python3 "$SUITE" "$root" "$MIRROR" >"$root.log" 2>&1 \
    || { tail -n 30 "$root.log"; rm -f "$root.log"; exit 1; }
rm -f "$root.log"

# Trim what a container never reads: docs, man pages, locales, glibc's iconv modules for legacy
# character sets (Python has its own codecs), apt's lists and caches, logs. The standard library's
# bytecode stays: the non-root server could not write it.
rm -rf "$root"/usr/share/{doc,man,info,locale,lintian,linda}/* \
       "$root"/usr/lib/x86_64-linux-gnu/gconv \
       "$root"/var/cache/apt/* "$root"/var/lib/apt/lists/* "$root"/var/log/* \
       "$root"/var/cache/debconf/*-old "$root"/tmp/* "$root"/root/.cache

tar --numeric-owner -C "$root" -c . | podman import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["python3"]' \
    --quiet - "$TAG" >/dev/null
podman run --rm --network host "$TAG" python3 -c 'import sys; assert sys.version_info[:2] == (3, 11), sys.version'
echo "base image $TAG: $(podman image inspect --format '{{.Size}}' "$TAG") bytes"
