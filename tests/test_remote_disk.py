"""remote-disk end to end: three storage servers and a worker node in their own network
namespaces, the real plugin in the node namespace, real nbdkit/TLS-PSK/qemu-storage-daemon/
nbdfuse/loop on the data path.

Spread groups, a server outage seen as VOLUME_CONDITION, data integrity under parallel writes,
a storage-server crash and restart under fsync'd writes, ids crafted to reach another
server, and ControllerPublish: one node per volume, kept on the storage server, a
publish_context that follows a server whose NBD address changed, and the fence: a volume
moved off a node that is still connected (lost to Kubernetes, not dead) is out of its reach.
"""

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest

from conftest import MiB, Plugin, capability, json_lines
from driver.proto import csi_pb2
from remote_lab import NBD_PORT, RemoteCluster

pytestmark = pytest.mark.root
# Node A's (the module plugin's) --nbd-reconnect-delay, instead of the default 50 s.
NODE_A_RECONNECT_DELAY = 15
# ControllerPublish accepts only node ids the controller knows: besides its own (the plugin
# runs with --role all as "node-test"), two nodes that exist only as names.
NODE_A, NODE_B = "node-a", "node-b"
CTX_NBD_ADDRESS = "polyvol.csi.io/nbd-address"
CTX_NBD_TLS = "polyvol.csi.io/nbd-tls"
CTX_NBD_EXPORT = "polyvol.csi.io/nbd-export"
CTX_READONLY = "polyvol.csi.io/readonly"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("remote")
    # "nodeb": a second worker node, for a node plugin of its own (NODE_B) when a test moves
    # a volume from one node to another.
    with RemoteCluster(workdir, servers=3, extra_nodes=["nodeb"]) as running:
        # A reconnect delay well above the crash test's 5 s outage, and short enough that the
        # fence test's cut-off node A sees its I/O fail within the test.
        plugin = Plugin(workdir, extra_args=[*running.plugin_args, "--nodes", f"{NODE_A},{NODE_B}",
                                             "--nbd-reconnect-delay", str(NODE_A_RECONNECT_DELAY)],
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
    writer = FsyncWriter(Path(target, "log"))
    try:
        time.sleep(2)
        cluster.stop_server(server, sig=signal.SIGKILL)
        time.sleep(5)
        cluster.start_server(server)
        time.sleep(4)
    finally:
        writer.finish()
    records, errors = writer.records, writer.errors
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
                           CTX_NBD_TLS: "true", CTX_READONLY: "false",
                           CTX_NBD_EXPORT: volume.volume_id}  # the first publication: its id
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
        # Another node than before: the volume is exported under a new name (the fence).
        assert re.fullmatch(re.escape(volume.volume_id) + r"\.[0-9a-f]{8}", context_b[CTX_NBD_EXPORT])
        assert context_b == {**context, CTX_READONLY: "true",
                             CTX_NBD_EXPORT: context_b[CTX_NBD_EXPORT]}
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


# --- the fence: a volume moved off a node that still has it ---

def stage_with(plugin, volume, name, publish_context) -> str:
    """NodeStage + NodePublish with the publish_context ControllerPublish returned."""
    staging, target = plugin.path(name, "staging"), plugin.path(name, "target")
    os.makedirs(staging, exist_ok=True)
    plugin.node.NodeStageVolume(csi_pb2.NodeStageVolumeRequest(
        volume_id=volume.volume_id, staging_target_path=staging, volume_capability=capability(),
        volume_context=volume.volume_context, publish_context=publish_context), timeout=120)
    plugin.node.NodePublishVolume(csi_pb2.NodePublishVolumeRequest(
        volume_id=volume.volume_id, staging_target_path=staging, target_path=target,
        volume_capability=capability(), volume_context=volume.volume_context,
        publish_context=publish_context), timeout=120)
    return target


class FsyncWriter:
    """Appends a record and fsyncs it every 50 ms in a thread; keeps what was made durable,
    the errors, and when each fsync returned (the longest gap is the longest stall)."""

    def __init__(self, path: Path):
        self.path, self.records, self.errors, self.done_at = path, [], [], []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        with open(self.path, "ab", buffering=0) as out:
            for number in range(1_000_000):
                if self.stop.is_set():
                    return
                record = f"record {number:08d}\n".encode() * 64
                try:
                    out.write(record)
                    os.fsync(out.fileno())
                except OSError as error:
                    self.errors.append(error)
                    return
                self.records.append(record)
                self.done_at.append(time.monotonic())
                time.sleep(0.05)

    def finish(self) -> float:
        """Stop; return the longest time between two fsyncs, in seconds."""
        self.stop.set()
        self.thread.join(timeout=120)
        assert not self.thread.is_alive(), "the writer hangs"
        return max(b - a for a, b in zip(self.done_at, self.done_at[1:]))


