#!/usr/bin/env bash
# Build the CPU image (`make image`): docker/Dockerfile.cpu, tagged vllm-heterocache:cpu.
#
#   scripts/image.sh [TAG]
#
# With a working Docker engine: `docker build` from the Dockerfile's defaults. Otherwise with
# buildah (Debian: apt-get install buildah podman runc debootstrap), as on this project's CI
# machines, which reach no container registry and no PyTorch index:
#   - RUN steps run in a chroot (--isolation chroot: no OCI runtime needed); layers are cached,
#     so a second build of an unchanged tree takes seconds;
#   - the base image: the Dockerfile's BASE_IMAGE if it can be pulled (or is local), else a local
#     one made by docker/local-base.sh (Debian bookworm + Python 3.11, from the apt mirror);
#   - torch: the Dockerfile's TORCH_INDEX_URL if it answers, else a file:// index, mounted for
#     the build only, holding the torch 2.13.0 CPU wheel found in pip's find-links;
#   - HTTPS from the build: where pip is configured with a CA bundle (an intercepting proxy's),
#     that bundle and a pip.conf naming it are mounted for the build only.
# Nothing mounted for the build ends up in the image. The image is the same either way but for
# its base: Debian's Python 3.11 instead of python.org's.
set -euo pipefail
cd "$(dirname "$0")/.."
TAG="${1:-${HETEROCACHE_IMAGE:-vllm-heterocache:cpu}}"
DOCKERFILE=docker/Dockerfile.cpu
LOCAL_BASE=localhost/heterocache-base:bookworm-python3.11
STAGING=/var/tmp/heterocache-image-build  # what is mounted into the build (RUN steps)

if command -v docker > /dev/null && docker info > /dev/null 2>&1; then
  exec docker build -f "$DOCKERFILE" -t "$TAG" .
fi
if ! command -v buildah > /dev/null; then
  echo "image: no container engine: start Docker, or install buildah (Debian: apt-get install buildah podman runc debootstrap)" >&2
  exit 1
fi
default_arg() { sed -n "s/^ARG $1=//p" "$DOCKERFILE"; }
args=(bud --layers --format docker --isolation chroot -f "$DOCKERFILE" -t "$TAG")

base="$(default_arg BASE_IMAGE)"
if ! buildah inspect --type image "$base" > /dev/null 2>&1 \
    && ! timeout 60 buildah pull --quiet "docker.io/library/$base" > /dev/null 2>&1; then
  if ! buildah inspect --type image "$LOCAL_BASE" > /dev/null 2>&1; then
    echo "image: $base cannot be pulled: making a local base, $LOCAL_BASE (docker/local-base.sh)"
    docker/local-base.sh "$LOCAL_BASE"
  fi
  args+=(--build-arg "BASE_IMAGE=$LOCAL_BASE")
  base="$LOCAL_BASE"
fi

rm -rf "$STAGING" && mkdir -p "$STAGING"
mounted=0
index="$(default_arg TORCH_INDEX_URL)"
if ! curl -sfo /dev/null --max-time 20 "$index/torch/"; then
  links="$(python3 -m pip config get global.find-links 2>/dev/null || true) ${PIP_FIND_LINKS:-}"
  wheel="$(find $links -maxdepth 1 -name 'torch-2.13.0+cpu-cp311-*x86_64.whl' 2>/dev/null | head -1 || true)"
  if [[ -z "$wheel" ]]; then
    echo "image: $index does not answer and pip's find-links hold no torch 2.13.0 CPU wheel for Python 3.11:" \
         "reach the index, or put the wheel in a find-links folder" >&2
    exit 1
  fi
  mkdir -p "$STAGING/simple/torch"
  cp --reflink=auto "$wheel" "$STAGING/simple/torch/"
  name="$(basename "$wheel")"
  printf '<!DOCTYPE html><html><body><a href="%s">%s</a></body></html>\n' "${name//+/%2B}" "$name" \
    > "$STAGING/simple/torch/index.html"
  args+=(--build-arg "TORCH_INDEX_URL=file:///run/heterocache-build/simple")
  echo "image: $index does not answer: torch from $wheel"
  mounted=1
fi
ca="${HETEROCACHE_BUILD_CA:-${PIP_CERT:-$(python3 -m pip config get global.cert 2>/dev/null || true)}}"
if [[ -n "$ca" && -f "$ca" ]]; then
  cp "$ca" "$STAGING/ca.crt"
  printf '[global]\ncert = /run/heterocache-build/ca.crt\n' > "$STAGING/pip.conf"
  args+=(--volume "$STAGING/pip.conf:/etc/pip.conf:ro")
  echo "image: pip in the build trusts $ca (as pip here does)"
  mounted=1
fi
[[ "$mounted" == 1 ]] && args+=(--volume "$STAGING:/run/heterocache-build:ro")

echo "image: buildah ${args[*]} (base $base)"
start=$SECONDS
buildah "${args[@]}" .
echo "image: built $TAG in $((SECONDS - start)) s"
