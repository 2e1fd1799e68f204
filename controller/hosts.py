"""Which machine a host name means: the inventory ($CUBE_HOME/hosts.yaml or --inventory FILE),
else ~/.ssh/config (HostName, User, Port, IdentityFile, ProxyJump), else the name itself.

Inventory format:

    hosts:
      gpu1: {hostname: 10.0.0.5, port: 22, user: me, identity_file: ~/.ssh/id_ed25519,
             root: ~/.cube, labels: [gpu], groups: [nightly], proxy_jump: bastion, slots: 2,
             lease_dir: /var/tmp/cube-leases}
    groups:                 # optional, as in Ansible: group -> member hosts
      lab: [gpu1]

A host's groups are its own `groups:` plus every top-level group that lists it.
"""

from __future__ import annotations

import fcntl
import getpass
import os
import tempfile
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from controller import paths, slurm
from controller.errors import ConfigError

DEFAULT_ROOT = "~/.cube"
FIELDS = ("hostname", "port", "user", "identity_file", "root", "labels", "groups", "proxy_jump",
          "slots", "lease_dir", *slurm.FIELDS)
TOP_LEVEL = ("hosts", "groups")


@dataclass
class HostSpec:
    name: str
    hostname: str
    port: int = 22
    user: str = field(default_factory=getpass.getuser)
    identity_files: list[str] = field(default_factory=list)
    root: str = DEFAULT_ROOT
    labels: list[str] = field(default_factory=list)
    groups: list[str] = field(default_factory=list)
    proxy_jump: str | None = None
    slots: int | None = None   # job slots when the host has no GPUs (None: the default)
    lease_dir: str | None = None  # the host-wide lease folder (None: the agent's default)
    slurm: slurm.SlurmSettings | None = None   # `scheduler: slurm`: a login node (controller.slurm)
    # The inventory this spec came from, so a ProxyJump name resolves against the same file.
    inventory: Path | None = field(default=None, repr=False, compare=False)

    @property
    def address(self) -> str:
        return f"{self.user}@{self.hostname}:{self.port}"


# ---- files ------------------------------------------------------------------------------------

