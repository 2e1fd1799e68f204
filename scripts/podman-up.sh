#!/usr/bin/env bash
# Podman, rootful and rootless, with the offline base image `cube-base:bookworm` (idempotent).
#
# Usage: scripts/podman-up.sh [--user NAME]
#   --user NAME  also set up rootless podman for NAME: the account (created when missing, with
#                a home and a login shell, password locked with '*' so that sshd accepts its
#                keys without PAM), its /etc/subuid and /etc/subgid ranges, and the base image
#                in its own image store. The tests use this for their rootless lab user.
#
# Run as root (after scripts/docker-up.sh, which builds the base image into Docker). Every step
# checks first and only does what is missing:
#   1. Debian's podman, uidmap (newuidmap/newgidmap for rootless), slirp4netns (rootless
#      networking), fuse-overlayfs (rootless overlay storage on older kernels) and catatonit
#      (the init process behind `podman run --init`, only Recommended by the podman package).
#   2. Without systemd as PID 1 (CI boxes, dev containers), podman's defaults (systemd cgroup
#      manager, journald events) cannot work: a drop-in selects cgroupfs and file events.
#   3. /dev/net/tun usable by every user (mode 0666, Debian's own default), which rootless
#      networking needs; some VMs create it root-only.
#   4. The base image in root's store, and in NAME's with --user: `docker save | podman load`.
#      There is no registry: nothing is ever pulled.
#   5. Rootful podman asks the OCI runtime for 1048576 open files and processes. Where root lacks
#      CAP_SYS_RESOURCE (some VM sandboxes), runc cannot raise a hard limit and every container
#      fails with "error setting rlimit". Then a drop-in sets default_ulimits to the hard limits
#      that conmon (the parent runc starts under) really has, read from a probe container.
#
# Environment: CUBE_BASE_IMAGE (cube-base:bookworm).
set -euo pipefail

IMAGE=${CUBE_BASE_IMAGE:-cube-base:bookworm}
DROPIN=/etc/containers/containers.conf.d/50-cube-no-systemd.conf
RLIMITS_DROPIN=/etc/containers/containers.conf.d/51-cube-rlimits.conf
user=""
while [ $# -gt 0 ]; do
    case "$1" in
        --user) user=${2:?--user needs a name}; shift 2 ;;
        *) printf 'usage: %s [--user NAME]\n' "$0" >&2; exit 2 ;;
    esac
done

