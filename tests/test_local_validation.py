"""Idempotency, concurrency, bad requests and the structured log, against the real plugin.

Bad requests must get the right gRPC code with a message that names what to change, and
must leave nothing behind: no directory in the state dir, no loop device, no mount, and
nothing at all outside the publish root and the state dir.
"""

import json
import os
import subprocess
import threading
import time
from pathlib import Path

import grpc
import pytest

from driver.proto import csi_pb2
from test_local_helpers import (MiB, AccessMode, assert_no_trace, capability, ephemeral_dirs, expect,
                                loops_under, mounts_under, rpc_error, sha256, volume_dirs, write_random)

pytestmark = pytest.mark.root

Code = grpc.StatusCode
EPHEMERAL = "csi.storage.k8s.io/ephemeral"
EiB = 1 << 60


def tree(directory: Path) -> set[str]:
    return {str(p.relative_to(directory)) for p in directory.rglob("*")}


def create_request(name="v", size=64 * MiB, caps=None, parameters=None, limit=0, source=None):
    return csi_pb2.CreateVolumeRequest(
        name=name, capacity_range=csi_pb2.CapacityRange(required_bytes=size, limit_bytes=limit),
        volume_capabilities=[capability()] if caps is None else caps,
        parameters={"type": "local-ephemeral"} if parameters is None else parameters,
        volume_content_source=source)


def no_access_type():
    return csi_pb2.VolumeCapability(access_mode=AccessMode(mode=AccessMode.SINGLE_NODE_WRITER))


def no_access_mode():
    return csi_pb2.VolumeCapability(mount=csi_pb2.VolumeCapability.MountVolume())


MULTI_NODE = [AccessMode.MULTI_NODE_READER_ONLY, AccessMode.MULTI_NODE_SINGLE_WRITER,
              AccessMode.MULTI_NODE_MULTI_WRITER]

# Volume ids a client might send to walk out of the state directory, or to choke the plugin.
HOSTILE_IDS = ["../../etc", "lcl-../../x", "lcl-/../../../etc/passwd", "lcl-" + "0" * 32 + "/..",
               "lcl-" + "a" * 5000, "lcl-\u00e9" * 8, "/etc/passwd", "lcl-snap-../x"]


def check_cases(cases) -> None:
    """Run (label, code, call, request, mentions) cases; report every mismatch at once."""
    failures = []
    for label, code, call, request, mentions in cases:
        try:
            expect(code, call, request, mentions=mentions)
        except AssertionError as failure:
            failures.append(f"{label}: {failure}")
    assert not failures, "\n".join(failures)


@pytest.fixture
def outside(workdir):
    """A directory beside the publish root that no request may touch."""
    directory = workdir / "outside"
    directory.mkdir()
    (directory / "sentinel").write_text("untouched")
    yield directory
    assert sorted(os.listdir(directory)) == ["sentinel"]
    assert (directory / "sentinel").read_text() == "untouched"


# --- 7. idempotency ---

def test_create_volume_twice_is_one_volume(plugin):
    first = plugin.controller.CreateVolume(create_request("same"), timeout=60).volume
    second = plugin.controller.CreateVolume(create_request("same"), timeout=60).volume
    assert first.volume_id == second.volume_id
    assert first.capacity_bytes == second.capacity_bytes == 64 * MiB
    ranged = plugin.controller.CreateVolume(
        create_request("same", size=64 * MiB, limit=64 * MiB), timeout=60).volume
    assert ranged.volume_id == first.volume_id
    expect(Code.ALREADY_EXISTS, plugin.controller.CreateVolume, create_request("same", size=128 * MiB),
           mentions=["same"])
    expect(Code.ALREADY_EXISTS, plugin.controller.CreateVolume,
           create_request("same", caps=[capability(block=False, fs_type="xfs")], size=320 * MiB),
           mentions=["same"])
    assert volume_dirs(plugin) == [first.volume_id]
    listed = plugin.controller.ListVolumes(csi_pb2.ListVolumesRequest(), timeout=60).entries
    assert [e.volume.volume_id for e in listed] == [first.volume_id]
    for _ in range(2):
        plugin.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=first.volume_id), timeout=60)
    # A well-formed id that never existed is as gone as one that did.
    plugin.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id="lcl-" + "0" * 32), timeout=60)
    assert_no_trace(plugin)


@pytest.mark.parametrize("block", [False, True], ids=["mount", "block"])
def test_node_calls_twice_change_nothing(plugin, block):
    volume = plugin.create("twice", size=64 * MiB, block=block)
    staging, target = plugin.path("twice", "staging"), plugin.path("twice", "target")
    os.makedirs(staging)
    cap = capability(block=block)
    stage = csi_pb2.NodeStageVolumeRequest(volume_id=volume.volume_id, staging_target_path=staging,
                                           volume_capability=cap)
    publish = csi_pb2.NodePublishVolumeRequest(volume_id=volume.volume_id, staging_target_path=staging,
                                               target_path=target, volume_capability=cap)
    plugin.node.NodeStageVolume(stage, timeout=60)
    plugin.node.NodePublishVolume(publish, timeout=60)
    loops, mounts = loops_under(plugin.workdir), sorted(mounts_under(plugin.workdir))
    assert len(loops) == 1 and len(mounts) == (1 if block else 2)
    plugin.node.NodeStageVolume(stage, timeout=60)
    plugin.node.NodePublishVolume(publish, timeout=60)
    assert loops_under(plugin.workdir) == loops and sorted(mounts_under(plugin.workdir)) == mounts

    unpublish = csi_pb2.NodeUnpublishVolumeRequest(volume_id=volume.volume_id, target_path=target)
    unstage = csi_pb2.NodeUnstageVolumeRequest(volume_id=volume.volume_id, staging_target_path=staging)
    for _ in range(2):
        plugin.node.NodeUnpublishVolume(unpublish, timeout=60)
    assert not os.path.exists(target)
    for _ in range(2):
        plugin.node.NodeUnstageVolume(unstage, timeout=60)
    assert loops_under(plugin.workdir) == [] and mounts_under(plugin.workdir) == []
    # Paths that never existed, and a volume that never existed: nothing to do is success.
    plugin.node.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(
        volume_id=volume.volume_id, target_path=plugin.path("never", "target")), timeout=60)
    plugin.node.NodeUnstageVolume(csi_pb2.NodeUnstageVolumeRequest(
        volume_id="lcl-" + "f" * 32, staging_target_path=plugin.path("never", "staging")), timeout=60)
    for _ in range(2):
        plugin.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=volume.volume_id), timeout=60)
    assert_no_trace(plugin)