def atomic_write(path: Path, text: str, mode: int = 0o644) -> None:
    """Write to a temp name in the same folder, then rename: readers see old or new, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def file_lock(path: Path):
    """Serialise read-modify-write of a shared file (the lab and a user may both edit it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{path}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


# ---- inventory --------------------------------------------------------------------------------

def load_inventory(path: Path | None = None) -> dict[str, HostSpec]:
    """Parse and validate an inventory file; a missing default file is an empty inventory."""
    path = Path(path) if path else paths.inventory_file()
    if not path.exists():
        return {}
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        raise ConfigError(path, f"is not valid YAML ({getattr(err, 'problem', err)}).",
                          "Fix the YAML syntax; see docs for the inventory format.",
                          line=mark.line + 1 if mark else None) from None
    return _parse_inventory(path, data)


def _parse_inventory(path: Path, data) -> dict[str, HostSpec]:
    if not isinstance(data, dict) or not isinstance(data.get("hosts") or {}, dict):
        raise ConfigError(path, "must be a mapping with a 'hosts' mapping of name -> settings.",
                          "Write it as 'hosts: {myhost: {hostname: ..., user: ...}}'.",
                          field="hosts")
    unknown = sorted(str(k) for k in set(data) - set(TOP_LEVEL))
    if unknown:
        raise ConfigError(path, f"has unknown top-level key(s) {', '.join(unknown)}.",
                          f"Allowed top-level keys: {', '.join(TOP_LEVEL)}.", field=unknown[0])
    specs = {str(name): _spec_from_entry(path, str(name), entry)
             for name, entry in (data.get("hosts") or {}).items()}
    for group, members in _top_level_groups(path, data.get("groups"), specs).items():
        for name in members:
            if group not in specs[name].groups:
                specs[name].groups.append(group)
    return specs


def _top_level_groups(path: Path, raw, specs: dict[str, HostSpec]) -> dict[str, list[str]]:
    """`groups: {lab: [gpu01, gpu02]}`; every member must be a host of this inventory."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(path, "'groups' must be a mapping of group name -> list of hosts.",
                          "Write it as 'groups: {lab: [gpu01, gpu02]}'.", field="groups")
    groups = {}
    for group, members in raw.items():
        where = f"groups.{group}"
        members = [] if members is None else members
        if not isinstance(members, list) or not all(isinstance(m, str) for m in members):
            raise ConfigError(path, f"group '{group}' must be a list of host names.",
                              f"Write it as '{group}: [gpu01, gpu02]'.", field=where)
        missing = [m for m in members if m not in specs]
        if missing:
            known = ", ".join(specs) or "none"
            raise ConfigError(path, f"group '{group}' lists unknown host(s) {', '.join(missing)}.",
                              f"Add them under 'hosts:' or remove them from the group "
                              f"(known hosts: {known}).", field=where)
        groups[str(group)] = members
    return groups


def _spec_from_entry(path: Path, name: str, entry) -> HostSpec:
    where = f"hosts.{name}"
    if entry is None:
        entry = {}
    if not isinstance(entry, dict):
        raise ConfigError(path, f"host '{name}' must be a mapping of settings.",
                          f"Allowed settings: {', '.join(FIELDS)}.", field=where)
    unknown = sorted(set(entry) - set(FIELDS))
    if unknown:
        raise ConfigError(path, f"host '{name}' has unknown setting(s) {', '.join(unknown)}.",
                          f"Allowed settings: {', '.join(FIELDS)}.", field=f"{where}.{unknown[0]}")

    def text(key, default=None):
        value = entry.get(key, default)
        if value is not None and not isinstance(value, str):
            raise ConfigError(path, f"'{key}' of host '{name}' must be a string, not {value!r}.",
                              f"Quote the value, e.g. {key}: \"...\".", field=f"{where}.{key}")
        return value

    def strings(key):
        value = entry.get(key) or []
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(path, f"'{key}' of host '{name}' must be a list of strings.",
                              f"Write it as {key}: [a, b].", field=f"{where}.{key}")
        return value

    port = entry.get("port", 22)
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        raise ConfigError(path, f"'port' of host '{name}' must be a number 1-65535, not {port!r}.",
                          "Use the SSH port of the host, usually 22.", field=f"{where}.port")
    slots = entry.get("slots")
    if slots is not None and (isinstance(slots, bool) or not isinstance(slots, int) or slots < 1):
        raise ConfigError(path, f"'slots' of host '{name}' must be a whole number >= 1, not "
                          f"{slots!r}.", "How many jobs may run on it at once, e.g. slots: 2.",
                          field=f"{where}.slots")
    cluster = slurm.parse_settings(path, name, entry)
    # A Slurm host keeps everything (agent, envs, cubes, jobs) where the compute nodes see it.
    root = (cluster.shared_root if cluster else None) or text("root") or DEFAULT_ROOT
    return HostSpec(
        name=name, hostname=text("hostname") or name, port=port,
        user=text("user") or getpass.getuser(),
        identity_files=[os.path.expanduser(p) for p in strings("identity_file")],
        root=root, labels=strings("labels"), groups=list(strings("groups")),
        proxy_jump=text("proxy_jump"), slots=slots, lease_dir=text("lease_dir"), slurm=cluster)


def update_inventory(set_entries: dict[str, dict], remove: Sequence[str] = (),
                     path: Path | None = None, *, join: dict[str, list[str]] | None = None) -> None:
    """Merge entries into the inventory (others kept), atomically and under a lock. Removed
    hosts also leave every top-level group (an emptied group goes); `join` adds hosts to
    top-level groups ({"lab": ["lab1"]})."""
    path = Path(path) if path else paths.inventory_file()
    with file_lock(path):
        load_inventory(path)  # a broken file is reported (ConfigError), never overwritten
        data = (yaml.safe_load(path.read_text()) if path.exists() else None) or {}
        hosts = data.setdefault("hosts", {}) or {}
        for name in remove:
            hosts.pop(name, None)
        hosts.update(set_entries)
        data["hosts"] = hosts
        groups = data.get("groups") or {}
        for group in list(groups):
            kept = [m for m in groups[group] or [] if m not in remove]
            if kept or not groups[group]:
                groups[group] = kept
            else:
                del groups[group]
        for group, members in (join or {}).items():
            current = groups.setdefault(group, [])
            current.extend(m for m in members if m not in current)
        if groups:
            data["groups"] = groups
        else:
            data.pop("groups", None)
        _parse_inventory(path, data)  # never write a file that would not load
        atomic_write(path, yaml.safe_dump(data, sort_keys=False))


# ---- resolution -------------------------------------------------------------------------------

def resolve_host(name: str, inventory: Path | None = None,
                 ssh_config: Path | None = None) -> HostSpec:
    """Inventory first, then ~/.ssh/config, then `[user@]host[:port]` taken literally."""
    if not name:
        raise ConfigError(inventory or paths.inventory_file(), "an empty host name was given.",
                          "Pass --host NAME with a name from the inventory or ~/.ssh/config.")
    hosts = load_inventory(inventory)
    if name in hosts:
        hosts[name].inventory = inventory
        return hosts[name]
    if inventory is not None and not Path(inventory).exists():
        raise ConfigError(inventory, "does not exist.", "Check the --inventory path.")
    user, _, rest = name.rpartition("@")
    host, _, port = rest.partition(":")
    spec = _from_ssh_config(host, ssh_config) or HostSpec(name=name, hostname=host)
    if user:
        spec.user = user
    if port:
        if not port.isdigit():
            raise ConfigError(inventory or paths.inventory_file(),
                              f"host '{name}' has a port that is not a number.",
                              "Write it as user@host:port, e.g. me@gpu1:2222.")
        spec.port = int(port)
    spec.name, spec.inventory = name, inventory
    return spec


def _from_ssh_config(name: str, ssh_config: Path | None) -> HostSpec | None:
    import paramiko  # noqa: PLC0415  (only names outside the inventory need it: keep it lazy)

    path = Path(ssh_config) if ssh_config else Path.home() / ".ssh" / "config"
    if not path.exists():
        return None
    cfg = paramiko.SSHConfig.from_path(str(path)).lookup(name)
    if not (set(cfg) & {"user", "port", "identityfile", "proxyjump"}) and \
            cfg.get("hostname", name) == name:
        return None  # nothing in ssh config for this name
    return HostSpec(
        name=name, hostname=cfg.get("hostname", name), port=int(cfg.get("port", 22)),
        user=cfg.get("user") or getpass.getuser(),
        identity_files=[os.path.expanduser(p) for p in cfg.get("identityfile", [])],
        proxy_jump=None if cfg.get("proxyjump", "none").lower() == "none" else cfg["proxyjump"])


def hosts_in_group(group: str, inventory: Path | None = None) -> list[HostSpec]:
    """Every inventory host whose `groups` contains `group` (for sweeps), in file order."""
    return [h for h in load_inventory(inventory).values() if group in h.groups]


def inventory_groups(inventory: Path | None = None) -> dict[str, list[str]]:
    """group -> member host names (both declaration styles), groups sorted, hosts in file order."""
    groups: dict[str, list[str]] = {}
    for spec in load_inventory(inventory).values():
        for group in spec.groups:
            groups.setdefault(group, []).append(spec.name)
    return dict(sorted(groups.items()))
