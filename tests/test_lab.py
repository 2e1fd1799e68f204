"""`cube lab`: real sshd hosts come up, are usable by OpenSSH and cube, and go away cleanly."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from controller import lab, paths
from controller.errors import CubeError
from controller.selectors import select_hosts
from controller.transport import connect
from tests.conftest import require
from tests.fixtures.lab import sshd_available

pytestmark = pytest.mark.integration


@pytest.fixture
def own_lab(cube_home):
    """A lab in the test's own CUBE_HOME (not the shared session lab), always torn down."""
    require(sshd_available(), "OpenSSH server (/usr/sbin/sshd) is not installed")
    yield cube_home
    lab.lab_down()


def cube(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", "from controller.cli import main; main()", *args],
                          capture_output=True, text=True, env=os.environ.copy(), timeout=120)


def netns_names() -> str:
    return subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout


def test_cli_up_status_down(own_lab):
    paths.inventory_file().write_text("hosts:\n  mine: {hostname: example.org}\n")
    paths.known_hosts_file().write_text("example.org ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIA\n")
    up = cube("lab", "up", "--hosts", "2")
    assert up.returncode == 0, up.stderr
    assert "lab1" in up.stdout and "lab2" in up.stdout and "--host lab1" in up.stdout
    inv = yaml.safe_load(paths.inventory_file().read_text())["hosts"]
    assert set(inv) == {"mine", "lab1", "lab2"}
    assert inv["lab1"]["labels"] == ["lab"] and inv["lab2"]["groups"] == ["lab"]
    hosts = {h.name: h for h in lab.lab_status()}
    assert all(h.up for h in hosts.values()) and hosts["lab1"].root != hosts["lab2"].root

    # OpenSSH itself accepts the inventory's key and the known_hosts lines (strict checking).
    h1 = inv["lab1"]
    ssh = subprocess.run(["ssh", "-i", h1["identity_file"], "-p", str(h1["port"]),
                          "-o", f"UserKnownHostsFile={paths.known_hosts_file()}",
                          "-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes",
                          f"{h1['user']}@{h1['hostname']}", "echo", "from-lab"],
                         capture_output=True, text=True, timeout=60)
    assert ssh.stdout.strip() == "from-lab", ssh.stderr

    status = cube("lab", "status")
    assert status.returncode == 0 and status.stdout.count("\tup") == 2, status.stdout
    again = cube("lab", "up", "--hosts", "2")  # idempotent: running hosts are kept
    assert again.returncode == 0
    assert {h.name: h.pid for h in lab.lab_status()} == {n: h.pid for n, h in hosts.items()}

    # A detached process on a host (like a launched job) must not outlive the lab.
    with connect("lab2") as conn:
        pid = int(conn.run(["sh", "-c", "setsid sleep 600 >/dev/null 2>&1 < /dev/null & echo $!"]
                           ).stdout)
    assert lab._pid_alive(pid)

    down = cube("lab", "down")
    assert down.returncode == 0 and "lab1" in down.stdout
    assert all(not lab._pid_alive(h.pid) for h in hosts.values())
    assert set(yaml.safe_load(paths.inventory_file().read_text())["hosts"]) == {"mine"}
    assert paths.known_hosts_file().read_text().splitlines() == \
        ["example.org ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIA"]
    if hosts["lab1"].netns:
        assert hosts["lab1"].netns not in netns_names()
        assert not lab._pid_alive(pid)
    else:
        os.kill(pid, signal.SIGKILL)
    assert "No lab hosts" in cube("lab", "status").stdout


def test_local_mode_on_loopback(own_lab, monkeypatch):
    monkeypatch.setenv("CUBE_LAB_NETNS", "0")
    (host,) = lab.lab_up(1)
    assert (host.mode, host.address, host.netns) == ("local", "127.0.0.1", None)
    with connect("lab1") as conn:
        assert conn.run(["echo", "hi"]).stdout == "hi\n"
    with pytest.raises(CubeError, match="no link to cut"):
        lab.cut_link("lab1")


