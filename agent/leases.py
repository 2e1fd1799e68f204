"""Slots, leases and the host's FIFO queue, with no daemon: files and flocks in a lease folder.

A host has `total` slots (one per GPU, else the inventory's `slots:`). Every user's agent on
the host uses the same lease folder (default /var/tmp/cube-leases, mode 1777), so leases are
host-wide while each user keeps their own cube root:

    LEASE_DIR/slot-<i>.lock         flocked by the supervisor of the job holding slot i
    LEASE_DIR/queue.lock            serialises grant decisions (held for milliseconds)
    LEASE_DIR/queue/<ns>-<job id>   a waiting job: {job_id, owner, slots, root, enqueued_at}
    LEASE_DIR/held/<job id>         a running job: {..., granted: [slots], gpus: [indexes]}

A queue entry and a held record are written to a temp name, flocked, filled, then renamed into
place, and stay flocked by their job's supervisor for its life: a record whose lock is free
belongs to a dead supervisor (SIGKILL, reboot) and is skipped, and removed when it is ours
(the sticky bit lets only its owner remove it). Every lock dies with its process, so a killed
job frees its slots and its place in the queue by itself. The oldest live entry is served
first and no later one passes it (strict FIFO); a GPU with compute apps that cube did not
start (nvidia-smi) counts as taken.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import pwd
import time

from . import gpus as gpu_query
from .protocol import AgentError

DEFAULT_LEASE_DIR = "/var/tmp/cube-leases"
POLL_S = 0.25          # how often a waiting supervisor looks again
GPU_CACHE_S = 2.0      # how long an nvidia-smi answer on busy GPUs is trusted
SHARED_MODE = 0o1777   # every user's agent writes here; only an entry's owner removes it


# -- the spec's lease fields

def wanted(spec):
    """Whether the job takes slots: specs from `cube remote run` carry a demand; older or
    hand-written specs without one run at once, as before."""
    return spec.get("slots") is not None


def check_spec(spec):
    """Validate the lease fields of a launch spec (docs/INTERNALS.md, "Job spec")."""
    if not wanted(spec):
        return
    slots, total = spec.get("slots"), spec.get("total_slots", 1)
    for name, value in (("slots", slots), ("total_slots", total)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise AgentError("launch: field %s must be a whole number >= 1, got %r."
                             % (name, value), hint="e.g. {\"slots\": 1, \"total_slots\": 4}")
    if slots > total:
        raise AgentError("launch: the job needs %d slots but this host has %d." % (slots, total),
                         hint="ask for at most %d (--slots / --gpus), or use a bigger host"
                              % total)
    gpus = spec.get("slot_gpus") or []
    if not isinstance(gpus, list) or not all(isinstance(g, int) for g in gpus) or (
            gpus and len(gpus) != total):
        raise AgentError("launch: field slot_gpus must list one GPU index per slot.",
                         hint="e.g. [0, 1, 2, 3] for total_slots 4, or [] without GPUs")
    if not isinstance(spec.get("lease_dir", ""), str):
        raise AgentError("launch: field lease_dir must be a folder path.")


def lease_dir_of(spec_or_path):
    path = spec_or_path if isinstance(spec_or_path, str) else spec_or_path.get("lease_dir")
    return os.path.abspath(os.path.expanduser(path or DEFAULT_LEASE_DIR))


def owner_name():
    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return str(os.getuid())


# -- shared files and locks

def ensure_dirs(lease_dir):
    """The lease folder and its queue/ and held/ folders, 1777 when we create them (the first
    user's agent makes them for everyone)."""
    for path in (lease_dir, os.path.join(lease_dir, "queue"), os.path.join(lease_dir, "held")):
        try:
            os.makedirs(path)
        except FileExistsError:
            continue
        with contextlib.suppress(OSError):
            os.chmod(path, SHARED_MODE)  # our umask would have taken the write bits away


def open_shared(path):
    """An fd on a lock file someone may have created before us. Read-only is enough for flock,
    and opening another user's file without O_CREAT is allowed in a sticky folder even where
    fs.protected_regular forbids O_CREAT on it."""
    while True:
        try:
            return os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            pass
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            continue  # created between our two opens: open it as an existing file
        with contextlib.suppress(OSError):
            os.fchmod(fd, 0o644)
        return fd


def try_flock(fd):
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        if err.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
            return False
        raise
    return True


def try_lock_file(path):
    """An exclusive flock on `path` taken without waiting: its fd, or None when it is held."""
    fd = open_shared(path)
    if try_flock(fd):
        return fd
    os.close(fd)
    return None


def is_held(path):
    """Whether a live process holds the flock on `path` (False when it vanished)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        if try_flock(fd):
            return False
        return True
    finally:
        os.close(fd)  # closing drops the probe's own lock, if it got one


@contextlib.contextmanager
def grant_lock(lease_dir):
    fd = open_shared(os.path.join(lease_dir, "queue.lock"))
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def write_locked_record(folder, name, record):
    """Write `record` as folder/name, flocked before it becomes visible; the fd holds it."""
    tmp = os.path.join(folder, ".tmp-%d-%s" % (os.getpid(), name))
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, json.dumps(record, sort_keys=True).encode("utf-8"))
        os.fchmod(fd, 0o644)
        os.rename(tmp, os.path.join(folder, name))
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return fd


def live_records(folder):
    """[(name, record)] of the records whose writer still holds them, sorted by name; stale
    ones that are ours are removed (another user's stay until their agent passes by)."""
    try:
        names = sorted(n for n in os.listdir(folder) if not n.startswith("."))
    except FileNotFoundError:
        return []
    live = []
    for name in names:
        path = os.path.join(folder, name)
        if not is_held(path):
            with contextlib.suppress(OSError):
                if os.stat(path).st_uid == os.getuid():
                    os.unlink(path)
            continue
        try:
            with open(path) as handle:
                record = json.load(handle)
        except (OSError, ValueError):
            continue
        if isinstance(record, dict):
            live.append((name, record))
    return live


# -- GPUs busy with processes cube did not start

class BusyGpus:
    """GPU indexes with compute apps, from nvidia-smi, asked at most every GPU_CACHE_S."""

    def __init__(self):
        self.busy, self.asked = set(), None

    def get(self):
        if self.asked is None or time.monotonic() - self.asked > GPU_CACHE_S:
            found = gpu_query.finish(gpu_query.start())
            self.busy = {g["index"] for g in found.get("gpus") or [] if g.get("busy_pids")}
            self.asked = time.monotonic()
        return self.busy


# -- the queue

class Lease:
    """What a granted job holds until its supervisor exits: slot locks and its held record."""

    def __init__(self, lease_dir, job_id, slots, gpus, fds):
        self.lease_dir, self.job_id, self.slots, self.gpus, self.fds = (
            lease_dir, job_id, slots, gpus, fds)

    def env(self):
        """What the tasks see: only the granted GPUs (none on a GPU-less host)."""
        env = {"CUBE_SLOTS": ",".join(str(s) for s in self.slots)}
        if self.gpus:
            devices = ",".join(str(g) for g in self.gpus)
            env.update(CUDA_VISIBLE_DEVICES=devices, CUBE_GPU_DEVICES=devices)
        return env

    def release(self):
        with contextlib.suppress(OSError):
            os.unlink(os.path.join(self.lease_dir, "held", self.job_id))
        for fd in self.fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.fds = []


class Ticket:
    """A job's place in the host's queue: its entry, flocked while it waits."""

    def __init__(self, spec, root):
        self.lease_dir = lease_dir_of(spec)
        self.job_id = spec["job_id"]
        self.demand = int(spec["slots"])
        self.total = int(spec.get("total_slots") or 1)
        self.slot_gpus = list(spec.get("slot_gpus") or [])
        self.record = {"job_id": self.job_id, "owner": owner_name(), "slots": self.demand,
                       "root": root, "name": spec.get("name"),
                       "enqueued_at": time.time()}
        self.name, self.fd, self.busy = "", None, BusyGpus()

    def enqueue(self):
        ensure_dirs(self.lease_dir)
        self.name = "%020d-%s" % (time.time_ns(), self.job_id)
        self.fd = write_locked_record(os.path.join(self.lease_dir, "queue"), self.name,
                                      self.record)

    def leave(self):
        """Out of the queue (granted, cancelled or refused): the entry goes, then its lock."""
        if self.fd is None:
            return
        with contextlib.suppress(OSError):
            os.unlink(os.path.join(self.lease_dir, "queue", self.name))
        os.close(self.fd)
        self.fd = None

    def try_grant(self):
        """A Lease when this entry is the oldest live one and enough slots are free."""
        with grant_lock(self.lease_dir):
            live = live_records(os.path.join(self.lease_dir, "queue"))
            if not live or live[0][0] != self.name:
                return None
            taken = self._take_slots()
            if taken is None:
                return None
            slots = [slot for slot, _ in taken]
            gpus = [self.slot_gpus[s] for s in slots] if self.slot_gpus else []
            held = dict(self.record, granted=slots, gpus=gpus, started_at=time.time())
            fds = [fd for _, fd in taken]
            fds.append(write_locked_record(os.path.join(self.lease_dir, "held"), self.job_id,
                                           held))
            self.leave()
            return Lease(self.lease_dir, self.job_id, slots, gpus, fds)

    def _take_slots(self):
        """[(slot, fd)] for `demand` free slots, locked; None (nothing kept) when too few."""
        busy = self.busy.get() if self.slot_gpus else set()
        taken = []
        for slot in range(self.total):
            if self.slot_gpus and self.slot_gpus[slot] in busy:
                continue
            fd = try_lock_file(os.path.join(self.lease_dir, "slot-%d.lock" % slot))
            if fd is not None:
                taken.append((slot, fd))
                if len(taken) == self.demand:
                    return taken
        for _, fd in taken:
            os.close(fd)
        return None


def acquire(ticket, cancelled, on_wait):
    """Wait in the queue until granted (a Lease) or cancelled (None). `on_wait()` is called
    once when the first try fails; it may return False to give up (--no-queue)."""
    ticket.enqueue()
    try:
        lease = ticket.try_grant()
        if lease is not None:
            return lease
        if on_wait() is False:
            return None
        while not cancelled():
            time.sleep(POLL_S)
            lease = ticket.try_grant()
            if lease is not None:
                return lease
        return None
    finally:
        ticket.leave()


# -- what a container task sees

def container_gpu_argv(argv, gpus):
    """A container argv built on the controller names the first GPUs; the grant decides which:
    `--gpus "device=..."` (docker) and `--device nvidia.com/gpu=N` (podman) are rewritten to
    the granted indexes, in order. Argvs without GPU flags are returned as they are."""
    out, podman_slot = list(argv), 0
    for i in range(len(out) - 1):
        if out[i] == "--gpus":
            out[i + 1] = '"device=%s"' % ",".join(str(g) for g in gpus)
        elif out[i] == "--device" and out[i + 1].startswith("nvidia.com/gpu="):
            if podman_slot < len(gpus):
                out[i + 1] = "nvidia.com/gpu=%d" % gpus[podman_slot]
            podman_slot += 1
    return out


# -- the host's view, for `probe`

def slot_view(lease_dir, total, slot_gpus=(), busy_gpus=()):
    """{total, free, holders, queued}: every user's jobs holding and waiting for this host's
    slots, from the lease folder (nothing is created or locked for long)."""
    lease_dir = lease_dir_of(lease_dir)
    holders = [{"job_id": r.get("job_id"), "owner": r.get("owner"), "name": r.get("name"),
                "slots": r.get("granted") or [], "gpus": r.get("gpus") or []}
               for _, r in live_records(os.path.join(lease_dir, "held"))]
    queued = [{"job_id": r.get("job_id"), "owner": r.get("owner"), "name": r.get("name"),
               "slots": r.get("slots")}
              for _, r in live_records(os.path.join(lease_dir, "queue"))]
    free = 0
    for slot in range(total):
        if slot_gpus and slot < len(slot_gpus) and slot_gpus[slot] in busy_gpus:
            continue
        if not is_held(os.path.join(lease_dir, "slot-%d.lock" % slot)):
            free += 1
    return {"total": total, "free": free, "lease_dir": lease_dir, "holders": holders,
            "queued": queued}
