"""Placement (controller/placement.py): which host of a selection a job starts on soonest, from
probe reports; the demand; the slot request a launch sends. No hosts needed."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from controller import placement
from controller.errors import CubeError, HostUnreachable
from controller.fleet import HostReport, unreachable
from controller.hosts import HostSpec, update_inventory


def host(name, total=1, free=1, queued=0, load=0.1, pythons=("3.11.2",), engines=None):
    return HostReport(name=name, address=f"me@{name}:22", reachable=True, slots_total=total,
                      slots_free=free, slots_source="agent", load_per_core=load,
                      pythons=list(pythons), engines=engines or {},
                      queued=[{"job_id": f"q{i}", "owner": "ann", "state": "queued"}
                              for i in range(queued)])


ONE = placement.Demand(1, 0, "one slot per job")


def pick(reports, demand=ONE, runtime="python", python="3.11", **kw):
    return placement.choose(reports, demand, runtime, python, selector="@lab", **kw)[0].name


def test_free_slots_first_then_shortest_queue_then_lowest_load():
    assert pick([host("a", free=0), host("b", free=1, load=3.0)]) == "b"
    assert pick([host("a", free=0, queued=2), host("b", free=0, queued=1)]) == "b"
    assert pick([host("a", load=0.9), host("b", load=0.2), host("c", load=0.5)]) == "b"
    # A free slot behind a queue is no free slot (the queue is strict FIFO).
    assert pick([host("a", free=1, queued=1, load=0.0), host("b", free=0, queued=0)]) == "b"
    assert pick([host("a", total=4, free=1), host("b", total=4, free=2)],
                placement.Demand(2, 2, "--gpus")) == "b"


def test_a_demand_no_host_can_hold_is_exit_2_naming_the_largest():
    with pytest.raises(CubeError) as err:
        pick([host("a", total=2), host("big", total=4), host("c", total=1)],
             placement.Demand(8, 8, "--gpus"))
    assert err.value.exit_code == 2
    assert "largest is big with 4" in err.value.message and "8 slot(s)" in err.value.message


def test_no_queue_when_every_fitting_host_is_busy_is_exit_2_naming_them():
    with pytest.raises(CubeError) as err:
        pick([host("a", free=0, queued=1), host("b", free=0)], no_queue=True)
    assert err.value.exit_code == 2 and "busy" in err.value.message
    assert "a (0/1 slots free, 1 queued" in err.value.message and "b (" in err.value.message
    assert pick([host("a", free=0), host("b", free=1)], no_queue=True) == "b"


def test_unreachable_hosts_are_skipped_and_none_answering_is_exit_3():
    down = unreachable(HostSpec(name="gone", hostname="gone"), "no answer within 5 s")
    best, why = placement.choose([down, host("b", free=0), host("c")], ONE, "python", None,
                                 selector="@lab")
    assert best.name == "c" and "gone: unreachable (no answer within 5 s)" in why
    with pytest.raises(HostUnreachable) as err:
        pick([down])
    assert err.value.exit_code == 3 and "gone: no answer" in err.value.message


def test_hosts_without_the_runtime_do_not_fit():
    old = host("old", pythons=("3.6.9",), load=0.0)
    assert pick([old, host("new", load=5.0)], python="3") == "new"
    assert pick([host("py311", load=0.0), host("py312", pythons=("3.12.1",))],
                python="3.12") == "py312"
    docker = {"docker": {"version": "24", "ok": True, "error": None}}
    down = {"docker": {"version": None, "ok": False, "error": "daemon not running"}}
    assert pick([host("a", engines=down, load=0.0), host("b", engines=docker)],
                runtime="docker") == "b"
    with pytest.raises(CubeError, match="can run the podman runtime: a: no podman"):
        pick([host("a", engines=docker)], runtime="podman")


def cube(accelerators=0):
    return SimpleNamespace(platform={"accelerator_count": accelerators})


def test_demand_from_the_cube_and_the_flags():
    assert placement.demand_for(cube()) == placement.Demand(1, 0, "one slot per job")
    assert placement.demand_for(cube(2)).slots == 2
    assert placement.demand_for(cube(2), gpus=3) == placement.Demand(3, 3, "--gpus")
    assert placement.demand_for(cube(2), slots=1) == placement.Demand(1, 2, "--slots")
    with pytest.raises(CubeError, match="--slots must be at least 1"):
        placement.demand_for(cube(), slots=0)
    assert placement.gpu_overrides(2) == ["platform.accelerator_count=2"]
    assert placement.gpu_overrides(None) == []


def test_selection_or_single_name():
    assert not placement.is_selection("gpu01")
    assert placement.is_selection("@lab") and placement.is_selection("a,b")
    assert placement.is_selection("gpu01", ["a100"])


def test_slot_request_one_slot_per_gpu_else_the_inventory():
    spec = HostSpec(name="h", hostname="h", slots=3, lease_dir="/var/tmp/l")
    gpus = {"gpus": [{"index": 0}, {"index": 1}]}
    request = placement.slot_request(spec, gpus, placement.Demand(2, 2, "--gpus"))
    assert (request.total_slots, request.slot_gpus, request.lease_dir) == (2, [0, 1], "/var/tmp/l")
    cpu = placement.slot_request(spec, {"gpus": []}, ONE, no_queue=True)
    assert (cpu.total_slots, cpu.slot_gpus, cpu.no_queue) == (3, [], True)
    assert cpu.spec_fields()["slots"] == 1
    default = placement.slot_request(HostSpec(name="d", hostname="d"), {}, ONE)
    assert (default.total_slots, default.lease_dir) == (1, "/var/tmp/cube-leases")
    with pytest.raises(CubeError, match="has 3 slot"):
        placement.slot_request(spec, {}, placement.Demand(4, 0, "--slots"))


def test_place_probes_the_selection_and_says_why(cube_home):
    update_inventory({n: {"hostname": n, "slots": 1} for n in ("a", "b", "c")},
                     join={"lab": ["a", "b", "c"]})
    seen, messages = [], []

    def probe(specs, timeout):
        seen.extend(s.name for s in specs)
        return [unreachable(specs[0], "refused"), host("b", free=0), host("c")]

    chosen = placement.place("@lab", [], None, ONE, "python", None, no_queue=False,
                             log=messages.append, probe=probe)
    assert chosen == "c" and seen == ["a", "b", "c"]
    assert any("skipping a: unreachable (refused)" in m for m in messages)
    assert any(m.startswith("placement: chose c for 1 slot(s) (free: 1/1 slots free")
               for m in messages)
