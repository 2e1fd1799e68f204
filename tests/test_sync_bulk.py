"""The OpenSSH bulk path (controller.ssh_bulk) against real sshd hosts: sync goes through it,
it trusts only the host key the paramiko connection verified, and it goes when the
connection does."""

from __future__ import annotations

import hashlib
import os
import shlex
import subprocess
import tempfile
import time

import paramiko
import pytest

from controller import ssh_bulk, sync
from controller.errors import CubeError
from tests.test_sync import MiB, remote_sha, tree, write  # noqa: F401 (fixture)
from tests.test_sync import ssh_conn as ssh_conn

pytestmark = pytest.mark.integration


def test_large_syncs_go_through_one_pinned_openssh_master(ssh_conn, tmp_path):
    src = tmp_path / "src"
    write(src / "big.bin", os.urandom(12 * MiB))        # past the session-stream limit
    target = f"cubes/bulk-{tmp_path.name}"
    assert sync.push(ssh_conn, src, target).files_sent == 1
    bulk = ssh_conn.ssh._bulk
    assert isinstance(bulk, ssh_bulk.OpenSSHBulk) and bulk.master.poll() is None
    pinned = open(os.path.join(bulk.dir, "known_hosts")).read().split()
    key = ssh_conn.client.get_transport().get_remote_server_key()
    assert pinned == [ssh_bulk.ALIAS, key.get_name(), key.get_base64()]
    back = tmp_path / "back"
    assert sync.pull(ssh_conn, target, back).files_sent == 1
    assert tree(back) == tree(src)
    folder = bulk.dir
    ssh_conn.close()
    assert bulk.master is None and not os.path.exists(folder)   # no master left behind


def test_the_openssh_path_refuses_a_host_whose_key_is_not_the_verified_one(ssh_conn):
    spec = ssh_conn.ssh.spec
    other = paramiko.Ed25519Key.from_private_key_file(str(write_key(spec)))
    bulk = ssh_bulk.OpenSSHBulk(spec, other, 10)
    with pytest.raises(CubeError, match="CHANGED"):
        bulk.start()
    assert bulk.master is None and not os.path.exists(bulk.dir)


def write_key(spec) -> str:
    """A fresh ed25519 key (not the host's), through ssh-keygen."""
    folder = tempfile.mkdtemp()
    path = os.path.join(folder, "k")
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", path], check=True)
    return path


def test_bulk_streams_stay_on_paramiko_when_asked(ssh_conn, tmp_path, monkeypatch):
    monkeypatch.setenv("CUBE_BULK", "paramiko")
    ssh_conn.reconnect()
    src = tmp_path / "src"
    data = os.urandom(10 * MiB)
    write(src / "f.bin", data)
    target = f"cubes/para-{tmp_path.name}"
    assert sync.push(ssh_conn, src, target).files_sent == 1
    assert ssh_conn.ssh._bulk is None
    got = ssh_conn.run(["sha256sum", f"{ssh_conn.root}/{target}/f.bin"]).stdout.split()[0]
    assert got == hashlib.sha256(data).hexdigest()


def test_bulk_agent_processes_run_under_the_sessions_python_without_site(ssh_conn):
    """The interpreter the session found (an absolute path, not a `python3` shim to resolve
    again), with -S: the agent imports only the standard library."""
    python = ssh_conn.agent_client.session().greeting["python"]
    argv = ssh_conn.agent_argv("receive", "cubes/x")
    assert os.path.isabs(python) and argv[:3] == [python, "-S", ssh_conn.agent_client.path]
    flags = ssh_conn.run([*argv[:2], "-c", "import sys; print(sys.flags.no_site, sys.prefix)"])
    assert flags.stdout.split()[0] == "1"


def watch_starts(monkeypatch, conn) -> list[str]:
    """The verb of every agent process the connection starts on a channel of its own."""
    started: list[str] = []

    def watching(real):
        def opening(command):
            words = shlex.split(command)
            started.append(words[words.index("--root") + 2])
            return real(command)
        return opening
    monkeypatch.setattr(conn.ssh, "open_stream", watching(conn.ssh.open_stream))
    monkeypatch.setattr(conn.standby, "_open", watching(conn.standby._open))
    return started


def test_a_warm_connection_keeps_a_stream_process_ready(ssh_conn, tmp_path, monkeypatch):
    """After its first bulk stream a connection keeps one `standby` agent waiting on the host:
    the next push and pull use it instead of starting a process, and each use starts the
    next one in the background."""
    started = watch_starts(monkeypatch, ssh_conn)
    src, target = tmp_path / "src", f"cubes/standby-{tmp_path.name}"
    write(src / "big.bin", os.urandom(12 * MiB))
    assert sync.push(ssh_conn, src, target).files_sent == 1
    ssh_conn.standby.wait()
    assert started == ["receive", "standby"]
    write(src / "big.bin", os.urandom(12 * MiB))
    assert sync.push(ssh_conn, src, target).files_sent == 1      # through the spare
    ssh_conn.standby.wait()
    back = tmp_path / "back"
    assert sync.pull(ssh_conn, target, back).files_sent == 1    # and the next one
    ssh_conn.standby.wait()
    assert started == ["receive", "standby", "standby", "standby"]
    assert tree(back) == tree(src)


def test_a_spare_that_died_is_passed_over(ssh_conn, tmp_path, monkeypatch):
    src, target = tmp_path / "src", f"cubes/standby-dead-{tmp_path.name}"
    write(src / "big.bin", os.urandom(12 * MiB))
    sync.push(ssh_conn, src, target)
    ssh_conn.standby.wait()
    spare = ssh_conn.standby._spare
    assert spare is not None
    spare.close_stdin()   # it leaves (a kill during the host's login could upset its shell rc)
    spare.proc.wait(30)
    started = watch_starts(monkeypatch, ssh_conn)
    write(src / "big.bin", os.urandom(12 * MiB))
    assert sync.push(ssh_conn, src, target).files_sent == 1
    assert started[0] == "receive"   # a fresh start, as without a spare
    assert remote_sha(ssh_conn, f"{ssh_conn.root}/{target}/big.bin") == \
        hashlib.sha256((src / "big.bin").read_bytes()).hexdigest()


def test_closing_the_connection_ends_its_spare_on_the_host(ssh_conn, tmp_path):
    src = tmp_path / "src"
    write(src / "big.bin", os.urandom(12 * MiB))
    sync.push(ssh_conn, src, f"cubes/standby-close-{tmp_path.name}")
    ssh_conn.standby.wait()
    mark = f"{ssh_conn.root} standby"
    assert standby_processes(mark)
    ssh_conn.close()
    deadline = time.monotonic() + 20
    while standby_processes(mark) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not standby_processes(mark)


def standby_processes(mark: str) -> list[str]:
    """Command lines of this machine's processes containing `mark` (lab hosts share it)."""
    out = subprocess.run(["ps", "-ww", "-eo", "args"], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if mark in line and "ps -ww" not in line]
