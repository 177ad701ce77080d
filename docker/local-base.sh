#!/usr/bin/env bash
# Make a local stand-in for the CPU image's base (python:3.11-slim-bookworm) where no container
# registry is reachable: Debian bookworm (minbase) from this machine's apt mirror, with Debian's
# Python 3.11 (venv, pip, headers for the kernels' build) and `python` / `pip` on PATH as in the
# official image; imported into buildah's local storage. Needs root, debootstrap and buildah.
#
#   docker/local-base.sh [TAG]      (default localhost/heterocache-base:bookworm-python3.11)
#
# Used by scripts/image.sh when the default base cannot be pulled. Takes 3-6 minutes.
set -euo pipefail
TAG="${1:-localhost/heterocache-base:bookworm-python3.11}"
STORAGE=(${HETEROCACHE_BUILDAH_STORAGE:+--storage-driver "$HETEROCACHE_BUILDAH_STORAGE"})
# the mirror this machine's apt uses (deb822 or one-line sources), else Debian's own
mirror="$(sed -n -e 's/^URIs: *\([^ ]*\).*/\1/p' -e 's/^deb \(\[[^]]*\] \)\?\(http[^ ]*\) bookworm .*/\2/p' \
  /etc/apt/sources.list.d/*.sources /etc/apt/sources.list 2>/dev/null | grep -v security | head -1 || true)"
mirror="${mirror:-http://deb.debian.org/debian}"
root="$(mktemp -d /var/tmp/heterocache-base.XXXXXX)"
trap 'rm -rf "$root"' EXIT
echo "local-base: debootstrap bookworm from $mirror"
debootstrap --variant=minbase \
  --include=python3.11,python3.11-venv,python3.11-dev,python3-pip,ca-certificates \
  bookworm "$root" "$mirror" > "$root.log" 2>&1 || { tail -20 "$root.log"; exit 1; }
rm -f "$root.log"
ln -sf /usr/bin/python3.11 "$root/usr/local/bin/python"
ln -sf /usr/bin/pip3 "$root/usr/local/bin/pip"
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
ctr="$(buildah "${STORAGE[@]}" from scratch)"
buildah "${STORAGE[@]}" copy --quiet "$ctr" "$root" / > /dev/null
buildah "${STORAGE[@]}" config --env LANG=C.UTF-8 --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
  --cmd python3 --label org.opencontainers.image.description="Debian bookworm + Python 3.11 (vllm-heterocache local base)" \
  "$ctr"
buildah "${STORAGE[@]}" commit --quiet --rm "$ctr" "$TAG" > /dev/null
echo "local-base: $TAG"