def test_unpublish_takes_off_a_stack_of_mounts(plugin):
    """Mounts stacked on a target (a retried publish elsewhere, an admin's bind) all come off
    with one NodeUnpublishVolume, which reads the mount table once and unmounts that often."""
    volume = plugin.create("stacked", size=64 * MiB)
    target = plugin.stage_and_publish(volume, "stacked")
    staging = plugin.path("stacked", "staging")
    for _ in range(2):
        subprocess.run(["mount", "--bind", staging, target], check=True)
    assert mounts_under(plugin.workdir).count(target) == 3
    plugin.node.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(
        volume_id=volume.volume_id, target_path=target), timeout=60)
    assert target not in mounts_under(plugin.workdir) and not os.path.exists(target)
    plugin.unpublish_and_unstage(volume.volume_id, "stacked")
    plugin.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=volume.volume_id), timeout=60)
    assert_no_trace(plugin)


# --- 7. concurrency ---

def race(*calls):
    """Start every call at the same instant; return each one's status code (and errors)."""
    barrier = threading.Barrier(len(calls))
    results = [None] * len(calls)

    def run(index, call, request):
        barrier.wait()
        try:
            call(request, timeout=120)
            results[index] = (Code.OK, "")
        except grpc.RpcError as error:
            results[index] = (error.code(), error.details())

    threads = [threading.Thread(target=run, args=(i, call, request))
               for i, (call, request) in enumerate(calls)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def test_concurrent_stage_of_one_volume(plugin):
    """Two NodeStage at once (an XFS mkfs makes the first one slow): one wins, the other is told
    to retry, and the volume ends staged once, not twice or half-way."""
    aborted = 0
    calls = 0
    for attempt in range(4):
        name = f"race-{attempt}"
        volume = plugin.create(name, size=320 * MiB, fs_type="xfs")
        staging = plugin.path(name, "staging")
        os.makedirs(staging)
        stage = csi_pb2.NodeStageVolumeRequest(volume_id=volume.volume_id, staging_target_path=staging,
                                               volume_capability=capability(fs_type="xfs"))
        results = race((plugin.node.NodeStageVolume, stage), (plugin.node.NodeStageVolume, stage))
        calls += 2
        codes = sorted(code.name for code, _ in results)
        assert codes in (["OK", "OK"], ["ABORTED", "OK"]), results
        for code, message in results:
            if code == Code.ABORTED:
                aborted += 1
                assert "NodeStageVolume" in message and "retry" in message, message
        assert len(loops_under(plugin.workdir)) == 1
        assert mounts_under(plugin.workdir) == [staging]
        plugin.node.NodeStageVolume(stage, timeout=60)  # the retry the CO makes
        calls += 1
        assert mounts_under(plugin.workdir) == [staging]
        plugin.node.NodeUnstageVolume(csi_pb2.NodeUnstageVolumeRequest(
            volume_id=volume.volume_id, staging_target_path=staging), timeout=60)
        plugin.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=volume.volume_id), timeout=60)
        if aborted:
            break
    assert aborted, "two simultaneous NodeStageVolume calls never collided"
    stage_lines = [line for line in plugin.log_lines()
                   if line.get("event") == "rpc" and line["method"] == "NodeStageVolume"]
    assert len(stage_lines) == calls
    assert sum(line["code"] == "ABORTED" for line in stage_lines) == aborted
    assert_no_trace(plugin)


def test_delete_racing_stage(plugin):
    """DeleteVolume and NodeStage of one volume at once: either order is fine, a torn state
    (a loop device over a deleted file, a volume half in trash) is not."""
    for attempt in range(3):
        name = f"racing-{attempt}"
        volume = plugin.create(name, size=320 * MiB, fs_type="xfs")
        staging = plugin.path(name, "staging")
        os.makedirs(staging)
        stage = csi_pb2.NodeStageVolumeRequest(volume_id=volume.volume_id, staging_target_path=staging,
                                               volume_capability=capability(fs_type="xfs"))
        delete = csi_pb2.DeleteVolumeRequest(volume_id=volume.volume_id)
        (stage_code, _), (delete_code, delete_message) = race(
            (plugin.node.NodeStageVolume, stage), (plugin.controller.DeleteVolume, delete))
        if delete_code == Code.OK:  # the delete went first: during it ABORTED, after it NOT_FOUND
            assert stage_code in (Code.ABORTED, Code.NOT_FOUND)
            assert loops_under(plugin.workdir) == [] and mounts_under(plugin.workdir) == []
        else:
            assert stage_code == Code.OK
            assert delete_code in (Code.ABORTED, Code.FAILED_PRECONDITION), delete_message
            assert len(loops_under(plugin.workdir)) == 1
            assert mounts_under(plugin.workdir) == [staging]
            assert volume_dirs(plugin) == [volume.volume_id]
            Path(staging, "alive").write_text("yes")
            plugin.node.NodeUnstageVolume(csi_pb2.NodeUnstageVolumeRequest(
                volume_id=volume.volume_id, staging_target_path=staging), timeout=60)
            plugin.controller.DeleteVolume(delete, timeout=60)
        assert_no_trace(plugin)


