"""Placement rules for single-copy volumes (pure functions, no servers needed)."""

import pytest

from driver import placement
from driver.errors import InvalidArgument, ResourceExhausted
from driver.placement import ServerState

GiB = 1 << 30


def servers(*specs):
    """specs: (name, free GiB, rack, [group volume names])"""
    return [ServerState(name, {"rack": rack}, free * GiB, list(members))
            for name, free, rack, members in specs]


@pytest.mark.parametrize("parameters, group", [
    ({"csi.storage.k8s.io/pvc/name": "data-kafka-2", "csi.storage.k8s.io/pvc/namespace": "prod"},
     "prod/data-kafka"),
    ({"csi.storage.k8s.io/pvc/name": "logs-es-data-10", "csi.storage.k8s.io/pvc/namespace": "o"},
     "o/logs-es-data"),
    ({"csi.storage.k8s.io/pvc/name": "scratch", "csi.storage.k8s.io/pvc/namespace": "prod"}, ""),
    ({"spreadGroup": "brokers", "csi.storage.k8s.io/pvc/name": "data-kafka-2"}, "brokers"),
    ({"spreadGroup": "none", "csi.storage.k8s.io/pvc/name": "data-kafka-2"}, ""),
    ({}, ""),
])
def test_spread_group_comes_from_the_statefulset_claim_or_the_parameter(parameters, group):
    assert placement.spread_group(parameters) == group


def test_three_volumes_of_one_group_land_on_three_servers():
    state = servers(("s1", 100, "a", []), ("s2", 50, "b", []), ("s3", 10, "c", []))
    used = []
    for ordinal in range(3):
        decision = placement.choose(state, GiB, "prod/data-kafka", placement.REQUIRED)
        assert decision.spread_ok
        used.append(decision.server)
        next(s for s in state if s.name == decision.server).group_volumes.append(f"data-kafka-{ordinal}")
    assert sorted(used) == ["s1", "s2", "s3"]


def test_required_spread_refuses_a_fourth_volume_on_three_servers():
    state = servers(("s1", 100, "a", ["v0"]), ("s2", 100, "b", ["v1"]), ("s3", 100, "c", ["v2"]))
    with pytest.raises(ResourceExhausted, match="spreadPolicy: preferred"):
        placement.choose(state, GiB, "g", placement.REQUIRED)


def test_preferred_spread_shares_the_least_loaded_server_and_says_so():
    state = servers(("s1", 100, "a", ["v0", "v3"]), ("s2", 10, "b", ["v1"]), ("s3", 100, "c", ["v2"]))
    decision = placement.choose(state, GiB, "g", placement.PREFERRED)
    assert decision.server == "s3"
    assert not decision.spread_ok
    assert "v2" in decision.note


def test_topology_key_keeps_a_group_out_of_a_used_rack():
    state = servers(("s1", 100, "a", ["v0"]), ("s2", 100, "a", []), ("s3", 5, "b", []))
    decision = placement.choose(state, GiB, "g", placement.REQUIRED, topology_key="rack")
    assert decision.server == "s3"
    with pytest.raises(ResourceExhausted, match="rack"):
        placement.choose(state, 10 * GiB, "g", placement.REQUIRED, topology_key="rack")


def test_capacity_is_checked_before_spread():
    state = servers(("s1", 1, "a", []), ("s2", 1, "b", []))
    with pytest.raises(ResourceExhausted, match="bytes free"):
        placement.choose(state, 2 * GiB, "", placement.REQUIRED)


def test_without_a_group_the_server_with_most_room_wins():
    state = servers(("s1", 10, "a", []), ("s2", 30, "b", []), ("s3", 20, "c", []))
    assert placement.choose(state, GiB, "", placement.REQUIRED).server == "s2"


def test_bad_policy_is_refused():
    with pytest.raises(InvalidArgument):
        placement.check_policy("sometimes")
