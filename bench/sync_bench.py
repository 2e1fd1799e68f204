#!/usr/bin/env python3
"""cube sync against `rsync -a` over OpenSSH, to the same lab host, in the same run.

    python bench/sync_bench.py [--runs N] [--big]

Builds a synthetic workspace (2,000 small files of 0.5-16 KiB and four 256 MiB files of random
bytes) and a tree of 10,000 files of 1-10 KiB, starts one lab host (real sshd,
`controller.lab`) under a temporary CUBE_HOME, and times, per run: (1) first push of the
workspace, (2) no-change re-push, (3) re-push after 1 MiB changed inside one 256 MiB file,
(4) first push and (5) no-change re-push of the 10,000-file tree, (6) a pull of the whole
workspace into an empty folder; each beside `rsync -a` doing the same, printing seconds, bytes
(cube: its own count of stream bytes; rsync: --stats "Total bytes sent/received") and the
ratios cube/rsync, then `tar c | ssh host tar x` of both trees as the raw-pipe floor. With
--runs N it also prints the medians.

Fairness: both sides are warm, as within `cube remote run`. cube uses its open connection (and
the OpenSSH master it starts for bulk streams, warmed before timing, with the stream process it
keeps ready after each bulk stream: controller.standby; the bench waits, untimed, until that is
started, so that nothing of cube's runs beside a timing); rsync and the tar floor use a warm
OpenSSH ControlMaster, so neither pays a handshake (but rsync pays its server's start, as it
does on every call). rsync keeps OpenSSH's default
cipher, as `rsync -a` users get it. Each step starts after `sync` (no tool pays for another's
writeback), even runs time cube first and odd runs rsync first, and nothing is deleted until
every run is over (on ext4, creating files soon after many were deleted costs more, and would
fall on whichever tool came next). Neither cube's push (unless --durable) nor rsync waits for
the host's disk. `--big` also pushes and pulls a 2.5 GiB file both ways,
checking sha256 on arrival. Targets (issue 14): every time ratio <= 1.0; bytes on the 1 MiB
change within 1.2x of rsync's.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

MiB = 1 << 20


def build_workspace(ws: Path, small: int, big: int, big_size: int, seed: int = 7) -> None:
    rnd = random.Random(seed)
    for i in range(small):
        path = ws / f"dir{i % 40:02d}" / f"file{i:04d}.dat"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(os.urandom(rnd.randint(512, 16 * 1024)))
    for i in range(big):
        write_random(ws / f"big{i}.bin", big_size)


def write_random(path: Path, size: int) -> str:
    digest = hashlib.sha256()
    with open(path, "wb") as f:
        for start in range(0, size, 64 * MiB):
            chunk = os.urandom(min(64 * MiB, size - start))
            digest.update(chunk)
            f.write(chunk)
    return digest.hexdigest()


def change_one_mib(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(os.urandom(MiB))


def warm_page_cache(ws: Path) -> None:
    """Both tools then read from memory: neither pays for the other's first disk read."""
    subprocess.run(["bash", "-c", f"find {shlex.quote(str(ws))} -type f -print0 | "
                    "xargs -0 cat > /dev/null"], check=True)


class Rsync:
    """rsync -a (and the tar floor) over one warm OpenSSH ControlMaster."""

    def __init__(self, host, key: Path, known_hosts: Path, control: Path):
        self.host = f"{os.environ.get('USER', 'root')}@{host.address}"
        self.dest = self.host
        self.argv = ["ssh", "-p", str(host.port), "-i", str(key), "-o",
                     f"UserKnownHostsFile={known_hosts}", "-o", "StrictHostKeyChecking=yes",
                     "-o", "BatchMode=yes", "-o", f"ControlPath={control}"]
        self.ssh = shlex.join(self.argv)
        subprocess.run([*self.argv, "-o", "ControlMaster=yes", "-o", "ControlPersist=900",
                        self.host, "true"], check=True)

    def close(self) -> None:
        subprocess.run([*self.argv, "-O", "exit", self.host], capture_output=True)

    def tar_floor(self, local: Path, remote: str) -> float:
        """`tar c | ssh host tar x`: what the raw pipe allows (no checks, no fsync)."""
        settle()
        start = time.monotonic()
        subprocess.run(f"tar cf - -C {shlex.quote(str(local))} . | {self.ssh} {self.host} "
                       f"{shlex.quote(f'mkdir -p {remote} && tar xf - -C {remote}')}",
                       shell=True, check=True)
        return time.monotonic() - start

    def run(self, src: str, dst: str, counter: str) -> tuple[float, int]:
        settle()
        start = time.monotonic()
        out = subprocess.run(["rsync", "-a", "--stats", "-e", self.ssh, src, dst],
                             check=True, capture_output=True, text=True).stdout
        seconds = time.monotonic() - start
        moved = re.search(rf"Total bytes {counter}: ([\d,.]+)", out).group(1)
        return seconds, int(re.sub(r"[,.]", "", moved))

    def push(self, local: Path, remote: str) -> tuple[float, int]:
        return self.run(f"{local}/", f"{self.dest}:{remote}/", "sent")

    def pull(self, remote: str, local: Path) -> tuple[float, int]:
        """Bytes that came down the wire: rsync's "Total bytes received" on our side."""
        return self.run(f"{self.dest}:{remote}/", f"{local}/", "received")


