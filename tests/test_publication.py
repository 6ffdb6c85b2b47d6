"""ControllerPublish/Unpublish: the rule every network backend applies, the node registries,
and the local class (which has no attach step) through the real plugin. The network classes'
publications are tested with real storage servers and a real Ceph in their own test files."""

from types import SimpleNamespace

import grpc
import pytest

from conftest import Plugin, capability, clean_up_below
from driver.backends.base import Publication, check_publication
from driver.errors import AlreadyExists, FailedPrecondition, NotFound, Unavailable
from driver.nodes import KubernetesNodes, StaticNodes
from driver.proto import csi_pb2
from test_local_helpers import expect

Code = grpc.StatusCode
Cap = csi_pb2.ControllerServiceCapability.RPC.Type


# --- the one rule ---
def test_a_free_volume_may_be_published():
    assert check_publication("v", None, "a", False) is False


def test_the_same_publication_again_needs_no_write():
    assert check_publication("v", Publication("a", True), "a", True) is True


def test_another_node_is_refused_naming_the_holder():
    with pytest.raises(FailedPrecondition, match="published to node a"):
        check_publication("v", Publication("a", False), "b", False)


def test_the_same_node_with_the_other_readonly_flag_already_exists():
    with pytest.raises(AlreadyExists, match="read-write already"):
        check_publication("v", Publication("a", False), "a", True)


# --- node registries ---
def test_static_nodes_know_only_their_list():
    nodes = StaticNodes(["a", "b"])
    nodes.check("a")
    with pytest.raises(NotFound, match="--nodes"):
        nodes.check("c")


class FakeStorageApi:
    """Stands in for kubernetes.client.StorageV1Api: CSINode objects by name."""

    def __init__(self, csinodes: dict, status: int = 404):
        self.csinodes, self.status, self.reads = csinodes, status, 0

    def read_csi_node(self, name, _request_timeout=None):
        from kubernetes.client.exceptions import ApiException

        assert _request_timeout, "an unbounded API call can hang a publish"
        self.reads += 1
        if self.status == "unreachable":
            import urllib3

            raise urllib3.exceptions.MaxRetryError(None, "/apis/storage.k8s.io", "refused")
        if name not in self.csinodes:
            raise ApiException(status=self.status, reason="Not Found" if self.status == 404 else "Boom")
        drivers = [SimpleNamespace(name=d, node_id=i) for d, i in self.csinodes[name].items()]
        return SimpleNamespace(spec=SimpleNamespace(drivers=drivers))


def test_kubernetes_nodes_read_csinode_and_remember_a_found_node():
    api = FakeStorageApi({"n1": {"polyvol.csi.io": "n1"}, "n2": {"local.polyvol.csi.io": "n2"}})
    nodes = KubernetesNodes("polyvol.csi.io", storage_api=api)
    nodes.check("n1")
    nodes.check("n1")
    assert api.reads == 1
    with pytest.raises(NotFound, match="no polyvol.csi.io node plugin"):
        nodes.check("n2")
    with pytest.raises(NotFound, match="no CSINode"):
        nodes.check("n3")


def test_kubernetes_nodes_api_errors_are_unavailable_not_not_found():
    nodes = KubernetesNodes("polyvol.csi.io", storage_api=FakeStorageApi({}, status=500))
    with pytest.raises(Unavailable, match="500"):
        nodes.check("n1")
    nodes = KubernetesNodes("polyvol.csi.io", storage_api=FakeStorageApi({}, status="unreachable"))
    with pytest.raises(Unavailable, match="cannot reach the Kubernetes API"):
        nodes.check("n1")


# --- the local class through the real plugin ---
@pytest.fixture
def local_plugin(workdir):
    plugin = Plugin(workdir, extra_args=["--types", "local-ephemeral", "--nodes", "other-node"])
    plugin.start()
    try:
        yield plugin
    finally:
        plugin.stop()
        clean_up_below(workdir)


def publish_request(volume_id="", node_id="", cap=None, readonly=False):
    return csi_pb2.ControllerPublishVolumeRequest(volume_id=volume_id, node_id=node_id,
                                                  volume_capability=cap, readonly=readonly)


