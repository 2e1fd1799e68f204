"""Host resolution: inventory, ~/.ssh/config, literal names; inventory validation errors."""

from __future__ import annotations

import getpass

import pytest

from controller import paths
from controller.errors import ConfigError
from controller.hosts import hosts_in_group, load_inventory, resolve_host, update_inventory


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_inventory_entry_is_resolved(cube_home):
    write(paths.inventory_file(), """
hosts:
  gpu1: {hostname: 10.1.2.3, port: 2222, user: ml, identity_file: ~/.ssh/k1,
         root: /data/cube, labels: [gpu], groups: [nightly], proxy_jump: bastion}
  plain: {}
""")
    spec = resolve_host("gpu1")
    assert (spec.hostname, spec.port, spec.user, spec.root) == \
        ("10.1.2.3", 2222, "ml", "/data/cube")
    assert spec.identity_files[0].endswith("/.ssh/k1")
    assert not spec.identity_files[0].startswith("~")
    assert (spec.labels, spec.groups, spec.proxy_jump) == (["gpu"], ["nightly"], "bastion")
    plain = resolve_host("plain")
    assert (plain.hostname, plain.port, plain.user, plain.root) == ("plain", 22, getpass.getuser(),
                                                                    "~/.cube")


def test_explicit_inventory_file_wins(tmp_path):
    inv = write(tmp_path / "inv.yaml", "hosts:\n  a: {hostname: h.example, port: 2200}\n")
    assert resolve_host("a", inventory=inv).port == 2200
    with pytest.raises(ConfigError, match="does not exist"):
        resolve_host("a", inventory=tmp_path / "missing.yaml")


@pytest.mark.parametrize("text, field", [
    ("hosts:\n  a: {hostname: x, colour: red}\n", "hosts.a.colour"),
    ("hosts:\n  a: {port: ssh}\n", "hosts.a.port"),
    ("hosts:\n  a: {port: 70000}\n", "hosts.a.port"),
    ("hosts:\n  a: {labels: {x: 1}}\n", "hosts.a.labels"),
    ("hosts:\n  a: {hostname: [1]}\n", "hosts.a.hostname"),
    ("hosts: [a, b]\n", "hosts"),
    ("hosts:\n  a: 5\n", "hosts.a"),
])
def test_bad_inventory_names_file_and_field(tmp_path, text, field):
    inv = write(tmp_path / "inv.yaml", text)
    with pytest.raises(ConfigError) as err:
        load_inventory(inv)
    assert str(inv) in str(err.value) and f"field '{field}'" in str(err.value)
    assert err.value.hint


def test_invalid_yaml_reports_line(tmp_path):
    inv = write(tmp_path / "inv.yaml", "hosts:\n  a: {hostname: x\n  b: [\n")
    with pytest.raises(ConfigError) as err:
        load_inventory(inv)
    assert err.value.line is not None and "not valid YAML" in str(err.value)


def test_ssh_config_is_honoured(tmp_path):
    cfg = write(tmp_path / "ssh_config", """
Host bastion
    HostName 192.0.2.10
    User jump
Host gpu-*
    HostName %h.lab.example
    User trainer
    Port 2022
    IdentityFile ~/.ssh/id_gpu
    ProxyJump bastion
""")
    spec = resolve_host("gpu-7", ssh_config=cfg)
    assert (spec.hostname, spec.user, spec.port) == ("gpu-7.lab.example", "trainer", 2022)
    assert spec.identity_files[0].endswith("/.ssh/id_gpu") and spec.proxy_jump == "bastion"
    assert resolve_host("bastion", ssh_config=cfg).user == "jump"


def test_ssh_config_found_in_home(tmp_path, monkeypatch):
    write(tmp_path / ".ssh" / "config", "Host box\n  HostName 198.51.100.4\n  Port 2200\n")
    monkeypatch.setenv("HOME", str(tmp_path))
    spec = resolve_host("box")
    assert (spec.hostname, spec.port) == ("198.51.100.4", 2200)


def test_unknown_name_is_taken_literally(tmp_path):
    spec = resolve_host("me@some.host:2201", ssh_config=tmp_path / "none")
    assert (spec.hostname, spec.user, spec.port) == ("some.host", "me", 2201)
    with pytest.raises(ConfigError, match="port"):
        resolve_host("some.host:ssh", ssh_config=tmp_path / "none")


def test_update_inventory_merges_and_groups(cube_home):
    write(paths.inventory_file(), "hosts:\n  mine: {hostname: m, groups: [nightly]}\n")
    update_inventory({"x1": {"hostname": "a", "groups": ["nightly"]}, "x2": {"hostname": "b"}})
    update_inventory({}, remove=["x2"])
    assert set(load_inventory()) == {"mine", "x1"}
    assert [h.name for h in hosts_in_group("nightly")] == ["mine", "x1"]
    assert hosts_in_group("nope") == []


def test_update_inventory_refuses_to_overwrite_a_broken_file(cube_home):
    inv = write(paths.inventory_file(), "hosts:\n  a: {hostname: x\n")
    with pytest.raises(ConfigError):
        update_inventory({"lab1": {"hostname": "y"}})
    assert inv.read_text() == "hosts:\n  a: {hostname: x\n"