say() { printf 'podman-up: %s\n' "$*"; }
die() { printf 'podman-up: error: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "run as root (it installs packages and loads images for root)."

install_packages() {
    local missing=()
    command -v podman >/dev/null || missing+=(podman)
    command -v newuidmap >/dev/null || missing+=(uidmap)
    command -v slirp4netns >/dev/null || missing+=(slirp4netns)
    command -v fuse-overlayfs >/dev/null || missing+=(fuse-overlayfs)
    command -v catatonit >/dev/null || missing+=(catatonit)
    [ ${#missing[@]} -eq 0 ] && { say "podman $(podman --version | awk '{print $3}') and its helpers are installed"; return; }
    say "installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
}

no_systemd_dropin() {
    if [ "$(ps -p 1 -o comm= 2>/dev/null)" = systemd ]; then
        say "systemd is PID 1: podman's defaults apply"; return
    fi
    [ -f "$DROPIN" ] && { say "no systemd: $DROPIN in place"; return; }
    mkdir -p "$(dirname "$DROPIN")"
    cat >"$DROPIN" <<'EOF'
# Written by cube's scripts/podman-up.sh: systemd is not PID 1 on this machine, so podman's
# systemd cgroup manager and journald event log cannot work.
[engine]
cgroup_manager = "cgroupfs"
events_logger = "file"
EOF
    say "no systemd: wrote $DROPIN (cgroupfs, file events)"
}

tun_device() {
    [ -c /dev/net/tun ] || { say "no /dev/net/tun: rootless containers need --network none"; return; }
    if [ "$(stat -c %a /dev/net/tun)" != 666 ]; then
        chmod 0666 /dev/net/tun
        say "/dev/net/tun made usable by every user (rootless networking)"
    fi
}

# load_for USER: the base image in that user's podman store ("" = root), from Docker's.
load_for() {
    local who=$1 run=()
    [ -n "$who" ] && run=(runuser -u "$who" -- env "HOME=$(getent passwd "$who" | cut -d: -f6)")
    if "${run[@]}" podman image exists "$IMAGE" 2>/dev/null; then
        say "image $IMAGE present for ${who:-root}"
    else
        docker image inspect "$IMAGE" >/dev/null 2>&1 \
            || die "Docker has no $IMAGE to copy from: run scripts/docker-up.sh first."
        say "loading $IMAGE into ${who:-root}'s podman store (docker save | podman load)"
        docker save "$IMAGE" | (cd / && "${run[@]}" podman load --quiet >/dev/null)
    fi
    local err
    err=$(cd / && "${run[@]}" podman run --rm --network none "$IMAGE" python3 -c 'import venv' 2>&1) \
        && return
    if [ -z "$who" ] && grep -q 'error setting rlimit' <<<"$err"; then
        fit_rlimits
        err=$(cd / && podman run --rm --network none "$IMAGE" python3 -c 'import venv' 2>&1) && return
    fi
    printf '%s\n' "$err" >&2
    die "$IMAGE is in ${who:-root}'s store but cannot run python3 (see the error above)."
}

# fit_rlimits: default_ulimits = the hard limits conmon has (see step 5 above).
fit_rlimits() {
    local probe=cube-rlimit-probe pid nofile nproc
    podman rm -f -t 0 "$probe" >/dev/null 2>&1 || true
    podman run -d --name "$probe" --network none --ulimit nofile=1024:1024 \
        --ulimit nproc=1024:1024 "$IMAGE" sleep 60 >/dev/null
    pid=$(podman inspect --format '{{.State.ConmonPid}}' "$probe")
    nofile=$(awk '/^Max open files/ {print $5}' "/proc/$pid/limits")
    nproc=$(awk '/^Max processes/ {print $4}' "/proc/$pid/limits")
    podman rm -f -t 0 "$probe" >/dev/null
    mkdir -p "$(dirname "$RLIMITS_DROPIN")"
    cat >"$RLIMITS_DROPIN" <<END
# Written by cube's scripts/podman-up.sh: root here cannot raise hard limits (no
# CAP_SYS_RESOURCE), so containers get the hard limits conmon has instead of podman's 1048576.
[containers]
default_ulimits = ["nofile=$nofile:$nofile", "nproc=$nproc:$nproc"]
END
    say "root cannot raise rlimits: wrote $RLIMITS_DROPIN (nofile $nofile, nproc $nproc)"
}

rootless_user() {
    local who=$1
    if ! id "$who" >/dev/null 2>&1; then
        useradd --create-home --shell /bin/bash "$who"
        say "created user $who"
    fi
    # A locked password ('!') makes sshd without PAM refuse even key logins; '*' does not.
    [ "$(getent shadow "$who" | cut -d: -f2)" = '*' ] || usermod -p '*' "$who"
    for f in /etc/subuid /etc/subgid; do
        if ! grep -q "^$who:" "$f" 2>/dev/null; then
            local start
            start=$(awk -F: 'BEGIN{m=100000} {e=$2+$3; if (e>m) m=e} END{print m}' "$f" 2>/dev/null || echo 100000)
            echo "$who:$start:65536" >>"$f"
            say "gave $who the range $start-$((start + 65535)) in $f"
        fi
    done
    load_for "$who"
}

install_packages
no_systemd_dropin
tun_device
load_for ""
[ -n "$user" ] && rootless_user "$user"
say "ready"