@pytest.mark.root
def test_local_class_advertises_no_publish_and_needs_none(local_plugin):
    caps = {c.rpc.type for c in local_plugin.controller.ControllerGetCapabilities(
        csi_pb2.ControllerGetCapabilitiesRequest()).capabilities}
    assert Cap.PUBLISH_UNPUBLISH_VOLUME not in caps and Cap.CREATE_DELETE_VOLUME in caps
    volume = local_plugin.create("pub-local")
    answer = local_plugin.controller.ControllerPublishVolume(
        publish_request(volume.volume_id, local_plugin.node_id, capability()))
    assert dict(answer.publish_context) == {"polyvol.csi.io/readonly": "false"}
    # a known node that does not hold the volume cannot use it
    expect(Code.FAILED_PRECONDITION, local_plugin.controller.ControllerPublishVolume,
           publish_request(volume.volume_id, "other-node", capability()),
           mentions=(local_plugin.node_id, "other-node"))
    local_plugin.controller.ControllerUnpublishVolume(csi_pb2.ControllerUnpublishVolumeRequest(
        volume_id=volume.volume_id, node_id=local_plugin.node_id))
    local_plugin.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=volume.volume_id))


@pytest.mark.root
def test_a_plugin_serving_local_and_network_classes_publishes_local_volumes_too(workdir):
    """Such a plugin advertises publishing (for its network classes), so a CO publishes its
    local volumes as well: the same rules apply, recorded in the volume's record."""
    plugin = Plugin(workdir, extra_args=["--nodes", "other-node"])  # every backend
    plugin.start()
    try:
        caps = {c.rpc.type for c in plugin.controller.ControllerGetCapabilities(
            csi_pb2.ControllerGetCapabilitiesRequest()).capabilities}
        assert {Cap.PUBLISH_UNPUBLISH_VOLUME, Cap.PUBLISH_READONLY} <= caps
        volume = plugin.create("pub-combined")
        publish = plugin.controller.ControllerPublishVolume
        answer = publish(publish_request(volume.volume_id, plugin.node_id, capability()))
        assert dict(answer.publish_context) == {"polyvol.csi.io/readonly": "false"}
        publish(publish_request(volume.volume_id, plugin.node_id, capability()))  # idempotent
        expect(Code.ALREADY_EXISTS, publish,
               publish_request(volume.volume_id, plugin.node_id, capability(), readonly=True),
               mentions=("read-write",))
        expect(Code.FAILED_PRECONDITION, publish,
               publish_request(volume.volume_id, "other-node", capability()), mentions=("other-node",))
        got = plugin.controller.ControllerGetVolume(
            csi_pb2.ControllerGetVolumeRequest(volume_id=volume.volume_id))
        assert list(got.status.published_node_ids) == [plugin.node_id]
        plugin.restart()  # kept in the volume's record
        unpublish = plugin.controller.ControllerUnpublishVolume
        unpublish(csi_pb2.ControllerUnpublishVolumeRequest(volume_id=volume.volume_id,
                                                           node_id="other-node"))
        got = plugin.controller.ControllerGetVolume(
            csi_pb2.ControllerGetVolumeRequest(volume_id=volume.volume_id))
        assert list(got.status.published_node_ids) == [plugin.node_id]
        unpublish(csi_pb2.ControllerUnpublishVolumeRequest(volume_id=volume.volume_id,
                                                           node_id=plugin.node_id))
        got = plugin.controller.ControllerGetVolume(
            csi_pb2.ControllerGetVolumeRequest(volume_id=volume.volume_id))
        assert list(got.status.published_node_ids) == []
        plugin.controller.ControllerPublishVolume(
            publish_request(volume.volume_id, plugin.node_id, capability(), readonly=True))
        plugin.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=volume.volume_id))
    finally:
        plugin.stop()
        clean_up_below(workdir)


@pytest.mark.root
def test_publish_requests_are_validated_first(local_plugin):
    volume = local_plugin.create("pub-bad")
    publish = local_plugin.controller.ControllerPublishVolume
    expect(Code.INVALID_ARGUMENT, publish, publish_request("", "n", capability()), mentions=("volume_id",))
    expect(Code.INVALID_ARGUMENT, publish, publish_request(volume.volume_id, "", capability()),
           mentions=("node_id",))
    expect(Code.INVALID_ARGUMENT, publish, publish_request(volume.volume_id, local_plugin.node_id),
           mentions=("volume_capability",))
    expect(Code.NOT_FOUND, publish, publish_request("lcl-" + "0" * 32, local_plugin.node_id,
                                                    capability()))
    expect(Code.NOT_FOUND, publish, publish_request(volume.volume_id, "no-such-node", capability()),
           mentions=("no-such-node", "--nodes"))
    unpublish = local_plugin.controller.ControllerUnpublishVolume
    expect(Code.INVALID_ARGUMENT, unpublish, csi_pb2.ControllerUnpublishVolumeRequest(node_id="n"),
           mentions=("volume_id",))
    # gone or never there: unpublished already
    unpublish(csi_pb2.ControllerUnpublishVolumeRequest(volume_id="lcl-" + "0" * 32, node_id="n"))
    unpublish(csi_pb2.ControllerUnpublishVolumeRequest(volume_id="xx-unknown-prefix"))
