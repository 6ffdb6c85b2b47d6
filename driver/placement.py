"""Where a new single-copy volume goes: capacity plus spread groups.

A spread group is the set of volumes of one app (by default: one StatefulSet's claims of one
volumeClaimTemplate). Volumes of a group go to different storage servers, and with a
`spreadTopologyKey` to servers with different values of that label (rack, zone), so that
losing one server (or rack) costs the app one replica, never two.

This module is pure: it takes what the servers reported and returns a decision, so the
rules can be tested without servers.
"""

import re
from dataclasses import dataclass, field

from .errors import InvalidArgument, ResourceExhausted

REQUIRED, PREFERRED = "required", "preferred"
NO_GROUP = "none"
PVC_NAME = "csi.storage.k8s.io/pvc/name"
PVC_NAMESPACE = "csi.storage.k8s.io/pvc/namespace"
_STATEFULSET_CLAIM = re.compile(r"^(?P<template_and_set>.+)-(?P<ordinal>\d+)$")


@dataclass
class ServerState:
    name: str
    labels: dict
    available_bytes: int
    group_volumes: list = field(default_factory=list)  # names of this group's volumes there


@dataclass
class Decision:
    server: str
    spread_ok: bool
    note: str  # why this server; for the log and the volume context


def spread_group(parameters: dict) -> str:
    """The group a new volume belongs to: the `spreadGroup` parameter if set ("none" turns
    spreading off), else the StatefulSet claim prefix: a claim `data-kafka-2` in namespace
    `prod` belongs to `prod/data-kafka` (StatefulSet claims are <template>-<set>-<ordinal>)."""
    explicit = parameters.get("spreadGroup", "")
    if explicit:
        return "" if explicit == NO_GROUP else explicit
    claim = parameters.get(PVC_NAME, "")
    match = _STATEFULSET_CLAIM.match(claim)
    if not match:
        return ""
    return f"{parameters.get(PVC_NAMESPACE, '')}/{match['template_and_set']}"


def check_policy(value: str) -> str:
    if value not in (REQUIRED, PREFERRED):
        raise InvalidArgument(f"spreadPolicy must be {REQUIRED} or {PREFERRED}, not {value!r}")
    return value


def choose(servers: list[ServerState], size_bytes: int, group: str, policy: str,
           topology_key: str = "") -> Decision:
    """Pick a server with room for `size_bytes`, honouring the spread group."""
    roomy = [s for s in servers if s.available_bytes >= size_bytes]
    if not roomy:
        best = max((s.available_bytes for s in servers), default=0)
        raise ResourceExhausted(
            f"no reachable storage server has {size_bytes} bytes free (the most any has is "
            f"{best}; {len(servers)} server(s) reachable): add capacity or ask for less")
    if not group:
        chosen = max(roomy, key=lambda s: (s.available_bytes, s.name))
        return Decision(chosen.name, True, "no spread group; most free space")
    taken_servers = {s.name for s in servers if s.group_volumes}
    taken_domains = {s.labels.get(topology_key, "") for s in servers if s.group_volumes} \
        if topology_key else set()

    def conflicts(server: ServerState) -> bool:
        if server.name in taken_servers:
            return True
        return bool(topology_key) and server.labels.get(topology_key, "") in taken_domains

    free_of_group = [s for s in roomy if not conflicts(s)]
    if free_of_group:
        chosen = max(free_of_group, key=lambda s: (s.available_bytes, s.name))
        return Decision(chosen.name, True, f"spread group {group}: first volume of the group "
                                           f"on {chosen.name}")
    where = ", ".join(sorted(taken_servers)) or "-"
    domain = f" and {topology_key} values {', '.join(sorted(taken_domains))}" if topology_key else ""
    if policy == REQUIRED:
        raise ResourceExhausted(
            f"spread group {group} already has volumes on servers {where}{domain}; no other "
            f"storage server with {size_bytes} bytes free is left: add a storage server, or set "
            f"spreadPolicy: preferred to allow sharing")
    chosen = min(roomy, key=lambda s: (len(s.group_volumes), -s.available_bytes, s.name))
    sharing = ", ".join(chosen.group_volumes) or "its failure domain"
    return Decision(chosen.name, False, f"spread group {group} could not be spread: shares "
                                        f"{chosen.name} with {sharing}")
