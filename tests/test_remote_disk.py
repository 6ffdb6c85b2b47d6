"""remote-disk end to end: three storage servers and a worker node in their own network
namespaces, the real plugin in the node namespace, real nbdkit/TLS-PSK/qemu-storage-daemon/
nbdfuse/loop on the data path.

Spread groups, a server outage seen as VOLUME_CONDITION, data integrity under parallel writes,
a storage-server crash and restart under fsync'd writes, ids crafted to reach another
server, and ControllerPublish: one node per volume, kept on the storage server, and a
publish_context that follows a server whose NBD address changed.
"""

import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import grpc
import pytest

from conftest import MiB, Plugin, capability
from driver.proto import csi_pb2
from remote_lab import NBD_PORT, RemoteCluster

pytestmark = pytest.mark.root
# ControllerPublish accepts only node ids the controller knows: besides its own (the plugin
# runs with --role all as "node-test"), two nodes that exist only as names.
NODE_A, NODE_B = "node-a", "node-b"
CTX_NBD_ADDRESS = "polyvol.csi.io/nbd-address"
CTX_NBD_TLS = "polyvol.csi.io/nbd-tls"
CTX_READONLY = "polyvol.csi.io/readonly"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("remote")
    with RemoteCluster(workdir, servers=3) as running:
        plugin = Plugin(workdir, extra_args=[*running.plugin_args, "--nodes", f"{NODE_A},{NODE_B}"],
                        argv_prefix=running.node_prefix)
        plugin.start()
        running.plugin = plugin
        try:
            yield running
        finally:
            plugin.stop()
            from conftest import clean_up_below
            clean_up_below(workdir)


def create(plugin, name, *, claim=None, policy="required", size=64 * MiB, block=False):
    parameters = {"type": "remote-disk", "spreadPolicy": policy}
    if claim:
        parameters.update({"csi.storage.k8s.io/pvc/name": claim,
                           "csi.storage.k8s.io/pvc/namespace": "kafka"})
    return plugin.create(name, size=size, block=block, parameters=parameters)


def delete(plugin, volume):
    plugin.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=volume.volume_id), timeout=60)


def server_of(volume) -> str:
    return volume.volume_context["polyvol.csi.io/server"]


def test_statefulset_claims_are_spread_over_servers_and_a_fourth_is_refused(cluster):
    plugin = cluster.plugin
    volumes = [create(plugin, f"pv-spread-{i}", claim=f"data-kafka-{i}") for i in range(3)]
    try:
        assert sorted(server_of(v) for v in volumes) == ["srv1", "srv2", "srv3"]
        for volume in volumes:
            assert volume.volume_context["polyvol.csi.io/copies"] == "1"
            assert volume.volume_context["polyvol.csi.io/spread-group"] == "kafka/data-kafka"
            assert volume.volume_id.endswith("-" + server_of(volume))
        # The same request again (a provisioner retry) is the same volume, not a new one.
        again = create(plugin, "pv-spread-1", claim="data-kafka-1")
        assert again.volume_id == volumes[1].volume_id
        with pytest.raises(grpc.RpcError) as refused:
            create(plugin, "pv-spread-3", claim="data-kafka-3")
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "spreadPolicy: preferred" in refused.value.details()
        shared = create(plugin, "pv-spread-3p", claim="data-kafka-3", policy="preferred")
        volumes.append(shared)
        assert shared.volume_context["polyvol.csi.io/spread"].startswith("degraded")
    finally:
        for volume in volumes:
            delete(plugin, volume)


