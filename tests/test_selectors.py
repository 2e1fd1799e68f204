"""Selectors: names, comma lists, @groups from both declaration styles, labels, empty selections;
the inventory's top-level groups and slots and their errors."""

from __future__ import annotations

import pytest
import yaml

from controller import paths
from controller.errors import ConfigError, CubeError
from controller.hosts import inventory_groups, load_inventory, update_inventory
from controller.selectors import parse_selector, select_hosts

INVENTORY = """
hosts:
  gpu01: {hostname: 10.0.0.1, labels: [gpu, a100], groups: [nightly], slots: 2}
  gpu02: {hostname: 10.0.0.2, labels: [gpu, a100]}
  gpu03: {hostname: 10.0.0.3, labels: [gpu, h100], groups: [lab]}
  cpu01: {hostname: 10.0.0.9}
groups:
  lab: [gpu01, gpu02]
  nightly: [cpu01]
  empty: []
"""


@pytest.fixture
def inventory(cube_home):
    paths.inventory_file().write_text(INVENTORY)
    return paths.inventory_file()


def names(specs) -> list[str]:
    return [s.name for s in specs]


def test_parse_selector():
    assert parse_selector(" a, @lab ,,b ") == ["a", "@lab", "b"]
    assert parse_selector(None) == [] and parse_selector("") == []


def test_name_list_and_groups(inventory):
    assert names(select_hosts("gpu02", [])) == ["gpu02"]
    assert names(select_hosts("gpu03,gpu01,gpu03", [])) == ["gpu03", "gpu01"]
    # @lab: gpu01/gpu02 from the top-level group, gpu03 from its own groups list; file order
    assert names(select_hosts("@lab", [])) == ["gpu01", "gpu02", "gpu03"]
    assert names(select_hosts("@nightly", [])) == ["gpu01", "cpu01"]
    assert names(select_hosts("cpu01,@lab", [])) == ["cpu01", "gpu01", "gpu02", "gpu03"]
    assert names(select_hosts(None, [])) == ["gpu01", "gpu02", "gpu03", "cpu01"]
    spec = select_hosts("gpu01", [])[0]
    assert spec.slots == 2 and spec.groups == ["nightly", "lab"]


def test_labels_all_must_match(inventory):
    assert names(select_hosts("@lab", ["a100"])) == ["gpu01", "gpu02"]
    assert names(select_hosts(None, ["gpu", "h100"])) == ["gpu03"]
    assert names(select_hosts(None, ["gpu"])) == ["gpu01", "gpu02", "gpu03"]


def test_explicit_inventory_and_names_outside_it(tmp_path, cube_home):
    inv = tmp_path / "inv.yaml"
    inv.write_text(INVENTORY)
    assert names(select_hosts("@lab", ["h100"], inv)) == ["gpu03"]
    assert select_hosts("@lab", [], inv)[0].inventory == inv
    # A name the inventory does not know resolves as a single --host does today.
    (other,) = select_hosts("me@box.example:2201", [], inv)
    assert (other.hostname, other.user, other.port) == ("box.example", "me", 2201)


@pytest.mark.parametrize("selector, labels, what", [
    ("@gpu", [], "the host selector '@gpu'"),
    ("@empty", [], "the host selector '@empty'"),
    ("@lab", ["v100"], "with label(s) v100"),
    (None, ["tpu"], "the inventory with label(s) tpu"),
])
def test_empty_selection_is_a_clear_error(inventory, selector, labels, what):
    with pytest.raises(CubeError) as err:
        select_hosts(selector, labels)
    assert err.value.exit_code == 2 and what in err.value.message
    assert "@lab (3)" in err.value.hint and "@nightly (2)" in err.value.hint
    assert "gpu01, gpu02, gpu03, cpu01" in err.value.hint and "a100" in err.value.hint


def test_empty_inventory_and_blank_selector(cube_home):
    with pytest.raises(CubeError, match="No host matched the inventory") as err:
        select_hosts(None, [])
    assert "groups none; hosts none" in err.value.hint
    with pytest.raises(CubeError, match="names no host"):
        select_hosts(" , ", [])


@pytest.mark.parametrize("text, field", [
    ("hosts: {a: {}}\ngroups: [a]\n", "groups"),
    ("hosts: {a: {}}\ngroups: {lab: a}\n", "groups.lab"),
    ("hosts: {a: {}}\ngroups: {lab: [a, {b: 1}]}\n", "groups.lab"),
    ("hosts: {a: {}}\ngroups: {lab: [a, ghost]}\n", "groups.lab"),
    ("hosts: {a: {slots: 0}}\n", "hosts.a.slots"),
    ("hosts: {a: {slots: two}}\n", "hosts.a.slots"),
    ("hosts: {a: {slots: true}}\n", "hosts.a.slots"),
    ("hosts: {a: {}}\nhots: {}\n", "hots"),
])
def test_bad_groups_and_slots_name_file_and_field(tmp_path, text, field):
    inv = tmp_path / "inv.yaml"
    inv.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_inventory(inv)
    assert str(inv) in str(err.value) and f"field '{field}'" in str(err.value)
    assert err.value.hint


def test_unknown_group_member_names_it_and_the_known_hosts(tmp_path):
    inv = tmp_path / "inv.yaml"
    inv.write_text("hosts: {a: {}, b: {}}\ngroups: {lab: [a, ghost]}\n")
    with pytest.raises(ConfigError, match="unknown host.s. ghost") as err:
        load_inventory(inv)
    assert "known hosts: a, b" in err.value.hint


def test_update_inventory_keeps_groups_consistent(inventory):
    update_inventory({"lab1": {"hostname": "x"}, "lab2": {"hostname": "y"}},
                     join={"lab": ["lab1", "lab2"], "fresh": ["lab1"]})
    assert inventory_groups()["lab"] == ["gpu01", "gpu02", "gpu03", "lab1", "lab2"]
    update_inventory({}, remove=["lab1", "lab2", "cpu01"])
    data = yaml.safe_load(inventory.read_text())
    # removed hosts leave every group; a group emptied by that goes, an empty one stays
    assert data["groups"] == {"lab": ["gpu01", "gpu02"], "empty": []}
    assert inventory_groups() == {"lab": ["gpu01", "gpu02", "gpu03"], "nightly": ["gpu01"]}