def test_crashed_host_is_restarted_and_sessions_can_be_killed(own_lab):
    (host,) = lab.lab_up(1)
    with connect("lab1") as conn:
        assert lab.kill_ssh_sessions("lab1") == 1
        assert not conn.is_alive(probe_timeout=5)
    (still,) = lab.lab_status()
    assert still.up and still.pid == host.pid  # the listener survived
    os.kill(host.pid, signal.SIGKILL)
    os.waitpid(host.pid, 0)  # sshd was started by this process: reap it
    assert not lab.lab_status()[0].up
    (again,) = lab.lab_up(1)
    assert again.up and again.pid != host.pid
    with connect("lab1") as conn:
        assert conn.run(["true"]).code == 0


def test_bad_host_count_and_unknown_host():
    with pytest.raises(CubeError, match="at least 1"):
        lab.lab_up(0)
    with pytest.raises(CubeError, match="at most 64"):
        lab.lab_up(65)
    with pytest.raises(CubeError, match="--slots must be at least 1"):
        lab.lab_up(1, slots=0)
    with pytest.raises(CubeError, match="no lab host named 'lab9'"):
        lab.kill_ssh_sessions("lab9")


def test_fleet_size_slots_group_and_selectors(own_lab):
    paths.inventory_file().write_text("hosts:\n  mine: {hostname: example.org}\n"
                                      "groups:\n  lab: [mine]\n")
    up = cube("lab", "up", "--hosts", "3", "--slots", "2")
    assert up.returncode == 0, up.stderr
    data = yaml.safe_load(paths.inventory_file().read_text())
    assert [data["hosts"][n]["slots"] for n in ("lab1", "lab2", "lab3")] == [2, 2, 2]
    assert data["groups"]["lab"] == ["mine", "lab1", "lab2", "lab3"]  # the user's member kept
    assert [s.name for s in select_hosts("@lab", ["lab"])] == ["lab1", "lab2", "lab3"]
    lab.lab_up(4)  # more hosts later: the running ones keep their slots, the new one has none
    data = yaml.safe_load(paths.inventory_file().read_text())
    assert data["hosts"]["lab2"]["slots"] == 2 and "slots" not in data["hosts"]["lab4"]

    status = cube("lab", "status", "lab1,lab3")
    assert status.returncode == 0 and [line.split("\t")[0] for line in
                                       status.stdout.splitlines()] == ["lab1", "lab3"]
    assert cube("lab", "status", "@lab").stdout.count("\tup") == 4
    bad = cube("lab", "down", "lab9")
    assert bad.returncode == 2 and "No lab host matched 'lab9'" in bad.stderr

    pids = {h.name: h.pid for h in lab.lab_status()}
    down = cube("lab", "down", "lab2,lab4")
    assert down.returncode == 0 and "lab2, lab4" in down.stdout, down.stderr
    assert [h.name for h in lab.lab_status()] == ["lab1", "lab3"]
    assert not lab._pid_alive(pids["lab2"]) and lab._pid_alive(pids["lab1"])
    data = yaml.safe_load(paths.inventory_file().read_text())
    assert set(data["hosts"]) == {"mine", "lab1", "lab3"}
    assert data["groups"]["lab"] == ["mine", "lab1", "lab3"]
    assert cube("lab", "down", "@lab").returncode == 0
    assert lab.lab_status() == []
    assert yaml.safe_load(paths.inventory_file().read_text())["groups"] == {"lab": ["mine"]}


def test_sixteen_hosts_start_side_by_side_and_all_go(own_lab):
    start = time.monotonic()
    hosts = lab.lab_up(16)
    took = time.monotonic() - start
    assert [h.name for h in hosts] == [f"lab{i}" for i in range(1, 17)] and all(h.up for h in hosts)
    assert took < 20, f"16 lab hosts took {took:.1f} s"
    assert len({(h.address, h.port) for h in hosts}) == 16
    assert [s.name for s in select_hosts("@lab", [])] == [h.name for h in hosts]
    assert sorted(lab.lab_down(), key=lambda n: int(n[3:])) == [h.name for h in hosts]
    assert all(not lab._pid_alive(h.pid) for h in hosts)
    if hosts[0].netns:
        names = netns_names()
        assert not any(h.netns in names for h in hosts)
        links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
        assert not any(f"{h.veth}@" in links for h in hosts)
    assert "lab" not in (yaml.safe_load(paths.inventory_file().read_text()) or {}).get("groups", {})