def fio_verify(path: str, size: str, *extra: str) -> None:
    done = subprocess.run(
        ["fio", "--name=verify", f"--filename={path}", f"--size={size}", "--rw=randwrite",
         "--bsrange=4k-1m", "--ioengine=libaio", "--iodepth=32", "--direct=1",
         "--verify=crc32c", "--verify_fatal=1", "--do_verify=1", "--randrepeat=0",
         "--verify_state_save=0", *extra],
        capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "verify" not in done.stderr.lower(), done.stderr


def test_parallel_writes_verify_on_a_mounted_and_a_raw_remote_disk(cluster):
    plugin = cluster.plugin
    mounted = create(plugin, "pv-fio-mount", policy="preferred", size=128 * MiB)
    raw = create(plugin, "pv-fio-block", policy="preferred", size=128 * MiB, block=True)
    try:
        target = plugin.stage_and_publish(mounted, "fio-mount")
        fio_verify(os.path.join(target, "fio.data"), "96M")
        device = plugin.stage_and_publish(raw, "fio-block", block=True)
        fio_verify(device, "128M")
    finally:
        plugin.unpublish_and_unstage(mounted.volume_id, "fio-mount")
        plugin.unpublish_and_unstage(raw.volume_id, "fio-block")
        delete(plugin, mounted)
        delete(plugin, raw)


def stats(plugin, volume, path):
    return plugin.node.NodeGetVolumeStats(csi_pb2.NodeGetVolumeStatsRequest(
        volume_id=volume.volume_id, volume_path=path), timeout=60)


def controller_condition(plugin, volume):
    return plugin.controller.ControllerGetVolume(csi_pb2.ControllerGetVolumeRequest(
        volume_id=volume.volume_id), timeout=60).status.volume_condition


def test_a_stopped_server_makes_only_its_volume_abnormal(cluster):
    plugin = cluster.plugin
    volumes = [create(plugin, f"pv-outage-{i}", claim=f"logs-es-{i}") for i in range(3)]
    targets = {v.volume_id: plugin.stage_and_publish(v, f"outage-{i}") for i, v in enumerate(volumes)}
    victim = next(v for v in volumes if server_of(v) == "srv2")
    try:
        cluster.stop_server("srv2")
        time.sleep(1)
        for volume in volumes:
            node = stats(plugin, volume, targets[volume.volume_id]).volume_condition
            controller = controller_condition(plugin, volume)
            if volume is victim:
                assert node.abnormal and controller.abnormal, (node, controller)
                assert "srv2" in controller.message or "10.213" in controller.message
            else:
                assert not node.abnormal and not controller.abnormal, (node, controller)
                data = os.urandom(1 << 20)
                path = Path(targets[volume.volume_id], "during-outage")
                # fsync this file only: os.sync() would also wait on the stopped server's volume
                with open(path, "wb") as out:
                    out.write(data)
                    os.fsync(out.fileno())
                assert path.read_bytes() == data
    finally:
        cluster.start_server("srv2")
    for _ in range(100):  # the controller's channel to srv2 backs off after the failures
        if not controller_condition(plugin, victim).abnormal:
            break
        time.sleep(0.2)
    assert not controller_condition(plugin, victim).abnormal
    assert not stats(plugin, victim, targets[victim.volume_id]).volume_condition.abnormal
    for i, volume in enumerate(volumes):
        plugin.unpublish_and_unstage(volume.volume_id, f"outage-{i}")
        delete(plugin, volume)


def test_fsynced_data_survives_a_storage_server_crash_and_restart(cluster):
    """kill -9 of the storage server (nbdkit goes with it), restart after 5 s; the writer keeps
    writing and fsyncing meanwhile: no I/O error, and every fsync'd record reads back."""
    plugin = cluster.plugin
    volume = create(plugin, "pv-crash", policy="preferred", size=64 * MiB)
    server = server_of(volume)
    target = plugin.stage_and_publish(volume, "crash")
    path = Path(target, "log")
    records, errors = [], []
    stop = threading.Event()

    def writer():
        with open(path, "ab", buffering=0) as out:
            for number in range(100_000):
                if stop.is_set():
                    return
                record = f"record {number:08d}\n".encode() * 64
                try:
                    out.write(record)
                    os.fsync(out.fileno())
                except OSError as error:
                    errors.append(error)
                    return
                records.append(record)
                time.sleep(0.05)

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        time.sleep(2)
        cluster.stop_server(server, sig=signal.SIGKILL)
        time.sleep(5)
        cluster.start_server(server)
        time.sleep(4)
    finally:
        stop.set()
        thread.join(timeout=120)
    assert not errors, f"the writer saw {errors}"
    before = len(records)
    assert before > 60, f"only {before} records were written: writes did not resume"
    plugin.unpublish_and_unstage(volume.volume_id, "crash")
    target = plugin.stage_and_publish(volume, "crash")
    assert Path(target, "log").read_bytes() == b"".join(records)
    plugin.unpublish_and_unstage(volume.volume_id, "crash")
    delete(plugin, volume)


@pytest.mark.parametrize("crafted", [
    "rd-{digest}-srv9",            # a server that is not configured
    "rd-{digest}-srv1/../srv2",    # a path in disguise
    "rd-../../etc/passwd",
])
def test_volume_ids_crafted_to_reach_elsewhere_are_refused(cluster, crafted):
    plugin = cluster.plugin
    volume = create(plugin, "pv-crafted", policy="preferred")
    try:
        digest = volume.volume_id.split("-")[1]
        bogus = crafted.format(digest=digest)
        with pytest.raises(grpc.RpcError) as refused:
            plugin.controller.ControllerGetVolume(
                csi_pb2.ControllerGetVolumeRequest(volume_id=bogus), timeout=30)
        assert refused.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.RpcError) as refused:
            plugin.node.NodeStageVolume(csi_pb2.NodeStageVolumeRequest(
                volume_id=bogus, staging_target_path=plugin.path("crafted", "staging"),
                volume_capability=capability(), volume_context=volume.volume_context), timeout=30)
        assert refused.value.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT)
        # Another server's real volume id, with this volume's context: that server refuses it.
        other = next(s for s in ("srv1", "srv2", "srv3") if s != server_of(volume))
        with pytest.raises(grpc.RpcError):
            plugin.controller.ControllerGetVolume(csi_pb2.ControllerGetVolumeRequest(
                volume_id=f"rd-{digest}-{other}"), timeout=30)
    finally:
        delete(plugin, volume)