def test_deleting_a_source_while_it_is_copied(plugin):
    """A clone or restore in progress keeps its source: deleting the source volume or
    snapshot meanwhile is refused with ABORTED, and the copy completes intact."""
    source = plugin.create("src", size=512 * MiB, block=True)
    device = plugin.stage_and_publish(source, "src", block=True)
    digest = write_random(device, 384 * MiB, seed=21)
    plugin.unpublish_and_unstage(source.volume_id, "src")
    snapshot = plugin.controller.CreateSnapshot(csi_pb2.CreateSnapshotRequest(
        source_volume_id=source.volume_id, name="src-snap"), timeout=120).snapshot
    volumes = plugin.state_dir / "local" / "volumes"

    for name, content_source, delete_call, delete_request in (
        ("from-volume", csi_pb2.VolumeContentSource(volume=csi_pb2.VolumeContentSource.VolumeSource(
            volume_id=source.volume_id)),
         plugin.controller.DeleteVolume, csi_pb2.DeleteVolumeRequest(volume_id=source.volume_id)),
        ("from-snapshot", csi_pb2.VolumeContentSource(snapshot=csi_pb2.VolumeContentSource.SnapshotSource(
            snapshot_id=snapshot.snapshot_id)),
         plugin.controller.DeleteSnapshot, csi_pb2.DeleteSnapshotRequest(snapshot_id=snapshot.snapshot_id)),
    ):
        outcome = []
        request = create_request(name, size=512 * MiB, caps=[capability(block=True)],
                                 source=content_source)
        def create():
            try:
                outcome.append(plugin.controller.CreateVolume(request, timeout=120).volume)
            except grpc.RpcError as failed:
                outcome.append(failed)

        thread = threading.Thread(target=create)
        thread.start()
        deadline = time.monotonic() + 20
        while not list(volumes.glob("*/disk.img.partial")):
            assert time.monotonic() < deadline, "the copy never started"
            time.sleep(0.002)
        error = rpc_error(delete_call, delete_request)
        thread.join()
        assert not isinstance(outcome[0], grpc.RpcError), outcome[0].details()
        assert error.code() == Code.ABORTED, (error.code(), error.details())
        copy = outcome[0]
        device = plugin.stage_and_publish(copy, name, block=True)
        assert sha256(device, 384 * MiB) == digest
        plugin.unpublish_and_unstage(copy.volume_id, name)
        plugin.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=copy.volume_id), timeout=60)

    plugin.controller.DeleteSnapshot(csi_pb2.DeleteSnapshotRequest(snapshot_id=snapshot.snapshot_id))
    plugin.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=source.volume_id))
    assert_no_trace(plugin)


# --- 8. bad requests: the right code, a message naming the field, and no trace ---

def test_bad_create_volume_requests(plugin, outside):
    before = tree(plugin.state_dir)
    bad = lambda **kw: create_request(**kw)  # noqa: E731
    C = plugin.controller.CreateVolume
    cases = [
        ("empty name", Code.INVALID_ARGUMENT, C, bad(name=""), ["name"]),
        ("no capabilities", Code.INVALID_ARGUMENT, C, bad(caps=[]), ["volume_capabilities"]),
        ("no access type", Code.INVALID_ARGUMENT, C, bad(caps=[no_access_type()]), ["access_type"]),
        ("no access mode", Code.INVALID_ARGUMENT, C, bad(caps=[no_access_mode()]), ["access_mode"]),
        ("fs_type btrfs", Code.INVALID_ARGUMENT, C, bad(caps=[capability(fs_type="btrfs")]),
         ["fs_type", "btrfs"]),
        ("two filesystems", Code.INVALID_ARGUMENT, C,
         bad(caps=[capability(fs_type="ext4"), capability(fs_type="xfs")]), ["ext4", "xfs"]),
        ("fsType parameter", Code.INVALID_ARGUMENT, C,
         bad(parameters={"type": "local-ephemeral", "fsType": "btrfs"}), ["fsType"]),
        ("unknown parameter", Code.INVALID_ARGUMENT, C,
         bad(parameters={"type": "local-ephemeral", "replicaCount": "3"}), ["replicaCount"]),
        ("unknown type", Code.INVALID_ARGUMENT, C, bad(parameters={"type": "nfs"}), ["type", "nfs"]),
        ("bad appReplicas", Code.INVALID_ARGUMENT, C,
         bad(parameters={"type": "local-ephemeral", "appReplicas": "0"}), ["appReplicas"]),
        ("shell in a value", Code.INVALID_ARGUMENT, C,
         bad(parameters={"type": "local-ephemeral", "appReplicas": "1; rm -rf /"}), ["appReplicas"]),
        ("required > limit", Code.OUT_OF_RANGE, C, bad(size=128 * MiB, limit=64 * MiB),
         ["limit_bytes"]),
        ("limit below the minimum", Code.OUT_OF_RANGE, C, bad(size=0, limit=1 * MiB), ["limit_bytes"]),
        ("negative size", Code.OUT_OF_RANGE, C, bad(size=-1), ["negative"]),
        ("1 EiB", Code.RESOURCE_EXHAUSTED, C, bad(size=EiB), [str(EiB)]),
        ("other node", Code.RESOURCE_EXHAUSTED, C, csi_pb2.CreateVolumeRequest(
            name="v", volume_capabilities=[capability()], parameters={"type": "local-ephemeral"},
            accessibility_requirements=csi_pb2.TopologyRequirement(requisite=[csi_pb2.Topology(
                segments={"topology.polyvol.csi.io/node": "elsewhere"})])), ["topology"]),
        ("snapshot source without id", Code.INVALID_ARGUMENT, C, bad(source=csi_pb2.VolumeContentSource(
            snapshot=csi_pb2.VolumeContentSource.SnapshotSource())), ["snapshot"]),
    ]
    for mode in MULTI_NODE:
        cases.append((f"mode {AccessMode.Mode.Name(mode)}", Code.INVALID_ARGUMENT, C,
                      bad(caps=[capability(mode=mode)]), ["access mode"]))
    for hostile in HOSTILE_IDS:
        cases.append((f"snapshot source {hostile[:30]!r}", Code.NOT_FOUND, C,
                      bad(source=csi_pb2.VolumeContentSource(snapshot=csi_pb2.VolumeContentSource.SnapshotSource(
                          snapshot_id=hostile))), ["does not exist"]))
        cases.append((f"volume source {hostile[:30]!r}", Code.NOT_FOUND, C,
                      bad(source=csi_pb2.VolumeContentSource(volume=csi_pb2.VolumeContentSource.VolumeSource(
                          volume_id=hostile))), ["does not exist"]))
    check_cases(cases)
    assert tree(plugin.state_dir) == before
    assert_no_trace(plugin)


