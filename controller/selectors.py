"""Which hosts a selector means: `gpu01`, `gpu01,gpu02`, `@lab` (or a mix, comma-separated),
narrowed by label filters (`--label a100`, all must match).

Groups come from the inventory (a host's own `groups:` and top-level `groups:`). A plain name
that is not in the inventory still resolves as a single host does (ssh config, then
`[user@]host[:port]`), so `cube hosts me@box:2222` works without an inventory.
"""

from __future__ import annotations

from pathlib import Path

from controller import paths
from controller.errors import CubeError
from controller.hosts import HostSpec, load_inventory, resolve_host


def parse_selector(selector: str | None) -> list[str]:
    """'a, @lab ,b' -> ['a', '@lab', 'b']; None or '' -> [] (every inventory host)."""
    return [part.strip() for part in (selector or "").split(",") if part.strip()]


def select_hosts(selector: str | None, labels: list[str] | None = None,
                 inventory: Path | None = None) -> list[HostSpec]:
    """The hosts a selector names, in selector order (a group in inventory order), without
    duplicates, keeping those that carry every label. No selector means every inventory host.
    An empty result is a CubeError (exit 2) that lists the known groups and hosts."""
    hosts = load_inventory(inventory)
    for spec in hosts.values():
        spec.inventory = inventory
    parts = parse_selector(selector)
    if selector is not None and not parts:
        raise CubeError(f"The host selector {selector!r} names no host.",
                        "Pass a name, a comma list (gpu01,gpu02) or a group (@lab).")
    chosen: dict[str, HostSpec] = {}
    for part in parts or list(hosts):
        for spec in _expand(part, hosts, inventory):
            chosen.setdefault(spec.name, spec)
    wanted = list(labels or [])
    selected = [s for s in chosen.values() if all(label in s.labels for label in wanted)]
    if not selected:
        raise _nothing_matched(selector, wanted, hosts, inventory)
    return selected


def _expand(part: str, hosts: dict[str, HostSpec], inventory: Path | None) -> list[HostSpec]:
    if part.startswith("@"):
        group = part[1:]
        return [spec for spec in hosts.values() if group in spec.groups]
    if part in hosts:
        return [hosts[part]]
    return [resolve_host(part, inventory)]


def _nothing_matched(selector: str | None, labels: list[str], hosts: dict[str, HostSpec],
                     inventory: Path | None) -> CubeError:
    what = f"the host selector '{selector}'" if selector else "the inventory"
    if labels:
        what += " with label(s) " + ", ".join(labels)
    groups: dict[str, int] = {}
    for spec in hosts.values():
        for group in spec.groups:
            groups[group] = groups.get(group, 0) + 1
    known_groups = ", ".join(f"@{g} ({n})" for g, n in sorted(groups.items())) or "none"
    known_hosts = ", ".join(hosts) or "none"
    known_labels = ", ".join(sorted({lb for s in hosts.values() for lb in s.labels})) or "none"
    return CubeError(
        f"No host matched {what}.",
        f"Inventory {inventory or paths.inventory_file()}: groups {known_groups}; "
        f"hosts {known_hosts}; labels {known_labels}.")