def test_a_volume_moved_off_a_node_that_still_has_it_is_fenced(cluster):
    """Node A stages a volume and writes; Kubernetes then moves the volume to node B while A
    still has it (A is lost to the control plane, not dead): ControllerUnpublish(A),
    ControllerPublish(B). B stages it under the new export name and reads A's data; whatever A
    writes after the move never reaches the server. The server's other volumes, attached on
    A and on B, keep working through the nbdkit restart without an I/O error."""
    plugin = cluster.plugin  # node A: NodeStage as plugin.node_id
    node_a = plugin.node_id
    node_b = Plugin(cluster.workdir / "nodeb", node_id=NODE_B, argv_prefix=cluster.prefix("nodeb"),
                    extra_args=[*cluster.plugin_args, "--role", "node"])
    node_b.start()
    volume = create(plugin, "pv-fence", policy="preferred")
    server = server_of(volume)
    disk = cluster.data_dir(server) / "volumes" / volume.volume_id / "disk.img"
    # Bystanders on the same server (clones are made next to their source), one per node.
    source = csi_pb2.VolumeContentSource(
        volume=csi_pb2.VolumeContentSource.VolumeSource(volume_id=volume.volume_id))
    on_a = plugin.create("pv-fence-a", size=64 * MiB, source=source,
                         parameters={"type": "remote-disk", "spreadPolicy": "preferred"})
    on_b = plugin.create("pv-fence-b", size=64 * MiB, source=source,
                         parameters={"type": "remote-disk", "spreadPolicy": "preferred"})
    assert server_of(on_a) == server_of(on_b) == server
    staged = []  # (plugin, volume id, name) to unstage at the end
    writers, late = [], {}
    try:
        context_a = publish(plugin, volume.volume_id, node_a)
        assert context_a[CTX_NBD_EXPORT] == volume.volume_id
        target_a = stage_with(plugin, volume, "fence-a", context_a)
        staged.append((plugin, volume.volume_id, "fence-a"))
        before = os.urandom(1 << 20)
        with open(Path(target_a, "before"), "wb") as out:
            out.write(before)
            os.fsync(out.fileno())
        for node, name, bystander in ((plugin, "fence-by-a", on_a), (node_b, "fence-by-b", on_b)):
            context = publish(plugin, bystander.volume_id, node.node_id)
            writers.append(FsyncWriter(Path(stage_with(node, bystander, name, context), "log")))
            staged.append((node, bystander.volume_id, name))
        time.sleep(1)

        unpublish(plugin, volume.volume_id, node_a)  # Kubernetes gave up on node A
        started = time.monotonic()
        context_b = publish(plugin, volume.volume_id, NODE_B)
        publish_s = time.monotonic() - started
        moved = context_b[CTX_NBD_EXPORT]
        assert re.fullmatch(re.escape(volume.volume_id) + r"\.[0-9a-f]{8}", moved), moved

        # Node A does not know: it goes on writing (in a thread: its I/O hangs until its NBD
        # client's reconnect delay is over, then fails).
        marker_a = os.urandom(1 << 20)

        def write_on_a():
            try:
                with open(Path(target_a, "after-move"), "wb") as out:
                    out.write(marker_a)
                    os.fsync(out.fileno())
                late["result"] = "written"
            except OSError as error:
                late["result"] = error
            late["ended"] = time.monotonic()
        writer_a = threading.Thread(target=write_on_a, daemon=True)
        writer_a.start()

        target_b = stage_with(node_b, volume, "fence-b", context_b)
        staged.append((node_b, volume.volume_id, "fence-b"))
        assert Path(target_b, "before").read_bytes() == before  # A's data, moved with the volume
        marker_b = os.urandom(1 << 20)
        with open(Path(target_b, "from-b"), "wb") as out:
            out.write(marker_b)
            os.fsync(out.fileno())
        time.sleep(3)
        stalls = [writer.finish() for writer in writers]
        for writer in writers:
            assert not writer.errors, f"a bystander's writer saw {writer.errors}"
        # The listening socket outlives nbdkit, so a reconnect waits in its backlog for the
        # next nbdkit (about 0.1 s) instead of being refused and retried a second later.
        assert max(stalls) < 1.0, stalls
        # Node A is told, through the volume's condition, before its I/O fails.
        for node, volume_id, path, abnormal in ((plugin, volume.volume_id, target_a, True),
                                                 (node_b, volume.volume_id, target_b, False)):
            condition = node.node.NodeGetVolumeStats(csi_pb2.NodeGetVolumeStatsRequest(
                volume_id=volume_id, volume_path=path), timeout=60).volume_condition
            assert condition.abnormal is abnormal, (node.node_id, condition.message)
            if abnormal:
                assert "moved to another node" in condition.message, condition.message

        image = disk.read_bytes()
        assert marker_b[:4096] in image
        assert not reached(marker_a, image), "node A's write reached the server after the move"
        assert late.get("result") != "written", "node A's fsync succeeded after the move"
        assert Path(target_b, "from-b").read_bytes() == marker_b
        assert not Path(target_b, "after-move").exists()
        # Every record a bystander's fsync returned for is there, read back from scratch.
        bystanders, staged[1:3] = staged[1:3], []
        for writer, (node, volume_id, name) in zip(writers, bystanders):
            node.unpublish_and_unstage(volume_id, name)
            bystander = on_a if volume_id == on_a.volume_id else on_b
            target = stage_with(node, bystander, name, publish(plugin, volume_id, node.node_id))
            staged.append((node, volume_id, name))
            assert Path(target, "log").read_bytes() == b"".join(writer.records)
        fence = [line for line in cluster_log(cluster, server)
                 if line.get("event", "").startswith("volume moved to another node while")]
        assert [(f["level"], f["from_node"], f["to_node"], f["export"]) for f in fence] == \
            [("warning", node_a, NODE_B, moved)]
        print(f"\nfence: publish {publish_s:.2f}s, nbdkit restart {fence[0]['restart_ms']} ms, "
              f"bystanders' longest fsync gap {[round(s, 2) for s in stalls]} s")

        # Node A's client cannot reconnect (its export name is gone), so its I/O fails once its
        # reconnect delay is over; the pod's processes end, and A is cleaned up as a node that
        # comes back would be (a process blocked in I/O keeps the mount busy until then).
        writer_a.join(timeout=NODE_A_RECONNECT_DELAY + 30)
        assert not writer_a.is_alive(), "node A's write still hangs past its reconnect delay"
        assert isinstance(late["result"], OSError), late
        failed_after = late["ended"] - started
        assert failed_after < NODE_A_RECONNECT_DELAY + 20, failed_after
        started = time.monotonic()
        plugin.unpublish_and_unstage(volume.volume_id, "fence-a")
        staged.remove((plugin, volume.volume_id, "fence-a"))
        print(f"node A: its write failed ({late['result']}) {failed_after:.0f}s after the move; "
              f"unstaged in {time.monotonic() - started:.1f}s")
        assert not reached(marker_a, disk.read_bytes())
        assert Path(target_b, "before").read_bytes() == before
        assert Path(target_b, "from-b").read_bytes() == marker_b
    finally:
        for writer in writers:
            writer.stop.set()
        if "writer_a" in locals():
            writer_a.join(timeout=NODE_A_RECONNECT_DELAY + 30)  # node A's mount is busy until then
        cleanup = [lambda n=node, v=volume_id, name=name: n.unpublish_and_unstage(v, name)
                   for node, volume_id, name in reversed(staged)]
        cleanup.append(node_b.stop)
        cleanup += [lambda v=each.volume_id, n=node: unpublish(plugin, v, n)
                    for each in (volume, on_a, on_b) for node in (node_a, NODE_B)]
        cleanup += [lambda v=each: delete(plugin, v) for each in (on_a, on_b, volume)]
        failures = []
        for step in cleanup:  # every step, whatever failed before
            try:
                step()
            except Exception as error:  # noqa: BLE001 - reported below
                failures.append(error)
        if failures and sys.exc_info()[0] is None:
            raise failures[0]


def reached(data: bytes, image: bytes) -> bool:
    """Whether any of 16 filesystem blocks spread over `data` is in the volume's image."""
    return any(data[offset:offset + 4096] in image for offset in range(0, len(data), len(data) // 16))


def cluster_log(cluster, server) -> list[dict]:
    return json_lines(cluster.log_path(server))