def test_bad_controller_requests_on_ids_and_sizes(plugin, outside):
    volume = plugin.create("real", size=64 * MiB)
    before = tree(plugin.state_dir)
    Ctl = plugin.controller
    expand = lambda volume_id=volume.volume_id, size=128 * MiB, limit=0, **kw: \
        csi_pb2.ControllerExpandVolumeRequest(  # noqa: E731
            volume_id=volume_id, capacity_range=csi_pb2.CapacityRange(required_bytes=size,
                                                                      limit_bytes=limit), **kw)
    cases = [
        ("expand: no id", Code.INVALID_ARGUMENT, Ctl.ControllerExpandVolume, expand(volume_id=""),
         ["volume_id"]),
        ("expand: no range", Code.INVALID_ARGUMENT, Ctl.ControllerExpandVolume,
         csi_pb2.ControllerExpandVolumeRequest(volume_id=volume.volume_id), ["capacity_range"]),
        ("expand: 1 EiB", Code.RESOURCE_EXHAUSTED, Ctl.ControllerExpandVolume, expand(size=EiB),
         ["bytes"]),
        ("expand: required > limit", Code.OUT_OF_RANGE, Ctl.ControllerExpandVolume,
         expand(size=256 * MiB, limit=128 * MiB), ["limit_bytes"]),
        ("expand: multi-node", Code.INVALID_ARGUMENT, Ctl.ControllerExpandVolume,
         expand(volume_capability=capability(mode=AccessMode.MULTI_NODE_MULTI_WRITER)), ["access mode"]),
        ("snapshot: no name", Code.INVALID_ARGUMENT, Ctl.CreateSnapshot,
         csi_pb2.CreateSnapshotRequest(source_volume_id=volume.volume_id), ["name"]),
        ("snapshot: no source", Code.INVALID_ARGUMENT, Ctl.CreateSnapshot,
         csi_pb2.CreateSnapshotRequest(name="s"), ["source_volume_id"]),
        ("snapshot: parameters", Code.INVALID_ARGUMENT, Ctl.CreateSnapshot,
         csi_pb2.CreateSnapshotRequest(name="s", source_volume_id=volume.volume_id,
                                       parameters={"class": "gold"}), ["parameters"]),
        ("list volumes: bad token", Code.ABORTED, Ctl.ListVolumes,
         csi_pb2.ListVolumesRequest(starting_token="bogus"), ["starting_token"]),
        ("list volumes: token past the end", Code.ABORTED, Ctl.ListVolumes,
         csi_pb2.ListVolumesRequest(starting_token="99"), ["starting_token"]),
        ("list volumes: negative max", Code.INVALID_ARGUMENT, Ctl.ListVolumes,
         csi_pb2.ListVolumesRequest(max_entries=-1), ["max_entries"]),
        ("list snapshots: bad token", Code.ABORTED, Ctl.ListSnapshots,
         csi_pb2.ListSnapshotsRequest(starting_token="x1"), ["starting_token"]),
        ("get snapshot: no id", Code.INVALID_ARGUMENT, Ctl.GetSnapshot, csi_pb2.GetSnapshotRequest(),
         ["snapshot_id"]),
        ("delete: no id", Code.INVALID_ARGUMENT, Ctl.DeleteVolume, csi_pb2.DeleteVolumeRequest(),
         ["volume_id"]),
    ]
    for hostile in HOSTILE_IDS:
        short = repr(hostile[:30])
        cases += [
            (f"get {short}", Code.NOT_FOUND, Ctl.ControllerGetVolume,
             csi_pb2.ControllerGetVolumeRequest(volume_id=hostile), ["does not exist"]),
            (f"expand {short}", Code.NOT_FOUND, Ctl.ControllerExpandVolume, expand(volume_id=hostile),
             ["does not exist"]),
            (f"snapshot {short}", Code.NOT_FOUND, Ctl.CreateSnapshot,
             csi_pb2.CreateSnapshotRequest(name="s", source_volume_id=hostile), ["does not exist"]),
            (f"get snapshot {short}", Code.NOT_FOUND, Ctl.GetSnapshot,
             csi_pb2.GetSnapshotRequest(snapshot_id=hostile), ["does not exist"]),
        ]
    check_cases(cases)
    # Deleting what is not there succeeds, and deletes nothing else.
    for hostile in HOSTILE_IDS:
        Ctl.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=hostile), timeout=60)
        Ctl.DeleteSnapshot(csi_pb2.DeleteSnapshotRequest(snapshot_id=hostile), timeout=60)
    assert tree(plugin.state_dir) == before
    assert Ctl.ControllerGetVolume(csi_pb2.ControllerGetVolumeRequest(volume_id=volume.volume_id),
                                   timeout=60).volume.capacity_bytes == 64 * MiB
    Ctl.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=volume.volume_id), timeout=60)
    assert_no_trace(plugin)