@pytest.mark.parametrize("kill", [False, True], ids=["sigterm", "sigkill"])
def test_a_plugin_restart_keeps_attached_volumes_working(cluster, kill):
    """The attach helpers outlive the plugin; the restarted plugin adopts them again."""
    plugin = cluster.plugin
    volume = create(plugin, f"pv-restart-{kill}", policy="preferred")
    target = plugin.stage_and_publish(volume, "restart")
    before = os.urandom(1 << 20)
    Path(target, "before").write_bytes(before)
    plugin.restart(kill=kill)
    assert not stats(plugin, volume, target).volume_condition.abnormal
    assert Path(target, "before").read_bytes() == before
    with open(Path(target, "after"), "wb") as out:
        out.write(b"written after the restart")
        os.fsync(out.fileno())
    # Staging again after the restart is a no-op on the adopted attachment, not a second one.
    attach_dir = plugin.state_dir / "attach"
    helpers_before = sorted(p.name for p in attach_dir.iterdir())
    plugin.stage_and_publish(volume, "restart")
    assert sorted(p.name for p in attach_dir.iterdir()) == helpers_before
    plugin.unpublish_and_unstage(volume.volume_id, "restart")
    leftover = subprocess.run(["pgrep", "-f", f"attach/{volume.volume_id}"], capture_output=True,
                              text=True).stdout.split()
    assert not leftover, f"attach helpers still running after unstage: {leftover}"
    target = plugin.stage_and_publish(volume, "restart")
    assert Path(target, "after").read_bytes() == b"written after the restart"
    plugin.unpublish_and_unstage(volume.volume_id, "restart")
    delete(plugin, volume)


# --- ControllerPublish: one node per volume ---