DURABLE = [False]   # --durable: pushes as with CUBE_SYNC_DURABLE=1


def settle() -> None:
    """Write back what the previous step left dirty, untimed: no tool pays for another's data."""
    os.sync()


def cube_push(conn, ws: Path, remote: str) -> tuple[float, int]:
    from controller import sync
    settle()
    start = time.monotonic()
    report = sync.push(conn, ws, remote, progress=False, durable=DURABLE[0])
    seconds = time.monotonic() - start
    conn.standby.wait()   # the next spare's start (see below) runs beside no timing
    return seconds, report.bytes_sent


def cube_pull(conn, remote: str, local: Path) -> tuple[float, int]:
    from controller import sync
    settle()
    start = time.monotonic()
    report = sync.pull(conn, remote, local, progress=False)
    seconds = time.monotonic() - start
    conn.standby.wait()
    return seconds, report.bytes_sent


def build_small_tree(top: Path, count: int, seed: int = 11) -> None:
    rnd = random.Random(seed)
    for i in range(count):
        path = top / f"d{i % 100:02d}" / f"f{i:05d}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(os.urandom(rnd.randint(1024, 10 * 1024)))


def fmt_row(name: str, cube: tuple[float, int], rsync: tuple[float, int]) -> str:
    ratio_t = cube[0] / rsync[0] if rsync[0] else float("inf")
    ratio_b = cube[1] / rsync[1] if rsync[1] else float("inf")
    return (f"{name:<24} cube {cube[0]:7.2f} s {cube[1]:>13,} B | rsync {rsync[0]:7.2f} s "
            f"{rsync[1]:>13,} B | time ratio {ratio_t:5.2f}  bytes ratio {ratio_b:6.2f}")


def one_run(conn, rsync: Rsync, ws: Path, small: Path, tmp: Path, root: str,
            run: int) -> dict[str, tuple]:
    """The six cases, each as (cube, rsync). Even runs time cube first, odd runs rsync first.
    Nothing is deleted until every run is over (see main): on ext4, creating files soon after
    many were deleted costs more, and would fall on whichever tool came next."""
    from controller import sync
    cube_dir, rsync_dir = f"bench/cube-{run}", f"{root}/bench/rsync-{run}"
    cube_small, rsync_small = f"bench/cube-small-{run}", f"{root}/bench/rsync-small-{run}"
    conn.run(["mkdir", "-p", rsync_dir, rsync_small])

    def pair(cube_step, rsync_step):
        if run % 2:
            theirs = rsync_step()
            return cube_step(), theirs
        return cube_step(), rsync_step()

    for tree in (ws, small):
        Path(sync.local_cache_file(tree)).unlink(missing_ok=True)   # a first push knows nothing
        warm_page_cache(tree)
    rows = {"first push 1.1 GiB": pair(lambda: cube_push(conn, ws, cube_dir),
                                       lambda: rsync.push(ws, rsync_dir)),
            "no-change re-push": pair(lambda: cube_push(conn, ws, cube_dir),
                                      lambda: rsync.push(ws, rsync_dir))}
    change_one_mib(ws / "big1.bin", 100 * MiB + 4321 + run * 7 * MiB)   # not block-aligned
    rows["1 MiB changed"] = pair(lambda: cube_push(conn, ws, cube_dir),
                                 lambda: rsync.push(ws, rsync_dir))
    rows["10k files first push"] = pair(lambda: cube_push(conn, small, cube_small),
                                        lambda: rsync.push(small, rsync_small))
    rows["10k files no-change"] = pair(lambda: cube_push(conn, small, cube_small),
                                       lambda: rsync.push(small, rsync_small))
    back, rback = tmp / f"pull-cube-{run}", tmp / f"pull-rsync-{run}"
    rback.mkdir()
    rows["pull 1.1 GiB"] = pair(lambda: cube_pull(conn, cube_dir, back),
                                lambda: rsync.pull(rsync_dir, rback))
    floor = (rsync.tar_floor(ws, f"{root}/bench/tar-{run}"),
             rsync.tar_floor(small, f"{root}/bench/tar-small-{run}"))
    rows["tar | ssh floor"] = ((floor[0], 0), (floor[1], 0))
    for name, (c, r) in rows.items():
        print(fmt_row(name, c, r) if name != "tar | ssh floor" else fmt_floor(floor), flush=True)
    return rows