def test_bad_node_requests(plugin, outside):
    volume = plugin.create("real", size=64 * MiB)
    root = plugin.publish_root
    (root / "escape").symlink_to(outside)  # a directory link out of the root
    (root / "pod").mkdir()
    (root / "pod" / "link").symlink_to(outside / "sentinel")  # the path itself a link
    before = tree(plugin.state_dir)
    staging, target = plugin.path("v", "staging"), plugin.path("v", "target")
    bad_paths = [
        ("relative", "kubelet/v/x", ["absolute"]),
        ("outside", str(outside / "x"), ["outside"]),
        ("dot-dot", plugin.path("v", "..", "..", "outside", "x"), ["normalised"]),
        ("dot-dot inside", plugin.path("v", "..", "w"), ["normalised"]),
        ("symlink parent", str(root / "escape" / "x"), ["outside"]),
        ("symlink itself", str(root / "pod" / "link"), ["symbolic link"]),
        ("the root itself", str(root), ["outside"]),
        ("nul byte", plugin.path("v\0x"), ["absolute"]),
        ("etc", "/etc", ["outside"]),
    ]
    N = plugin.node
    cap = capability()
    stage = lambda volume_id=volume.volume_id, path=staging, **kw: csi_pb2.NodeStageVolumeRequest(  # noqa: E731
        volume_id=volume_id, staging_target_path=path, **({"volume_capability": cap} | kw))
    publish = lambda volume_id=volume.volume_id, path=target, **kw: csi_pb2.NodePublishVolumeRequest(  # noqa: E731
        volume_id=volume_id, staging_target_path=kw.pop("staging", staging), target_path=path,
        **({"volume_capability": cap} | kw))
    cases = [
        ("stage: no id", Code.INVALID_ARGUMENT, N.NodeStageVolume, stage(volume_id=""), ["volume_id"]),
        ("stage: no path", Code.INVALID_ARGUMENT, N.NodeStageVolume, stage(path=""),
         ["staging_target_path"]),
        ("stage: no capability", Code.INVALID_ARGUMENT, N.NodeStageVolume,
         csi_pb2.NodeStageVolumeRequest(volume_id=volume.volume_id, staging_target_path=staging),
         ["volume_capability"]),
        ("stage: no access type", Code.INVALID_ARGUMENT, N.NodeStageVolume,
         stage(volume_capability=no_access_type()), ["access_type"]),
        ("stage: no access mode", Code.INVALID_ARGUMENT, N.NodeStageVolume,
         stage(volume_capability=no_access_mode()), ["access_mode"]),
        ("stage: btrfs", Code.INVALID_ARGUMENT, N.NodeStageVolume,
         stage(volume_capability=capability(fs_type="btrfs")), ["fs_type"]),
        ("publish: no id", Code.INVALID_ARGUMENT, N.NodePublishVolume, publish(volume_id=""),
         ["volume_id"]),
        ("publish: no target", Code.INVALID_ARGUMENT, N.NodePublishVolume, publish(path=""),
         ["target_path"]),
        ("publish: no capability", Code.INVALID_ARGUMENT, N.NodePublishVolume,
         csi_pb2.NodePublishVolumeRequest(volume_id=volume.volume_id, staging_target_path=staging,
                                          target_path=target), ["volume_capability"]),
        ("publish: not staged", Code.FAILED_PRECONDITION, N.NodePublishVolume, publish(),
         ["NodeStageVolume"]),
        ("unpublish: no id", Code.INVALID_ARGUMENT, N.NodeUnpublishVolume,
         csi_pb2.NodeUnpublishVolumeRequest(target_path=target), ["volume_id"]),
        ("unstage: no path", Code.INVALID_ARGUMENT, N.NodeUnstageVolume,
         csi_pb2.NodeUnstageVolumeRequest(volume_id=volume.volume_id), ["staging_target_path"]),
        ("expand: no path", Code.INVALID_ARGUMENT, N.NodeExpandVolume,
         csi_pb2.NodeExpandVolumeRequest(volume_id=volume.volume_id), ["volume_path"]),
        ("stats: no path", Code.INVALID_ARGUMENT, N.NodeGetVolumeStats,
         csi_pb2.NodeGetVolumeStatsRequest(volume_id=volume.volume_id), ["volume_path"]),
    ]
    for mode in MULTI_NODE:
        name = AccessMode.Mode.Name(mode)
        cases += [
            (f"stage: {name}", Code.INVALID_ARGUMENT, N.NodeStageVolume,
             stage(volume_capability=capability(mode=mode)), ["access mode"]),
            (f"publish: {name}", Code.INVALID_ARGUMENT, N.NodePublishVolume,
             publish(volume_capability=capability(mode=mode)), ["access mode"]),
        ]
    for label, path, words in bad_paths:
        cases += [
            (f"stage at {label}", Code.INVALID_ARGUMENT, N.NodeStageVolume, stage(path=path),
             ["staging_target_path", *words]),
            (f"publish at {label}", Code.INVALID_ARGUMENT, N.NodePublishVolume, publish(path=path),
             ["target_path", *words]),
            (f"publish from {label}", Code.INVALID_ARGUMENT, N.NodePublishVolume,
             publish(staging=path), ["staging_target_path", *words]),
            (f"unpublish at {label}", Code.INVALID_ARGUMENT, N.NodeUnpublishVolume,
             csi_pb2.NodeUnpublishVolumeRequest(volume_id=volume.volume_id, target_path=path),
             ["target_path", *words]),
            (f"unstage at {label}", Code.INVALID_ARGUMENT, N.NodeUnstageVolume,
             csi_pb2.NodeUnstageVolumeRequest(volume_id=volume.volume_id, staging_target_path=path),
             ["staging_target_path", *words]),
            (f"inline at {label}", Code.INVALID_ARGUMENT, N.NodePublishVolume,
             csi_pb2.NodePublishVolumeRequest(volume_id="csi-inline", target_path=path,
                                              volume_capability=cap,
                                              volume_context={EPHEMERAL: "true", "size": "64Mi"}),
             ["target_path", *words]),
        ]
    for hostile in HOSTILE_IDS:
        short = repr(hostile[:30])
        cases += [
            (f"stage {short}", Code.NOT_FOUND, N.NodeStageVolume, stage(volume_id=hostile),
             ["does not exist"]),
            (f"publish {short}", Code.NOT_FOUND, N.NodePublishVolume, publish(volume_id=hostile),
             ["does not exist"]),
        ]
    inline = lambda **context: csi_pb2.NodePublishVolumeRequest(  # noqa: E731
        volume_id="csi-inline", target_path=plugin.path("pod", "inline"), volume_capability=cap,
        volume_context={EPHEMERAL: "true", **context})
    cases += [
        ("inline: bad size", Code.INVALID_ARGUMENT, N.NodePublishVolume, inline(size="lots"), ["lots"]),
        ("inline: 1 EiB", Code.RESOURCE_EXHAUSTED, N.NodePublishVolume, inline(size="1048576Ti"),
         ["bytes"]),
        ("inline: btrfs", Code.INVALID_ARGUMENT, N.NodePublishVolume, inline(fsType="btrfs"),
         ["fsType"]),
        ("inline: unknown key", Code.INVALID_ARGUMENT, N.NodePublishVolume, inline(colour="blue"),
         ["colour"]),
        ("inline: other type", Code.INVALID_ARGUMENT, N.NodePublishVolume, inline(type="remote-disk"),
         ["local-ephemeral"]),
        ("inline: block", Code.INVALID_ARGUMENT, N.NodePublishVolume, csi_pb2.NodePublishVolumeRequest(
            volume_id="csi-inline", target_path=plugin.path("pod", "inline"),
            volume_capability=capability(block=True), volume_context={EPHEMERAL: "true"}),
         ["mount"]),
    ]
    check_cases(cases)
    assert tree(plugin.state_dir) == before
    assert not Path(staging).exists() and not Path(target).exists()
    assert not Path(plugin.path("pod", "inline")).exists()
    # What is already gone (or never was) unpublishes and unstages fine, hostile ids included.
    for hostile in HOSTILE_IDS:
        N.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(volume_id=hostile, target_path=target),
                              timeout=60)
        N.NodeUnstageVolume(csi_pb2.NodeUnstageVolumeRequest(volume_id=hostile, staging_target_path=staging),
                            timeout=60)
    assert tree(plugin.state_dir) == before
    plugin.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=volume.volume_id), timeout=60)
    assert_no_trace(plugin)


