#!/usr/bin/env bash
# Bring up a Docker engine and the offline base image `cube-base:bookworm` (idempotent).
#
# Used by CI (.ci/run) and the README's setup, and mirrored by the test fixture
# tests/fixtures/docker.py. Every step checks first and only does what is missing:
#   1. Debian's docker.io + debootstrap installed (apt-get, only when missing).
#   2. An engine answers `docker info`; otherwise start `dockerd` in the background (there is no
#      systemd on CI boxes or in our dev containers) and wait for it, up to DOCKERD_WAIT seconds.
#   3. The base image exists; otherwise import it from the cached root-filesystem tarball,
#      building that tarball with debootstrap first when it is missing (about a minute).
#
# Engine settings, checked on this machine (Debian bookworm, kernel 6.x, cgroup v1, ext4 root):
# the defaults work: overlay2 on ext4 (d_type supported), the docker0 bridge and iptables rules
# (iptables-nft) are created, and containers run. So dockerd starts with no extra flags, and the
# storage driver is left to dockerd's own detection (it falls back to vfs where overlay2 is not
# supported, e.g. overlay-on-overlay). Where a box has no iptables/netfilter (some nested
# containers), set DOCKERD_FLAGS="--iptables=false --bridge=none": cube's containers need no
# network when their image is present.
#
# Environment: CUBE_BASE_IMAGE (cube-base:bookworm), CUBE_CACHE (/var/cache/cube),
# DEBIAN_MIRROR (the first deb.debian.org-style URI in apt's sources), DOCKERD_FLAGS (""),
# DOCKERD_LOG (/var/log/cube-dockerd.log), DOCKERD_WAIT (60).
set -euo pipefail

IMAGE=${CUBE_BASE_IMAGE:-cube-base:bookworm}
CACHE=${CUBE_CACHE:-/var/cache/cube}
TARBALL="$CACHE/base-bookworm.tar"
DOCKERD_LOG=${DOCKERD_LOG:-/var/log/cube-dockerd.log}
DOCKERD_WAIT=${DOCKERD_WAIT:-60}
# Packages in the base image: an interpreter and venv (ensurepip brings pip into venvs).
INCLUDE=python3,python3-venv

say() { printf 'docker-up: %s\n' "$*"; }
die() { printf 'docker-up: error: %s\n' "$*" >&2; exit 1; }

as_root() {
    if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
        die "'$*' needs root: run this script as root or install sudo."; fi
}

install_packages() {
    local missing=()
    command -v dockerd >/dev/null || missing+=(docker.io)
    command -v debootstrap >/dev/null || missing+=(debootstrap)
    [ ${#missing[@]} -eq 0 ] && { say "docker.io and debootstrap are installed"; return; }
    say "installing ${missing[*]}"
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
}

engine_up() {
    if docker info >/dev/null 2>&1; then
        say "engine answers ($(docker version --format '{{.Server.Version}}'))"; return
    fi
    if [ -S /var/run/docker.sock ] && docker info 2>&1 | grep -qi 'permission denied'; then
        die "the engine runs but $(id -un) may not use /var/run/docker.sock: run
  'sudo usermod -aG docker $(id -un)' and log in again (or run as root)."
    fi
    case "${DOCKER_HOST:-unix:///var/run/docker.sock}" in
        unix:///var/run/docker.sock|unix:///run/docker.sock) ;;
        *) die "DOCKER_HOST=$DOCKER_HOST does not answer; this script only starts the local
  default engine (unset DOCKER_HOST, or start that engine yourself)." ;;
    esac
    local pid
    pid=$(cat /var/run/docker.pid 2>/dev/null || true)
    if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
        die "dockerd is running (pid $pid) but does not answer 'docker info'; see $DOCKERD_LOG,
  or stop it (kill $pid) and run this script again."
    fi
    say "starting dockerd (log: $DOCKERD_LOG)"
    # shellcheck disable=SC2086  # DOCKERD_FLAGS is a list of words
    as_root bash -c "nohup dockerd ${DOCKERD_FLAGS:-} >>'$DOCKERD_LOG' 2>&1 </dev/null &"
    local waited=0
    until docker info >/dev/null 2>&1; do
        [ "$waited" -ge "$DOCKERD_WAIT" ] && die "dockerd did not answer within ${DOCKERD_WAIT}s.
  Last lines of $DOCKERD_LOG:
$(tail -n 15 "$DOCKERD_LOG" 2>/dev/null | sed 's/^/    /')
  If it mentions iptables or the bridge, retry with DOCKERD_FLAGS='--iptables=false --bridge=none';
  if it mentions overlay, retry with DOCKERD_FLAGS='--storage-driver=vfs'."
        sleep 1; waited=$((waited + 1))
    done
    say "engine answers after ${waited}s ($(docker info --format '{{.Driver}}') storage driver)"
}

debian_mirror() {
    if [ -n "${DEBIAN_MIRROR:-}" ]; then echo "$DEBIAN_MIRROR"; return; fi
    # deb822 (URIs: ...) or one-line (deb URI suite ...) sources; the first plain Debian archive.
    local found
    found=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list \
        /etc/apt/sources.list.d/*.sources 2>/dev/null \
        | grep -oE '^ *(URIs:|deb) +https?://[^ ]+/debian/?( |$)' | awk '{print $2}' | head -n1 \
        || true)
    echo "${found:-http://deb.debian.org/debian}"
}

build_tarball() {
    [ -s "$TARBALL" ] && { say "cached base filesystem $TARBALL"; return; }
    local mirror
    mirror=$(debian_mirror)
    ROOTFS=$(mktemp -d "${TMPDIR:-/tmp}/cube-base.XXXXXX")
    trap 'as_root rm -rf "$ROOTFS" "$ROOTFS.log"' EXIT
    local root=$ROOTFS
    say "debootstrap bookworm from $mirror (about a minute)"
    as_root mkdir -p "$CACHE"
    as_root debootstrap --variant=minbase --include="$INCLUDE" bookworm "$root" "$mirror" \
        >"$root.log" 2>&1 || die "debootstrap failed; last lines of $root.log:
$(tail -n 15 "$root.log" | sed 's/^/    /')"
    # Package caches, lists, docs and locales are not needed at run time (saves ~140 MB,
    # which matters when images are shipped over SSH).
    as_root rm -rf "$root"/var/cache/apt/* "$root"/var/lib/apt/lists/* "$root"/usr/share/doc \
        "$root"/usr/share/man "$root"/usr/share/locale
    as_root tar -C "$root" -cf "$TARBALL.tmp" .
    as_root mv "$TARBALL.tmp" "$TARBALL"
    as_root rm -rf "$root"
    say "cached base filesystem $TARBALL ($(du -h "$TARBALL" | cut -f1))"
}

base_image() {
    if docker image inspect "$IMAGE" >/dev/null 2>&1; then
        say "image $IMAGE present ($(docker image inspect --format '{{.Id}}' "$IMAGE" | cut -c8-19))"
        return
    fi
    build_tarball
    say "importing $IMAGE from $TARBALL"
    docker import - "$IMAGE" <"$TARBALL" >/dev/null
    docker run --rm "$IMAGE" python3 -c 'import venv' \
        || die "image $IMAGE was imported but cannot run python3; remove $TARBALL and retry."
    say "image $IMAGE ready"
}

install_packages
engine_up
base_image