def publish(plugin, volume_id, node_id, readonly=False, volume_context=None) -> dict:
    return dict(plugin.controller.ControllerPublishVolume(csi_pb2.ControllerPublishVolumeRequest(
        volume_id=volume_id, node_id=node_id, volume_capability=capability(), readonly=readonly,
        volume_context=volume_context or {}), timeout=60).publish_context)


def unpublish(plugin, volume_id, node_id) -> None:
    plugin.controller.ControllerUnpublishVolume(csi_pb2.ControllerUnpublishVolumeRequest(
        volume_id=volume_id, node_id=node_id), timeout=60)


def published_nodes(plugin, volume) -> tuple[list, list]:
    """The published node ids ControllerGetVolume and ListVolumes report for the volume."""
    got = plugin.controller.ControllerGetVolume(csi_pb2.ControllerGetVolumeRequest(
        volume_id=volume.volume_id), timeout=60).status.published_node_ids
    listed = [list(e.status.published_node_ids) for e in plugin.controller.ListVolumes(
        csi_pb2.ListVolumesRequest(), timeout=60).entries if e.volume.volume_id == volume.volume_id]
    return list(got), listed


def rpc_error(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as failed:
        call()
    return failed.value


def test_a_volume_is_published_to_one_node_and_that_outlives_a_plugin_restart(cluster):
    plugin = cluster.plugin
    volume = create(plugin, "pv-publish", policy="preferred")
    try:
        capabilities = {c.rpc.type for c in plugin.controller.ControllerGetCapabilities(
            csi_pb2.ControllerGetCapabilitiesRequest(), timeout=30).capabilities}
        Cap = csi_pb2.ControllerServiceCapability.RPC.Type
        assert {Cap.PUBLISH_UNPUBLISH_VOLUME, Cap.PUBLISH_READONLY,
                Cap.LIST_VOLUMES_PUBLISHED_NODES} <= capabilities
        assert published_nodes(plugin, volume) == ([], [[]])

        context = publish(plugin, volume.volume_id, NODE_A, volume_context=volume.volume_context)
        assert context == {CTX_NBD_ADDRESS: volume.volume_context[CTX_NBD_ADDRESS],
                           CTX_NBD_TLS: "true", CTX_READONLY: "false"}
        # The external-attacher retries: the same node again is the same answer.
        assert publish(plugin, volume.volume_id, NODE_A) == context
        assert published_nodes(plugin, volume) == ([NODE_A], [[NODE_A]])

        taken = rpc_error(lambda: publish(plugin, volume.volume_id, NODE_B))
        assert taken.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert f"published to node {NODE_A}" in taken.details()
        other_mode = rpc_error(lambda: publish(plugin, volume.volume_id, NODE_A, readonly=True))
        assert other_mode.code() == grpc.StatusCode.ALREADY_EXISTS
        in_use = rpc_error(lambda: delete(plugin, volume))
        assert in_use.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert f"published to node {NODE_A}" in in_use.details()

        # A detach from a node that does not have it (a late retry) leaves node-a's in place.
        unpublish(plugin, volume.volume_id, NODE_B)
        assert published_nodes(plugin, volume) == ([NODE_A], [[NODE_A]])

        # The publication lives on the storage server, not in the plugin.
        plugin.restart(kill=True)
        assert published_nodes(plugin, volume) == ([NODE_A], [[NODE_A]])
        assert rpc_error(lambda: publish(plugin, volume.volume_id, NODE_B)).code() == \
            grpc.StatusCode.FAILED_PRECONDITION

        unpublish(plugin, volume.volume_id, NODE_A)
        unpublish(plugin, volume.volume_id, NODE_A)  # already detached: still OK
        assert published_nodes(plugin, volume) == ([], [[]])
        context_b = publish(plugin, volume.volume_id, NODE_B, readonly=True)
        assert context_b == {**context, CTX_READONLY: "true"}
        assert published_nodes(plugin, volume) == ([NODE_B], [[NODE_B]])
        unpublish(plugin, volume.volume_id, NODE_B)
    finally:
        for node in (NODE_A, NODE_B):
            unpublish(plugin, volume.volume_id, node)
        delete(plugin, volume)


def test_publishing_volumes_or_nodes_that_do_not_exist(cluster):
    plugin = cluster.plugin
    volume = create(plugin, "pv-publish-missing", policy="preferred")
    server = server_of(volume)
    missing = volume.volume_id.replace(volume.volume_id.split("-")[1], "f" * 32)
    try:
        assert rpc_error(lambda: publish(plugin, missing, NODE_A)).code() == grpc.StatusCode.NOT_FOUND
        unpublish(plugin, missing, NODE_A)  # nothing to detach: OK, as the spec asks
        unpublish(plugin, missing, "")
        unpublish(plugin, "rd-not-a-volume-id", NODE_A)
        assert rpc_error(lambda: publish(plugin, volume.volume_id, "node-z")).code() == \
            grpc.StatusCode.NOT_FOUND
        # A volume deleted meanwhile: the detach that follows succeeds.
        delete(plugin, volume)
        unpublish(plugin, volume.volume_id, NODE_A)
        # A server the controller does not know right now is not "nothing published": its
        # record would keep the volume tied to the node, so the detach is retried.
        unknown = rpc_error(lambda: unpublish(plugin, volume.volume_id.replace(server, "srv9"),
                                              NODE_A))
        assert unknown.code() == grpc.StatusCode.UNAVAILABLE
        assert "srv9" in unknown.details()
    finally:
        delete(plugin, volume)


def test_node_stage_follows_a_server_whose_nbd_address_changed(cluster):
    """CreateVolume recorded the server's NBD address in the volume_context; the server then
    came back on another port. ControllerPublish reports where it is now, and NodeStage, given
    the stale volume_context and that publish_context, attaches from there."""
    plugin = cluster.plugin
    node = plugin.node_id
    volume = create(plugin, "pv-moved", policy="preferred")
    server = server_of(volume)
    moved = cluster.nbd_address(server, NBD_PORT + 1)
    staging, target = plugin.path("moved", "staging"), plugin.path("moved", "target")
    os.makedirs(staging, exist_ok=True)

    def stage(publish_context):
        plugin.node.NodeStageVolume(csi_pb2.NodeStageVolumeRequest(
            volume_id=volume.volume_id, staging_target_path=staging,
            volume_capability=capability(), volume_context=volume.volume_context,
            publish_context=publish_context), timeout=120)

    try:
        assert volume.volume_context[CTX_NBD_ADDRESS] == cluster.nbd_address(server)
        cluster.stop_server(server)
        cluster.start_server(server, nbd_port=NBD_PORT + 1)
        context = publish(plugin, volume.volume_id, node, volume_context=volume.volume_context)
        assert context[CTX_NBD_ADDRESS] == moved
        # The address from create alone leads nowhere now.
        stale = rpc_error(lambda: stage({}))
        assert stale.code() == grpc.StatusCode.UNAVAILABLE
        assert volume.volume_context[CTX_NBD_ADDRESS] in stale.details()
        stage(context)
        stage(context)  # idempotent: the same attachment
        plugin.node.NodePublishVolume(csi_pb2.NodePublishVolumeRequest(
            volume_id=volume.volume_id, staging_target_path=staging, target_path=target,
            volume_capability=capability(), volume_context=volume.volume_context,
            publish_context=context), timeout=120)
        data = os.urandom(1 << 20)
        with open(Path(target, "moved"), "wb") as out:
            out.write(data)
            os.fsync(out.fileno())
        assert Path(target, "moved").read_bytes() == data
        log = [line for line in plugin.log_lines() if line.get("event") == "nbd helper started"
               and line.get("volume_id") == volume.volume_id]
        assert log, "the volume was not attached through the NBD helpers"
    finally:
        plugin.unpublish_and_unstage(volume.volume_id, "moved")
        unpublish(plugin, volume.volume_id, node)
        cluster.stop_server(server)
        cluster.start_server(server)
    delete(plugin, volume)