def test_node_expand_and_stats_stay_inside_the_publish_root(plugin, outside):
    """volume_path comes from the CO like any other path: NodeExpandVolume must not grow (and
    NodeGetVolumeStats must not report) a filesystem outside the publish root or another
    volume's filesystem."""
    first = plugin.create("first", size=64 * MiB)
    other = plugin.create("other", size=320 * MiB, fs_type="xfs")
    plugin.stage_and_publish(first, "first")
    other_target = plugin.stage_and_publish(other, "other", fs_type="xfs")
    N = plugin.node
    expand = lambda path: csi_pb2.NodeExpandVolumeRequest(  # noqa: E731
        volume_id=first.volume_id, volume_path=path,
        capacity_range=csi_pb2.CapacityRange(required_bytes=64 * MiB))
    stats = lambda path: csi_pb2.NodeGetVolumeStatsRequest(  # noqa: E731
        volume_id=first.volume_id, volume_path=path)
    cases = []
    for path in ("/", str(outside), plugin.path("first", "..", "other", "target")):
        cases += [(f"expand at {path}", Code.INVALID_ARGUMENT, N.NodeExpandVolume, expand(path),
                   ["volume_path"]),
                  (f"stats at {path}", Code.INVALID_ARGUMENT, N.NodeGetVolumeStats, stats(path),
                   ["volume_path"])]
    cases += [("expand at another volume", Code.FAILED_PRECONDITION, N.NodeExpandVolume,
               expand(other_target), ["volume_path"]),
              ("stats of another volume", Code.FAILED_PRECONDITION, N.NodeGetVolumeStats,
               stats(other_target), ["volume_path"])]
    check_cases(cases)
    for volume, name in ((first, "first"), (other, "other")):
        plugin.unpublish_and_unstage(volume.volume_id, name)
        plugin.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=volume.volume_id))
    assert_no_trace(plugin)


