"""`cube lab`: real local SSH hosts for tests and the README's first command.

Each lab host is Debian's OpenSSH `sshd -D` with its own host key, config, log and cube root
under $CUBE_HOME/lab/hosts/labN/. As root, each host gets its own network namespace joined to the
root namespace by a veth pair (10.203.X.1 here, 10.203.X.2 in the namespace, sshd on :22), so a
test can cut its link. Otherwise the hosts are sshd processes on 127.0.0.1 with free ports.
Names that are global on the machine (netns, veth) carry a hash of CUBE_HOME so parallel test
runs and the developer's own lab don't clash; subnets are allocated among the free ones.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

from controller import lab_slurm, paths
from controller.errors import CubeError
from controller.hosts import (
    atomic_write,
    file_lock,
    inventory_groups,
    load_inventory,
    update_inventory,
)
from controller.selectors import parse_selector

SSHD = "/usr/sbin/sshd"
GLOBAL_LOCK = Path("/run/cube-lab.lock")  # subnet allocation across all labs on this machine
KNOWN_HOSTS_TAG = "cube-lab"
GROUP = "lab"        # every lab host is in this inventory group (`--host @lab`)
MAX_HOSTS = 64       # a typo guard; each host costs an sshd and a 10.203.X.0/24 subnet


@dataclass
class LabHost:
    name: str
    mode: str            # "netns" or "local"
    address: str         # where sshd listens
    port: int
    pid: int | None
    root: str            # the host's cube root
    netns: str | None = None
    veth: str | None = None   # root-namespace end of the veth pair
    up: bool = False

    @property
    def dir(self) -> Path:
        """$CUBE_HOME/lab/hosts/NAME (the root lives inside it), whatever CUBE_HOME is now."""
        return Path(self.root).parent


# ---- paths and names ------------------------------------------------------------------------

def lab_tag() -> str:
    return hashlib.sha256(str(paths.cube_home().resolve()).encode()).hexdigest()[:6]


def lease_dir(name: str) -> str:
    """A lab host's own lease folder: lab hosts share this machine, so the default
    /var/tmp/cube-leases would make them one host. Outside CUBE_HOME (a test's temp folder is
    0700) so that a second account on the host reaches it too."""
    return f"/var/tmp/cube-lab-{lab_tag()}/{name}"


def host_dir(name: str) -> Path:
    return paths.lab_dir() / "hosts" / name


def user_key() -> Path:
    return paths.lab_dir() / "id_ed25519"


def _state_file(name: str) -> Path:
    return host_dir(name) / "host.json"


def use_netns() -> bool:
    """Namespaces need root and `ip`; CUBE_LAB_NETNS=0 forces plain 127.0.0.1 hosts."""
    forced = os.environ.get("CUBE_LAB_NETNS")
    if forced is not None:
        return forced not in ("0", "", "no", "false")
    return os.geteuid() == 0 and shutil.which("ip") is not None


def _sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(argv, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise CubeError(f"Lab command failed ({' '.join(argv)}): {proc.stderr.strip()}",
                        "Run `cube lab down` and try again; see the sshd logs under "
                        f"{paths.lab_dir()}.")
    return proc


# ---- state ------------------------------------------------------------------------------------

def _load(name: str) -> LabHost | None:
    try:
        data = json.loads(_state_file(name).read_text())
    except (OSError, ValueError):
        return None
    data.pop("up", None)
    return LabHost(**data)


def _save(host: LabHost) -> None:
    data = asdict(host)
    data.pop("up")
    atomic_write(_state_file(host.name), json.dumps(data, indent=1))


def _names() -> list[str]:
    hosts = paths.lab_dir() / "hosts"
    found = [p.name for p in hosts.glob("lab*") if (p / "host.json").exists()] \
        if hosts.exists() else []
    return sorted(found, key=lambda n: int(n[3:]) if n[3:].isdigit() else 0)


def _pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    try:  # a zombie child of ours (pytest runs the lab in-process) is not alive
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def _reachable(address: str, port: int, timeout: float = 1.0) -> bool:
    try:
        with socket.create_connection((address, port), timeout=timeout):
            return True
    except OSError:
        return False


# ---- up ---------------------------------------------------------------------------------------

def _ensure_user_key() -> Path:
    key = user_key()
    if not key.exists():
        key.parent.mkdir(parents=True, exist_ok=True)
        _sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "cube-lab", "-f", str(key))
    auth = paths.lab_dir() / "authorized_keys"
    atomic_write(auth, key.with_suffix(".pub").read_text(), 0o600)
    return key


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _used_subnets() -> set[int]:
    out = _sh("ip", "-o", "-4", "addr", "show").stdout
    return {int(m) for m in re.findall(r"inet 10\.203\.(\d+)\.", out)}


def _setup_netns(name: str, index: int) -> tuple[str, str, str]:
    """Create netns + veth with a free 10.203.X.0/24; returns (netns, veth, inner address)."""
    tag = lab_tag()
    netns, veth, peer = f"cube-{tag}-{name}", f"cv{tag}{index}", f"cp{tag}{index}"
    with file_lock(GLOBAL_LOCK):
        _teardown_netns(netns, veth)  # leftovers of a crashed run
        used = _used_subnets()
        x = next((i for i in range(1, 255) if i not in used), None)
        if x is None:
            raise CubeError("No free 10.203.X.0/24 subnet is left for a lab host.",
                            "Stop other labs with `cube lab down`.")
        inner = f"10.203.{x}.2"
        for argv in (
            ("ip", "netns", "add", netns),
            ("ip", "link", "add", veth, "type", "veth", "peer", "name", peer),
            ("ip", "link", "set", peer, "netns", netns),
            ("ip", "addr", "add", f"10.203.{x}.1/24", "dev", veth),
            ("ip", "link", "set", veth, "up"),
            ("ip", "-n", netns, "addr", "add", f"{inner}/24", "dev", peer),
            ("ip", "-n", netns, "link", "set", peer, "up"),
            ("ip", "-n", netns, "link", "set", "lo", "up"),
            # Lab hosts reach each other through the root namespace (ProxyJump lab2 via lab1).
            ("ip", "-n", netns, "route", "add", "default", "via", f"10.203.{x}.1"),
        ):
            _sh(*argv)
    return netns, veth, inner


def _forwarding_rules() -> list[list[str]]:
    """Lab hosts reach each other (ProxyJump lab2 via lab1) and, through NAT, whatever this
    machine reaches (a package index for pip, like a lab's real GPU boxes). Docker's FORWARD
    policy is DROP, so the veths need rules of their own."""
    veths, tag = f"cv{lab_tag()}+", f"cube-lab-{lab_tag()}"
    return [
        ["filter", "FORWARD", "-i", veths, "-j", "ACCEPT"],
        ["filter", "FORWARD", "-o", veths, "-m", "conntrack", "--ctstate",
         "RELATED,ESTABLISHED", "-j", "ACCEPT"],
        ["nat", "POSTROUTING", "-s", "10.203.0.0/16", "!", "-d", "10.203.0.0/16",
         "-m", "comment", "--comment", tag, "-j", "MASQUERADE"],
    ]


def _allow_forwarding() -> None:
    try:
        Path("/proc/sys/net/ipv4/ip_forward").write_text("1")
    except OSError:
        pass
    try:
        for table, chain, *rule in _forwarding_rules():
            if _sh("iptables", "-t", table, "-C", chain, *rule, check=False).returncode != 0:
                _sh("iptables", "-t", table, "-I", chain, *rule, check=False)
    except FileNotFoundError:
        pass


def _remove_forwarding() -> None:
    for table, chain, *rule in _forwarding_rules():
        _sh("iptables", "-t", table, "-D", chain, *rule, check=False)


def _sshd_config(name: str, address: str, port: int) -> Path:
    d = host_dir(name)
    lab = paths.lab_dir()
    text = f"""# cube lab host {name}; generated by `cube lab up`
ListenAddress {address}
Port {port}
HostKey {d / 'ssh_host_ed25519_key'}
PidFile {d / 'sshd.pid'}
AuthorizedKeysFile {lab / 'authorized_keys'} .ssh/authorized_keys
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
AllowTcpForwarding yes
ClientAliveInterval 5
ClientAliveCountMax 3
MaxStartups 100
MaxSessions 100
Subsystem sftp internal-sftp
LogLevel INFO
""" + lab_slurm.sshd_lines(d)
    cfg = d / "sshd_config"
    atomic_write(cfg, text)
    return cfg


def _start_host(index: int, netns_mode: bool) -> LabHost:
    name = f"lab{index}"
    d = host_dir(name)
    (d / "root").mkdir(parents=True, exist_ok=True)
    key = d / "ssh_host_ed25519_key"
    if not key.exists():
        _sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"cube-{name}", "-f", str(key))
    try:
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege separation dir
    except PermissionError:
        pass  # not root: sshd runs unprivileged and does no privilege separation
    netns: str | None = None
    veth: str | None = None
    if netns_mode:
        netns, veth, address = _setup_netns(name, index)
        # nsenter, not `ip netns exec`: that also remounts /sys, hiding /sys/fs/cgroup from
        # the host's sessions, where podman (which runs its containers itself) needs it.
        port, prefix = 22, ["nsenter", f"--net=/run/netns/{netns}"]
    else:
        address, port, prefix = "127.0.0.1", _free_port(), []
    cfg = _sshd_config(name, address, port)
    (d / "sshd.pid").unlink(missing_ok=True)
    with open(d / "sshd.log", "ab") as log:
        # nsenter execs sshd, so this pid is sshd's listener pid.
        proc = subprocess.Popen([*prefix, SSHD, "-D", "-e", "-f", str(cfg)],
                                stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                start_new_session=True)
    host = LabHost(name=name, mode="netns" if netns_mode else "local", address=address,
                   port=port, pid=proc.pid, root=str(d / "root"), netns=netns, veth=veth)
    _save(host)
    _wait_listening(host, proc)
    host.up = True
    return host


def _wait_listening(host: LabHost, proc: subprocess.Popen, budget: float = 10.0) -> None:
    deadline = time.monotonic() + budget
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        if _reachable(host.address, host.port, 0.5):
            return
        time.sleep(0.05)
    log = (host.dir / "sshd.log").read_text(errors="replace").strip().splitlines()[-5:]
    raise CubeError(f"Lab host {host.name}: sshd did not start listening on "
                    f"{host.address}:{host.port}. Last log lines: {' | '.join(log)}",
                    f"Check {host.dir / 'sshd_config'} and that {SSHD} is installed "
                    "(apt-get install openssh-server).")


def _host_key_line(host: LabHost) -> str:
    kind, key = (host.dir / "ssh_host_ed25519_key.pub").read_text().split()[:2]
    where = host.address if host.port == 22 else f"[{host.address}]:{host.port}"
    return f"{where} {kind} {key} {KNOWN_HOSTS_TAG}:{lab_tag()}:{host.name}"


def _write_known_hosts(hosts: list[LabHost], remove: Sequence[str] = ()) -> None:
    """Replace this lab's lines (and any line for a lab address) in $CUBE_HOME/known_hosts."""
    path = paths.known_hosts_file()
    with file_lock(path):
        lines = path.read_text().splitlines() if path.exists() else []
        ours = {f"{KNOWN_HOSTS_TAG}:{lab_tag()}:{n}" for n in [*remove, *(h.name for h in hosts)]}
        fresh = [_host_key_line(h) for h in hosts]
        addresses = {line.split()[0] for line in fresh}
        kept = [line for line in lines if not (line.split()[-1:] and line.split()[-1] in ours)
                and not (line.split()[:1] and line.split()[0] in addresses)]
        atomic_write(path, "\n".join(kept + fresh) + "\n", 0o600)


def _inventory_entry(host: LabHost, slots: int | None) -> dict:
    entry = {"hostname": host.address, "port": host.port, "user": getpass.getuser(),
             "identity_file": str(user_key()), "root": host.root,
             "labels": [GROUP], "groups": [GROUP], "lease_dir": lease_dir(host.name)}
    if slots is not None:
        entry["slots"] = slots
    if lab_slurm.configured(host.dir):
        entry["scheduler"] = "slurm"
    return entry


def _ensure_up(index: int, netns_mode: bool) -> LabHost:
    current = _status_of(f"lab{index}")
    if current and current.up:
        return current
    if current:  # crashed or cut off: clear what is left (process, namespace) first
        _stop(current)
    return _start_host(index, netns_mode)


def lab_up(n: int = 1, netns: bool | None = None, slots: int | None = None,
           slurm: bool = False, slurm_cpus: int | None = None) -> list[LabHost]:
    """Start lab1..labN (running ones are kept) side by side, write inventory entries (group
    `lab`; `slots: N` when given, else each host keeps the slots it had) and known_hosts.
    `slurm`: lab1 is also a one-node Slurm cluster (controller.lab_slurm)."""
    if not 1 <= n <= MAX_HOSTS:
        raise CubeError(f"--hosts must be at least 1 and at most {MAX_HOSTS}, not {n}.",
                        "Use e.g. `cube lab up --hosts 2`.")
    if slots is not None and slots < 1:
        raise CubeError(f"--slots must be at least 1, not {slots}.",
                        "Use e.g. `cube lab up --hosts 3 --slots 1`.")
    if not Path(SSHD).exists():
        raise CubeError(f"{SSHD} is not installed, so no lab host can start.",
                        "Install it: apt-get install openssh-server.")
    netns_mode = use_netns() if netns is None else netns
    if slurm:  # before sshd starts: it hands SLURM_CONF to its sessions once the config exists
        lab_slurm.setup(host_dir("lab1"), "lab1", slurm_cpus, netns_mode)
        current = _status_of("lab1")
        if current and current.up and not lab_slurm.sshd_ready(host_dir("lab1")):
            _stop(current)
    _ensure_user_key()
    # sshd start-up is mostly waiting (key generation, the listener coming up): start them all
    # at once; namespace setup still takes the global lock one host at a time.
    with ThreadPoolExecutor(max_workers=min(n, 16)) as pool:
        futures = [pool.submit(_ensure_up, i, netns_mode) for i in range(1, n + 1)]
    for future in futures:
        error = future.exception()
        if error is not None:
            raise error  # the started hosts are recorded: `cube lab down` clears them
    hosts = [f.result() for f in futures]
    if any(h.mode == "netns" for h in hosts):
        _allow_forwarding()
    _write_known_hosts(hosts)
    for h in hosts:
        lab_slurm.start_if_configured(h.dir, h.name, h.netns)
    known = load_inventory()
    update_inventory({h.name: _inventory_entry(h, slots if slots is not None else
                                               getattr(known.get(h.name), "slots", None))
                      for h in hosts}, join={GROUP: [h.name for h in hosts]})
    return hosts


# ---- down / status / faults -------------------------------------------------------------------

def _status_of(name: str) -> LabHost | None:
    host = _load(name)
    if host:
        host.up = _pid_alive(host.pid) and _reachable(host.address, host.port)
    return host


def select_lab(selector: str | None) -> list[str]:
    """Lab host names a selector means (names, comma list, @group); None: every lab host."""
    names = _names()
    parts = parse_selector(selector)
    if not parts:
        return names
    groups = inventory_groups() if any(p.startswith("@") for p in parts) else {}
    chosen: list[str] = []
    for part in parts:
        members = [m for m in groups.get(part[1:], []) if m in names] if part.startswith("@") \
            else [part] if part in names else []
        if not members:
            raise CubeError(f"No lab host matched '{part}'.",
                            f"Lab hosts: {', '.join(names) or 'none'}; groups are @{GROUP} and "
                            "those of the inventory.")
        chosen.extend(m for m in members if m not in chosen)
    return chosen


def lab_status(selector: str | None = None) -> list[LabHost]:
    return [h for h in (_status_of(n) for n in select_lab(selector)) if h]


def _teardown_netns(netns: str, veth: str) -> None:
    _sh("ip", "link", "del", veth, check=False)  # deletes the peer too
    _sh("ip", "netns", "del", netns, check=False)


def _stop(host: LabHost) -> None:
    if host.pid and _pid_alive(host.pid):
        for pid in _children(host.pid):
            _kill(pid, signal.SIGKILL)
        _kill(host.pid, signal.SIGTERM)
        deadline = time.monotonic() + 5
        while _pid_alive(host.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        _kill(host.pid, signal.SIGKILL)
    if host.pid:
        try:  # reap it when it is our child (tests run the lab in-process)
            os.waitpid(host.pid, os.WNOHANG)
        except (ChildProcessError, OSError):
            pass
    if host.netns and host.veth:
        # Jobs started on the host detach from sshd; everything in the namespace goes too.
        pids = _sh("ip", "netns", "pids", host.netns, check=False).stdout.split()
        for pid in pids:
            _kill(int(pid), signal.SIGKILL)
        _teardown_netns(host.netns, host.veth)


def _kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except OSError:
        pass


def _stop_and_forget(host: LabHost) -> None:
    _stop(host)
    _state_file(host.name).unlink(missing_ok=True)
    shutil.rmtree(lease_dir(host.name), ignore_errors=True)
    try:
        os.rmdir(os.path.dirname(lease_dir(host.name)))  # the lab's folder, once empty
    except OSError:
        pass


def lab_down(selector: str | None = None) -> list[str]:
    """Stop the selected lab hosts of this CUBE_HOME (default: all), side by side, and remove
    their inventory/known_hosts entries."""
    hosts = [h for h in (_load(n) for n in select_lab(selector)) if h]
    if hosts:
        with ThreadPoolExecutor(max_workers=min(len(hosts), 16)) as pool:
            for future in [pool.submit(_stop_and_forget, h) for h in hosts]:
                future.result()
    names = [h.name for h in hosts]
    if any(h.mode == "netns" for h in hosts) and not _names():  # the last netns host is gone
        try:
            _remove_forwarding()
        except FileNotFoundError:  # no iptables: nothing was added
            pass
    if names:
        _write_known_hosts([], remove=names)
        update_inventory({}, remove=names)
    return names


def _require(name: str) -> LabHost:
    host = _load(name)
    if host is None:
        raise CubeError(f"There is no lab host named '{name}'.", "Start it with `cube lab up`.")
    return host


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def kill_ssh_sessions(name: str) -> int:
    """Kill sshd's per-connection children (not the listener): every SSH session drops."""
    host = _require(name)
    kids = _children(host.pid) if host.pid else []
    for pid in kids:
        _kill(pid, signal.SIGKILL)
    return len(kids)


def _peer(host: LabHost) -> str:
    return "cp" + (host.veth or "")[2:]  # the namespace's end of the pair (see _setup_netns)


def cut_link(name: str) -> None:
    """Pull the host's cable: its end of the veth goes down, so packets to it are silently
    dropped (no RST, no ICMP). Downing our end instead would remove the route to 10.203.X.0/24
    and send the packets out of the default route, where a gateway may answer them."""
    host = _require(name)
    if not (host.veth and host.netns):
        raise CubeError(f"Lab host '{name}' has no link to cut (it runs on 127.0.0.1).",
                        "Run the lab as root so each host gets its own network namespace.")
    _sh("ip", "-n", host.netns, "link", "set", _peer(host), "down")


def restore_link(name: str) -> None:
    host = _require(name)
    if host.veth and host.netns:
        _sh("ip", "-n", host.netns, "link", "set", _peer(host), "up")
        # The namespace's default route went away with its link.
        gateway = host.address.rsplit(".", 1)[0] + ".1"
        _sh("ip", "-n", host.netns, "route", "replace", "default", "via", gateway)