def fmt_floor(floor) -> str:
    return (f"{'tar c | ssh tar x':<24} 1.1 GiB tree {floor[0]:7.2f} s | 10k-file tree "
            f"{floor[1]:7.2f} s (the raw pipe: no checks, no fsync)")


def warm_cube(conn, tmp: Path) -> None:
    """One untimed push and pull past the session-stream size: the connection's OpenSSH
    master for bulk streams is up, as it is after a run's first sync."""
    from controller import sync
    warm = tmp / "warm"
    warm.mkdir()
    write_random(warm / "w.bin", 9 * MiB)
    sync.push(conn, warm, "bench/warm", progress=False)
    sync.pull(conn, "bench/warm", tmp / "warm-back", progress=False)


def big_test(conn, rsync: Rsync, tmp: Path, root: str, size: int) -> None:
    from controller import sync
    src, back, rback = tmp / "big-src", tmp / "big-back", tmp / "big-rsync-back"
    for d in (src, back, rback):
        d.mkdir()
    digest = write_random(src / "huge.bin", size)
    print(f"--big: {size / MiB:.0f} MiB file, sha256 {digest[:16]}...", flush=True)
    cube_dir, rsync_dir = "bench/big-cube", f"{root}/bench/big-rsync"
    conn.run(["mkdir", "-p", rsync_dir])
    push = cube_push(conn, src, cube_dir)
    remote = conn.run(["sha256sum", f"{root}/{cube_dir}/huge.bin"]).stdout.split()[0]
    start = time.monotonic()
    report = sync.pull(conn, cube_dir, back, progress=False)
    pull = (time.monotonic() - start, report.bytes_sent)
    conn.standby.wait()
    local = hashlib.sha256()
    with open(back / "huge.bin", "rb") as f:
        for chunk in iter(lambda: f.read(64 * MiB), b""):
            local.update(chunk)
    ok = remote == digest == local.hexdigest()
    print(fmt_row("big push", push, rsync.push(src, rsync_dir)))
    print(fmt_row("big pull", pull, rsync.pull(rsync_dir, rback)))
    print(f"big: sha256 verified on the host and back here: {'OK' if ok else 'MISMATCH'}; "
          f"cube push {size / MiB / push[0]:.0f} MiB/s, pull {size / MiB / pull[0]:.0f} MiB/s")
    conn.run(["rm", "-rf", f"{root}/{cube_dir}", rsync_dir])
    if not ok:
        sys.exit(1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=1, help="repeat the three pushes N times")
    ap.add_argument("--small", type=int, default=2000)
    ap.add_argument("--tree", type=int, default=10000, help="files in the small-file tree")
    ap.add_argument("--big-files", type=int, default=4)
    ap.add_argument("--big-size-mib", type=int, default=256)
    ap.add_argument("--big", action="store_true", help="also push+pull a 2.5 GiB file")
    ap.add_argument("--skip-main", action="store_true", help="only the --big test")
    ap.add_argument("--durable", action="store_true",
                    help="pushes force their data to disk before answering (CUBE_SYNC_DURABLE=1),"
                         " to show what that costs; rsync -a does not")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="cube-sync-bench-"))
    os.environ["CUBE_HOME"] = str(tmp / "cube-home")
    from controller import lab, transport
    try:
        host = lab.lab_up(1)[0]
        conn = transport.connect("lab1")
        conn.ensure_agent()
        rsync = Rsync(host, lab.user_key(), tmp / "cube-home" / "known_hosts", tmp / "cm")
        warm_cube(conn, tmp)
        print(f"host {host.name} ({host.mode}) {host.address}:{host.port}; cube's bulk path "
              f"{'OpenSSH' if conn.ssh._bulk else 'paramiko'}; pushes durable: "
              f"{'yes' if args.durable else 'no (as rsync)'}; pulls durable: yes; "
              f"{os.cpu_count()} cores", flush=True)
        DURABLE[0] = args.durable
        if not args.skip_main:
            ws, small = tmp / "ws", tmp / "small"
            build_workspace(ws, args.small, args.big_files, args.big_size_mib * MiB)
            build_small_tree(small, args.tree)
            runs = [one_run(conn, rsync, ws, small, tmp, conn.root, i)
                    for i in range(args.runs)]
            if args.runs > 1:
                print(f"median over {args.runs} runs:")
                for name in runs[0]:
                    med = [tuple(statistics.median(r[name][side][k] for r in runs)
                                 for k in (0, 1)) for side in (0, 1)]
                    print(fmt_row(name, *med) if name != "tar | ssh floor"
                          else fmt_floor((med[0][0], med[1][0])))
            conn.run(["rm", "-rf", f"{conn.root}/bench"])
        if args.big:
            big_test(conn, rsync, tmp, conn.root, 2560 * MiB)
        rsync.close()
        conn.close()
    finally:
        lab.lab_down()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