def test_failed_stage_leaves_nothing_attached(plugin):
    """A NodeStage that fails after attaching must detach again: the kubelet does not call
    NodeUnstage after a failed stage, and an attached volume can never be deleted."""
    volume = plugin.create("wrong-fs", size=64 * MiB)
    plugin.stage_and_publish(volume, "wrong-fs")  # formats it ext4
    plugin.unpublish_and_unstage(volume.volume_id, "wrong-fs")
    staging = plugin.path("wrong-fs", "staging")
    os.makedirs(staging, exist_ok=True)
    expect(Code.FAILED_PRECONDITION, plugin.node.NodeStageVolume, csi_pb2.NodeStageVolumeRequest(
        volume_id=volume.volume_id, staging_target_path=staging,
        volume_capability=capability(fs_type="xfs")), mentions=["ext4", "xfs"])
    assert loops_under(plugin.workdir) == [] and mounts_under(plugin.workdir) == []
    flags = csi_pb2.VolumeCapability(
        mount=csi_pb2.VolumeCapability.MountVolume(mount_flags=["no-such-option"]),
        access_mode=AccessMode(mode=AccessMode.SINGLE_NODE_WRITER))
    rpc_error(plugin.node.NodeStageVolume, csi_pb2.NodeStageVolumeRequest(
        volume_id=volume.volume_id, staging_target_path=staging, volume_capability=flags))
    assert loops_under(plugin.workdir) == [] and mounts_under(plugin.workdir) == []
    # Something else mounted at the staging path: refused, and that mount is left alone.
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "foreign", staging], check=True)
    try:
        expect(Code.FAILED_PRECONDITION, plugin.node.NodeStageVolume, csi_pb2.NodeStageVolumeRequest(
            volume_id=volume.volume_id, staging_target_path=staging, volume_capability=capability()),
            mentions=[staging])
        assert mounts_under(plugin.workdir) == [staging] and loops_under(plugin.workdir) == []
    finally:
        subprocess.run(["umount", staging], check=True)
    # A volume already staged is not detached by a failed repeat.
    plugin.stage_and_publish(volume, "wrong-fs")
    rpc_error(plugin.node.NodeStageVolume, csi_pb2.NodeStageVolumeRequest(
        volume_id=volume.volume_id, staging_target_path=staging,
        volume_capability=capability(fs_type="xfs")))
    assert len(loops_under(plugin.workdir)) == 1 and len(mounts_under(plugin.workdir)) == 2
    plugin.unpublish_and_unstage(volume.volume_id, "wrong-fs")
    plugin.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=volume.volume_id), timeout=60)
    assert_no_trace(plugin)


def test_failed_inline_publish_leaves_nothing(plugin):
    """An inline volume whose publish fails at the last step is removed again: nobody will
    unpublish a volume the kubelet was never told about."""
    target = plugin.path("pods", "pod-x", "inline")
    os.makedirs(target)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "occupied", target], check=True)
    try:
        expect(Code.FAILED_PRECONDITION, plugin.node.NodePublishVolume, csi_pb2.NodePublishVolumeRequest(
            volume_id="csi-occupied", target_path=target, volume_capability=capability(),
            volume_context={EPHEMERAL: "true", "size": "64Mi"}), mentions=[target])
        assert mounts_under(plugin.workdir) == [target]
        assert loops_under(plugin.workdir) == []
        assert volume_dirs(plugin) == [] and ephemeral_dirs(plugin) == []
    finally:
        subprocess.run(["umount", target], check=True)
    assert_no_trace(plugin)


@pytest.mark.parametrize("block", [False, True], ids=["mount", "block"])
def test_single_writer_refuses_a_second_target(plugin, block):
    volume = plugin.create("single", size=64 * MiB, block=block)
    staging = plugin.path("single", "staging")
    os.makedirs(staging)
    cap = capability(block=block, mode=AccessMode.SINGLE_NODE_SINGLE_WRITER)
    plugin.node.NodeStageVolume(csi_pb2.NodeStageVolumeRequest(
        volume_id=volume.volume_id, staging_target_path=staging, volume_capability=cap), timeout=60)
    first, second = plugin.path("pod-a", "vol"), plugin.path("pod-b", "vol")
    publish = lambda target: csi_pb2.NodePublishVolumeRequest(  # noqa: E731
        volume_id=volume.volume_id, staging_target_path=staging, target_path=target,
        volume_capability=cap)
    plugin.node.NodePublishVolume(publish(first), timeout=60)
    plugin.node.NodePublishVolume(publish(first), timeout=60)  # the same target again is fine
    expect(Code.FAILED_PRECONDITION, plugin.node.NodePublishVolume, publish(second),
           mentions=["SINGLE_NODE_SINGLE_WRITER", first])
    assert not Path(second).exists()
    plugin.node.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(
        volume_id=volume.volume_id, target_path=first), timeout=60)
    plugin.node.NodePublishVolume(publish(second), timeout=60)  # free once the first is gone
    plugin.node.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(
        volume_id=volume.volume_id, target_path=second), timeout=60)
    plugin.node.NodeUnstageVolume(csi_pb2.NodeUnstageVolumeRequest(
        volume_id=volume.volume_id, staging_target_path=staging), timeout=60)
    plugin.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=volume.volume_id))
    assert_no_trace(plugin)


# --- 9. the structured log ---

def test_one_log_line_per_rpc_and_no_secrets(plugin):
    secrets = {"userKey": "S3cr3tKey-7f3a9", "password": "hunter2-c0ffee", "admin": "AQBhY2Vw=="}
    made = []  # (method, code, volume) in call order

    def call(stub_method, request, code=Code.OK, volume=""):
        name = stub_method._method.decode().rsplit("/", 1)[-1]
        try:
            stub_method(request, timeout=120)
            got = Code.OK
        except grpc.RpcError as error:
            got = error.code()
        assert got == code, (name, got)
        made.append((name, code.name, volume))

    C, N, I = plugin.controller, plugin.node, plugin.identity
    call(I.GetPluginInfo, csi_pb2.GetPluginInfoRequest())
    call(I.Probe, csi_pb2.ProbeRequest())
    request = create_request("logged", size=64 * MiB)
    request.secrets.update(secrets)
    call(C.CreateVolume, request, volume="logged")
    volume_id = C.CreateVolume(request, timeout=60).volume.volume_id
    made.append(("CreateVolume", "OK", "logged"))
    bad = create_request("logged", size=128 * MiB)
    bad.secrets.update(secrets)
    call(C.CreateVolume, bad, Code.ALREADY_EXISTS, volume="logged")
    bad = create_request("x", parameters={"type": "local-ephemeral", "secret": secrets["password"]})
    bad.secrets.update(secrets)
    call(C.CreateVolume, bad, Code.INVALID_ARGUMENT, volume="x")
    staging, target = plugin.path("l", "staging"), plugin.path("l", "target")
    os.makedirs(staging)
    call(N.NodeStageVolume, csi_pb2.NodeStageVolumeRequest(
        volume_id=volume_id, staging_target_path=staging, volume_capability=capability(),
        secrets=secrets), volume=volume_id)
    call(N.NodePublishVolume, csi_pb2.NodePublishVolumeRequest(
        volume_id=volume_id, staging_target_path=staging, target_path=target,
        volume_capability=capability(), secrets=secrets), volume=volume_id)
    call(C.ControllerExpandVolume, csi_pb2.ControllerExpandVolumeRequest(
        volume_id=volume_id, capacity_range=csi_pb2.CapacityRange(required_bytes=96 * MiB),
        secrets=secrets), volume=volume_id)
    call(N.NodeExpandVolume, csi_pb2.NodeExpandVolumeRequest(
        volume_id=volume_id, volume_path=plugin.path("l", "staging"),
        capacity_range=csi_pb2.CapacityRange(required_bytes=96 * MiB), secrets=secrets),
        Code.OK if _can_grow_mounted_ext4(plugin) else Code.FAILED_PRECONDITION, volume=volume_id)
    call(C.CreateSnapshot, csi_pb2.CreateSnapshotRequest(
        source_volume_id=volume_id, name="logged-snap", secrets=secrets), volume=volume_id)
    snapshot_id = C.ListSnapshots(csi_pb2.ListSnapshotsRequest(), timeout=60).entries[0].snapshot.snapshot_id
    made.append(("ListSnapshots", "OK", ""))
    call(C.DeleteSnapshot, csi_pb2.DeleteSnapshotRequest(snapshot_id=snapshot_id, secrets=secrets),
         volume=snapshot_id)
    call(C.ListVolumes, csi_pb2.ListVolumesRequest(starting_token="nope"), Code.ABORTED)
    call(N.NodeUnpublishVolume, csi_pb2.NodeUnpublishVolumeRequest(volume_id=volume_id, target_path=target),
         volume=volume_id)
    call(N.NodeUnstageVolume, csi_pb2.NodeUnstageVolumeRequest(volume_id=volume_id, staging_target_path=staging),
         volume=volume_id)
    call(C.DeleteVolume, csi_pb2.DeleteVolumeRequest(volume_id=volume_id, secrets=secrets), volume=volume_id)

    raw = plugin.log_path.read_text()
    for value in secrets.values():
        assert value not in raw, f"a secret reached the log: {value}"
        for path in plugin.state_dir.rglob("*"):
            if path.is_file():
                assert value.encode() not in path.read_bytes(), f"a secret reached {path}"
    lines = raw.splitlines()
    parsed = [json.loads(line) for line in lines]  # every line is one JSON object
    rpcs = [entry for entry in parsed if entry.get("event") == "rpc"]
    assert [(e["method"], e["code"], e["volume"]) for e in rpcs] == made
    for entry in rpcs:
        assert isinstance(entry["ms"], (int, float)) and entry["ms"] >= 0
        assert entry["level"] in ("info", "warning", "error") and entry["ts"]
        if entry["code"] != "OK":
            assert entry.get("message"), entry
    assert_no_trace(plugin)


def _can_grow_mounted_ext4(plugin) -> bool:
    status = Path(f"/proc/{plugin.process.pid}/status").read_text()
    effective = next(line for line in status.splitlines() if line.startswith("CapEff:"))
    return bool(int(effective.split()[1], 16) >> 24 & 1)  # CAP_SYS_RESOURCE


def test_rpc_lines_split_command_kernel_and_own_time(plugin):
    """The accounting the lifecycle benchmark relies on: every RPC line carries command_ms
    and kernel_ms; the in-process loop attach and the data file's creation and removal are
    kernel time, logged at debug one line each like a command; ms covers both."""
    volume = plugin.create("accounted", size=64 * MiB)
    plugin.stage_and_publish(volume, "accounted")
    plugin.unpublish_and_unstage(volume.volume_id, "accounted")
    plugin.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=volume.volume_id), timeout=60)
    lines = plugin.log_lines()
    rpcs = {e["method"]: e for e in lines if e.get("event") == "rpc"
            and e["volume"] in ("accounted", volume.volume_id)}
    for entry in rpcs.values():
        assert entry["code"] == "OK"
        assert entry["command_ms"] >= 0 and entry["kernel_ms"] >= 0
        assert entry["ms"] + 0.1 >= entry["command_ms"] + entry["kernel_ms"], entry
        assert entry["cpu_ms"] >= 0 and entry["runq_ms"] >= 0  # the plugin logs at debug
    assert rpcs["NodeStageVolume"]["kernel_ms"] > 0 and rpcs["NodeStageVolume"]["command_ms"] > 0
    assert rpcs["NodeUnstageVolume"]["command_ms"] > 0  # umount
    assert rpcs["NodeUnstageVolume"]["kernel_ms"] > 0  # LOOP_CLR_FD
    assert rpcs["DeleteVolume"]["kernel_ms"] > 0 and rpcs["DeleteVolume"]["command_ms"] == 0
    calls = [e["call"] for e in lines if e.get("event") == "kernel"]
    for call in ("create data file", "LOOP_CONFIGURE", "LOOP_CLR_FD", "unlink data file"):
        assert calls.count(call) == 1, (call, calls)
    configured = next(e for e in lines if e.get("event") == "kernel" and e["call"] == "LOOP_CONFIGURE")
    assert configured["device"].startswith("/dev/loop") and configured["attempts"] >= 1
    assert_no_trace(plugin)
