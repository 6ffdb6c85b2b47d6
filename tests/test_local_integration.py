"""The local-ephemeral class on real loop devices and filesystems, through the real plugin.

Each test talks CSI to a `polyvol plugin` subprocess (fixture `plugin`) and then checks the
machine itself: data read back byte for byte, sizes from statvfs and blockdev, loop devices
from losetup, mounts from mountinfo, files in the state directory.
"""

import hashlib
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import grpc
import pytest

from driver import state
from driver.proto import csi_pb2
from test_local_helpers import (MiB, assert_no_trace, block_device_bytes, capability,
                                ephemeral_dirs, expect, fio_verify, loops_under,
                                mounts_under, sha256, snapshot_dirs, statvfs_bytes, trash,
                                uncache, volume_dirs, write_random)

pytestmark = pytest.mark.root

EPHEMERAL = "csi.storage.k8s.io/ephemeral"


def delete(plugin, volume_id: str) -> None:
    plugin.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=volume_id), timeout=60)


def teardown(plugin, volume, name: str) -> None:
    plugin.unpublish_and_unstage(volume.volume_id, name)
    delete(plugin, volume.volume_id)


# --- 1. data integrity: fio crc32c verify at queue depth 32, mixed block sizes ---

@pytest.mark.parametrize("kind, volume_size, fio_size", [
    ("ext4", 128 * MiB, "96M"),
    ("xfs", 320 * MiB, "128M"),
    ("block", 128 * MiB, "128M"),
])
def test_fio_verify(plugin, kind, volume_size, fio_size):
    block = kind == "block"
    fs_type = "" if block else kind
    volume = plugin.create(f"fio-{kind}", size=volume_size, block=block, fs_type=fs_type)
    target = plugin.stage_and_publish(volume, kind, block=block, fs_type=fs_type)
    if block:
        assert Path(target).is_block_device()
        assert block_device_bytes(target) == volume_size
        filename = target
    else:
        assert os.path.ismount(target)
        filename = os.path.join(target, "fio.dat")
    job = fio_verify(filename, fio_size)
    written, verified = job["write"]["io_bytes"], job["read"]["io_bytes"]
    assert written >= int(fio_size[:-1]) * MiB * 0.99, job["write"]
    assert verified >= written * 0.99, "fio did not read back what it wrote"
    if block:
        # The same blocks, verified again after the device was released and attached anew.
        plugin.unpublish_and_unstage(volume.volume_id, kind)
        assert loops_under(plugin.workdir) == []
        target = plugin.stage_and_publish(volume, kind, block=True)
        again = fio_verify(target, fio_size, "--verify_only")
        assert again["read"]["io_bytes"] >= written * 0.99, "the second verify read nothing"
    teardown(plugin, volume, kind)
    assert_no_trace(plugin)


# --- 2. persistence: across unstage/restage, and across plugin restarts ---

def test_data_survives_unstage_and_restage(plugin):
    volume = plugin.create("keep", size=64 * MiB)
    target = plugin.stage_and_publish(volume, "keep")
    digest = write_random(os.path.join(target, "data.bin"), 24 * MiB, seed=1)
    Path(target, "note.txt").write_text("still here")
    plugin.unpublish_and_unstage(volume.volume_id, "keep")
    assert not Path(target).exists()
    assert loops_under(plugin.workdir) == [] and mounts_under(plugin.workdir) == []
    # (The unmount dropped the filesystem's cache; the loop device reads its file with O_DIRECT.)
    target = plugin.stage_and_publish(volume, "keep")
    assert sha256(os.path.join(target, "data.bin")) == digest
    assert Path(target, "note.txt").read_text() == "still here"
    teardown(plugin, volume, "keep")
    assert_no_trace(plugin)


def test_restart_while_published_readopts_loop_and_mount(plugin):
    fs_volume = plugin.create("restart-fs", size=64 * MiB)
    block_volume = plugin.create("restart-block", size=64 * MiB, block=True)
    fs_target = plugin.stage_and_publish(fs_volume, "restart-fs")
    block_target = plugin.stage_and_publish(block_volume, "restart-block", block=True)
    fs_digest = write_random(os.path.join(fs_target, "data.bin"), 16 * MiB, seed=2)
    block_digest = write_random(block_target, 16 * MiB, seed=3)
    loops, mounts = sorted(loops_under(plugin.workdir)), sorted(mounts_under(plugin.workdir))
    assert len(loops) == 2

    for kill in (False, True):
        plugin.restart(kill=kill)
        # The kernel kept everything: the restart must not have touched it...
        assert sorted(loops_under(plugin.workdir)) == loops
        assert sorted(mounts_under(plugin.workdir)) == mounts
        # ...and the kubelet's repeated calls after a restart find it and change nothing.
        plugin.stage_and_publish(fs_volume, "restart-fs")
        plugin.stage_and_publish(block_volume, "restart-block", block=True)
        assert sorted(loops_under(plugin.workdir)) == loops
        assert sorted(mounts_under(plugin.workdir)) == mounts
        uncache(os.path.join(fs_target, "data.bin"), block_target)
        assert sha256(os.path.join(fs_target, "data.bin")) == fs_digest
        assert sha256(block_target, 16 * MiB) == block_digest

    plugin.unpublish_and_unstage(fs_volume.volume_id, "restart-fs")
    plugin.unpublish_and_unstage(block_volume.volume_id, "restart-block")
    assert loops_under(plugin.workdir) == []
    assert mounts_under(plugin.workdir) == []
    assert not Path(fs_target).exists() and not Path(block_target).exists()
    # The data outlived two restarts and the detach.
    fs_target = plugin.stage_and_publish(fs_volume, "restart-fs")
    assert sha256(os.path.join(fs_target, "data.bin")) == fs_digest
    teardown(plugin, fs_volume, "restart-fs")
    delete(plugin, block_volume.volume_id)
    assert_no_trace(plugin)


# --- 3. online expansion ---

CAP_SYS_RESOURCE = 24


def has_capability(pid: int, bit: int) -> bool:
    status = Path(f"/proc/{pid}/status").read_text()
    effective = next(line for line in status.splitlines() if line.startswith("CapEff:"))
    return bool(int(effective.split()[1], 16) >> bit & 1)


def df_bytes(path: str) -> int:
    out = subprocess.run(["df", "-B1", "--output=size", path], capture_output=True, text=True,
                         check=True).stdout
    return int(out.split()[-1])


@pytest.mark.parametrize("fs_type, before, after, fill", [
    ("ext4", 64 * MiB, 192 * MiB, 100 * MiB),
    ("xfs", 320 * MiB, 640 * MiB, 360 * MiB),
])
def test_online_expand_mounted(plugin, fs_type, before, after, fill):
    volume = plugin.create(f"grow-{fs_type}", size=before, fs_type=fs_type)
    target = plugin.stage_and_publish(volume, "grow", fs_type=fs_type)
    digest = write_random(os.path.join(target, "data.bin"), 16 * MiB, seed=4)
    size_before = df_bytes(target)
    assert size_before < fill, "the fill below must not fit before the expansion"

    grown = plugin.controller.ControllerExpandVolume(csi_pb2.ControllerExpandVolumeRequest(
        volume_id=volume.volume_id, capacity_range=csi_pb2.CapacityRange(required_bytes=after),
        volume_capability=capability(fs_type=fs_type)), timeout=60)
    assert grown.capacity_bytes == after and grown.node_expansion_required
    node_expand = csi_pb2.NodeExpandVolumeRequest(
        volume_id=volume.volume_id, volume_path=target,
        staging_target_path=plugin.path("grow", "staging"),
        capacity_range=csi_pb2.CapacityRange(required_bytes=after),
        volume_capability=capability(fs_type=fs_type))
    if fs_type == "ext4" and not has_capability(plugin.process.pid, CAP_SYS_RESOURCE):
        # The kernel grows a mounted ext4 only for CAP_SYS_RESOURCE (a privileged pod has it;
        # some sandboxes do not): the plugin must say so, not fail obscurely or half-way...
        expect(grpc.StatusCode.FAILED_PRECONDITION, plugin.node.NodeExpandVolume, node_expand,
               mentions=["CAP_SYS_RESOURCE", "unstage"])
        assert os.path.ismount(target) and df_bytes(target) == size_before
        assert sha256(os.path.join(target, "data.bin")) == digest
        # ...and the way out it names works: a restage grows the filesystem offline.
        plugin.unpublish_and_unstage(volume.volume_id, "grow")
        plugin.stage_and_publish(volume, "grow", fs_type=fs_type)
    node = plugin.node.NodeExpandVolume(node_expand, timeout=60)
    assert node.capacity_bytes == after

    size_after = df_bytes(target)
    assert size_after - size_before >= (after - before) * 0.9, (size_before, size_after)
    assert os.path.ismount(target)
    assert sha256(os.path.join(target, "data.bin")) == digest
    # The new space is really usable, through the published path.
    more = write_random(os.path.join(target, "more.bin"), fill, seed=5)
    uncache(os.path.join(target, "more.bin"))
    assert sha256(os.path.join(target, "more.bin")) == more
    got = plugin.controller.ControllerGetVolume(
        csi_pb2.ControllerGetVolumeRequest(volume_id=volume.volume_id), timeout=60)
    assert got.volume.capacity_bytes == after
    teardown(plugin, volume, "grow")
    assert_no_trace(plugin)


def test_block_expand(plugin):
    volume = plugin.create("grow-block", size=64 * MiB, block=True)
    target = plugin.stage_and_publish(volume, "grow-block", block=True)
    digest = write_random(target, 32 * MiB, seed=6)
    grown = plugin.controller.ControllerExpandVolume(csi_pb2.ControllerExpandVolumeRequest(
        volume_id=volume.volume_id, capacity_range=csi_pb2.CapacityRange(required_bytes=160 * MiB)),
        timeout=60)
    assert grown.capacity_bytes == 160 * MiB
    node = plugin.node.NodeExpandVolume(csi_pb2.NodeExpandVolumeRequest(
        volume_id=volume.volume_id, volume_path=target,
        capacity_range=csi_pb2.CapacityRange(required_bytes=160 * MiB),
        volume_capability=capability(block=True)), timeout=60)
    assert node.capacity_bytes == 160 * MiB
    assert block_device_bytes(target) == 160 * MiB
    # The grown tail is writable through the published device, and the head is intact.
    with open(target, "r+b") as device:
        device.seek(150 * MiB)
        device.write(b"tail" * 1024)
        device.flush()
        os.fsync(device.fileno())
    uncache(target)
    with open(target, "rb") as device:
        device.seek(150 * MiB)
        assert device.read(4096) == b"tail" * 1024
    assert sha256(target, 32 * MiB) == digest
    teardown(plugin, volume, "grow-block")
    assert_no_trace(plugin)


# --- 4. snapshots, restores and clones ---

def snapshot_source(snapshot_id: str):
    return csi_pb2.VolumeContentSource(
        snapshot=csi_pb2.VolumeContentSource.SnapshotSource(snapshot_id=snapshot_id))


def volume_source(volume_id: str):
    return csi_pb2.VolumeContentSource(
        volume=csi_pb2.VolumeContentSource.VolumeSource(volume_id=volume_id))


@pytest.mark.parametrize("fs_type, size", [("ext4", 64 * MiB), ("xfs", 320 * MiB)])
def test_snapshot_restore_and_clone(plugin, fs_type, size):
    source = plugin.create("origin", size=size, fs_type=fs_type)
    target = plugin.stage_and_publish(source, "origin", fs_type=fs_type)
    then = write_random(os.path.join(target, "data.bin"), 16 * MiB, seed=7)

    # Taken while the volume is mounted and in use.
    snapshot = plugin.controller.CreateSnapshot(csi_pb2.CreateSnapshotRequest(
        source_volume_id=source.volume_id, name="snap-1"), timeout=120).snapshot
    assert snapshot.ready_to_use and snapshot.size_bytes == size
    assert snapshot.source_volume_id == source.volume_id
    again = plugin.controller.CreateSnapshot(csi_pb2.CreateSnapshotRequest(
        source_volume_id=source.volume_id, name="snap-1"), timeout=120).snapshot
    assert again.snapshot_id == snapshot.snapshot_id

    now = write_random(os.path.join(target, "data.bin"), 16 * MiB, seed=8)
    Path(target, "later.txt").write_text("after the snapshot")
    assert now != then

    # Restore into twice the size: the snapshot-time data, on a larger filesystem.
    restored = plugin.create("restored", size=2 * size, fs_type=fs_type,
                             source=snapshot_source(snapshot.snapshot_id))
    assert restored.capacity_bytes == 2 * size
    assert restored.content_source.snapshot.snapshot_id == snapshot.snapshot_id
    restored_target = plugin.stage_and_publish(restored, "restored", fs_type=fs_type)
    assert sha256(os.path.join(restored_target, "data.bin")) == then
    assert not Path(restored_target, "later.txt").exists()
    assert statvfs_bytes(restored_target) > statvfs_bytes(target) * 1.8

    # A clone of the live (mounted) volume holds what the volume holds now.
    clone = plugin.create("clone", size=size, fs_type=fs_type, source=volume_source(source.volume_id))
    assert clone.content_source.volume.volume_id == source.volume_id
    clone_target = plugin.stage_and_publish(clone, "clone", fs_type=fs_type)
    assert sha256(os.path.join(clone_target, "data.bin")) == now
    assert Path(clone_target, "later.txt").read_text() == "after the snapshot"
    # Three independent copies: writing one changes no other.
    Path(clone_target, "later.txt").write_text("clone only")
    assert Path(target, "later.txt").read_text() == "after the snapshot"

    # Listing and lookup.
    listed = plugin.controller.ListSnapshots(csi_pb2.ListSnapshotsRequest(), timeout=60).entries
    assert [e.snapshot.snapshot_id for e in listed] == [snapshot.snapshot_id]
    by_id = plugin.controller.ListSnapshots(
        csi_pb2.ListSnapshotsRequest(snapshot_id=snapshot.snapshot_id), timeout=60).entries
    assert len(by_id) == 1 and by_id[0].snapshot.source_volume_id == source.volume_id
    by_source = plugin.controller.ListSnapshots(
        csi_pb2.ListSnapshotsRequest(source_volume_id=source.volume_id), timeout=60).entries
    assert len(by_source) == 1
    assert not plugin.controller.ListSnapshots(
        csi_pb2.ListSnapshotsRequest(source_volume_id=clone.volume_id), timeout=60).entries
    got = plugin.controller.GetSnapshot(
        csi_pb2.GetSnapshotRequest(snapshot_id=snapshot.snapshot_id), timeout=60).snapshot
    assert (got.snapshot_id, got.size_bytes, got.ready_to_use) == (snapshot.snapshot_id, size, True)
    expect(grpc.StatusCode.ALREADY_EXISTS, plugin.controller.CreateSnapshot,
           csi_pb2.CreateSnapshotRequest(source_volume_id=clone.volume_id, name="snap-1"),
           mentions=["snap-1"])
    expect(grpc.StatusCode.OUT_OF_RANGE, plugin.controller.CreateVolume, csi_pb2.CreateVolumeRequest(
        name="too-small", capacity_range=csi_pb2.CapacityRange(required_bytes=size // 2),
        volume_capabilities=[capability(fs_type=fs_type)], parameters={"type": "local-ephemeral"},
        volume_content_source=snapshot_source(snapshot.snapshot_id)))

    # Deleting the snapshot leaves the volume restored from it intact.
    plugin.controller.DeleteSnapshot(csi_pb2.DeleteSnapshotRequest(snapshot_id=snapshot.snapshot_id))
    plugin.controller.DeleteSnapshot(csi_pb2.DeleteSnapshotRequest(snapshot_id=snapshot.snapshot_id))
    expect(grpc.StatusCode.NOT_FOUND, plugin.controller.GetSnapshot,
           csi_pb2.GetSnapshotRequest(snapshot_id=snapshot.snapshot_id))
    assert not plugin.controller.ListSnapshots(csi_pb2.ListSnapshotsRequest(), timeout=60).entries
    assert snapshot_dirs(plugin) == []
    uncache(os.path.join(restored_target, "data.bin"))
    assert sha256(os.path.join(restored_target, "data.bin")) == then

    for volume, name in ((source, "origin"), (restored, "restored"), (clone, "clone")):
        teardown(plugin, volume, name)
    assert_no_trace(plugin)


# --- 5. CSI inline ephemeral volumes ---

def test_inline_ephemeral_volume(plugin):
    target = plugin.path("pods", "pod-1", "volumes", "inline")
    request = csi_pb2.NodePublishVolumeRequest(
        volume_id="csi-4f1c2d", target_path=target, volume_capability=capability(),
        volume_context={EPHEMERAL: "true", "size": "64Mi",
                        "csi.storage.k8s.io/pod.name": "pod-1"})
    plugin.node.NodePublishVolume(request, timeout=120)
    assert os.path.ismount(target)
    assert 48 * MiB < statvfs_bytes(target) <= 64 * MiB
    digest = write_random(os.path.join(target, "scratch.bin"), 8 * MiB, seed=9)
    assert len(loops_under(plugin.workdir)) == 1
    assert len(volume_dirs(plugin)) == 1 and len(ephemeral_dirs(plugin)) == 1
    # The kubelet repeats a publish it is not sure of: nothing changes, nothing is lost.
    plugin.node.NodePublishVolume(request, timeout=120)
    assert len(loops_under(plugin.workdir)) == 1
    assert sha256(os.path.join(target, "scratch.bin")) == digest
    stats = plugin.node.NodeGetVolumeStats(csi_pb2.NodeGetVolumeStatsRequest(
        volume_id="csi-4f1c2d", volume_path=target), timeout=60)
    assert stats.usage[0].used >= 8 * MiB and not stats.volume_condition.abnormal

    # The plugin restarts while the pod runs; the unpublish still finds and removes it all.
    plugin.restart()
    assert os.path.ismount(target) and sha256(os.path.join(target, "scratch.bin")) == digest
    unpublish = csi_pb2.NodeUnpublishVolumeRequest(volume_id="csi-4f1c2d", target_path=target)
    plugin.node.NodeUnpublishVolume(unpublish, timeout=120)
    assert not Path(target).exists()
    assert loops_under(plugin.workdir) == []
    assert_no_trace(plugin)
    plugin.node.NodeUnpublishVolume(unpublish, timeout=120)
    # A new pod with the same volume handle gets a fresh, empty volume.
    plugin.node.NodePublishVolume(request, timeout=120)
    assert os.listdir(target) == ["lost+found"]
    plugin.node.NodeUnpublishVolume(unpublish, timeout=120)
    assert_no_trace(plugin)


# --- 6. crashes in the middle of an operation ---

def children_of(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(c) for c in (task / "children").read_text().split()]
    return found


def crash(plugin) -> None:
    """kill -9 the plugin and whatever it is running, as a container runtime kills a cgroup."""
    pid = plugin.process.pid
    helpers = children_of(pid)
    os.kill(pid, signal.SIGSTOP)  # hold it still while its helpers die first
    helpers += [c for c in children_of(pid) if c not in helpers]
    for child in helpers:
        try:
            os.kill(child, signal.SIGKILL)
        except ProcessLookupError:
            pass
    plugin.stop(kill=True)
    deadline = time.monotonic() + 10
    while any(Path(f"/proc/{c}").exists() for c in helpers) and time.monotonic() < deadline:
        time.sleep(0.02)


def record(plugin, volume_id: str) -> dict:
    return state.read(plugin.state_dir / "local" / "volumes" / volume_id / "meta.json")


def list_volume_ids(plugin) -> list[str]:
    entries = plugin.controller.ListVolumes(csi_pb2.ListVolumesRequest(), timeout=60).entries
    return [e.volume.volume_id for e in entries]


def test_kill_during_clone_copy_then_retry(plugin):
    source = plugin.create("big-source", size=512 * MiB, block=True)
    device = plugin.stage_and_publish(source, "big-source", block=True)
    digest = write_random(device, 384 * MiB, seed=10)  # real data: the copy takes a while
    plugin.unpublish_and_unstage(source.volume_id, "big-source")

    clone_request = csi_pb2.CreateVolumeRequest(
        name="big-clone", capacity_range=csi_pb2.CapacityRange(required_bytes=512 * MiB),
        volume_capabilities=[capability(block=True)], parameters={"type": "local-ephemeral"},
        volume_content_source=volume_source(source.volume_id))
    outcome = []
    controller = plugin.controller

    def create():
        try:
            outcome.append(controller.CreateVolume(clone_request, timeout=120))
        except grpc.RpcError as error:
            outcome.append(error)

    thread = threading.Thread(target=create)
    thread.start()
    volumes = plugin.state_dir / "local" / "volumes"
    deadline = time.monotonic() + 20
    while not list(volumes.glob("*/disk.img.partial")):
        assert time.monotonic() < deadline, "the clone copy never started"
        time.sleep(0.002)
    crash(plugin)
    thread.join()
    assert isinstance(outcome[0], grpc.RpcError), "the copy finished before the crash"
    clone_id = next(d for d in volume_dirs(plugin) if d != source.volume_id)
    assert record(plugin, clone_id)["state"] == "creating"

    plugin.start()
    assert list(volumes.glob("*/*.partial")) == []
    assert list_volume_ids(plugin) == [source.volume_id]  # a half-made volume is not a volume
    expect(grpc.StatusCode.NOT_FOUND, plugin.controller.ControllerGetVolume,
           csi_pb2.ControllerGetVolumeRequest(volume_id=clone_id))

    clone = plugin.controller.CreateVolume(clone_request, timeout=120).volume
    assert clone.volume_id == clone_id and clone.capacity_bytes == 512 * MiB
    assert record(plugin, clone_id)["state"] == "ready"
    assert sorted(list_volume_ids(plugin)) == sorted([source.volume_id, clone_id])
    assert sorted(volume_dirs(plugin)) == sorted([source.volume_id, clone_id])
    device = plugin.stage_and_publish(clone, "big-clone", block=True)
    assert sha256(device, 384 * MiB) == digest
    plugin.unpublish_and_unstage(clone.volume_id, "big-clone")
    delete(plugin, clone.volume_id)
    delete(plugin, source.volume_id)
    assert_no_trace(plugin)


def test_retry_create_after_crash_before_the_data_file(plugin):
    """The states a crash leaves between mkdir and the end of CreateVolume, made by hand."""
    plugin.stop(kill=True)
    volumes = plugin.state_dir / "local" / "volumes"
    # (a) killed right after mkdir: a directory with nothing in it.
    bare = volumes / ("lcl-" + hashlib.sha256(b"bare").hexdigest()[:32])
    bare.mkdir()
    # (b) killed while the sparse file was being made: a "creating" record and a .partial.
    half_id = "lcl-" + hashlib.sha256(b"half").hexdigest()[:32]
    (volumes / half_id).mkdir()
    state.write_atomic(volumes / half_id / "meta.json", {
        "volume_id": half_id, "name": "half", "size_bytes": 64 * MiB,
        "parameters": {"type": "local-ephemeral", "fsType": "ext4", "appReplicas": "1"},
        "state": "creating", "node_id": plugin.node_id, "source_snapshot_id": "",
        "source_volume_id": "", "created_at": time.time()})
    (volumes / half_id / "disk.img.partial").write_bytes(b"\1" * 4096)
    plugin.start()
    assert not (volumes / half_id / "disk.img.partial").exists()
    assert list_volume_ids(plugin) == []

    for name, expected_id in (("bare", bare.name), ("half", half_id)):
        volume = plugin.create(name, size=64 * MiB)
        assert volume.volume_id == expected_id
        assert record(plugin, expected_id)["state"] == "ready"
        target = plugin.stage_and_publish(volume, name)
        Path(target, "ok").write_text(name)
        plugin.unpublish_and_unstage(volume.volume_id, name)
    assert sorted(list_volume_ids(plugin)) == sorted([bare.name, half_id])
    for volume_id in (bare.name, half_id):
        delete(plugin, volume_id)
    assert_no_trace(plugin)


def test_retry_delete_after_crash(plugin):
    volume = plugin.create("doomed", size=64 * MiB)
    keeper = plugin.create("keeper", size=64 * MiB)
    plugin.stop(kill=True)
    # DeleteVolume renames the directory into trash/ and then removes it: crash in between,
    # with the removal half done.
    doomed = plugin.state_dir / "local" / "trash" / f"{volume.volume_id}.12345"
    os.rename(plugin.state_dir / "local" / "volumes" / volume.volume_id, doomed)
    (doomed / "meta.json").unlink()
    plugin.start()
    assert trash(plugin) == []
    assert volume_dirs(plugin) == [keeper.volume_id]
    delete(plugin, volume.volume_id)  # the CO retries: already gone is success
    expect(grpc.StatusCode.NOT_FOUND, plugin.controller.ControllerGetVolume,
           csi_pb2.ControllerGetVolumeRequest(volume_id=volume.volume_id))
    assert list_volume_ids(plugin) == [keeper.volume_id]
    delete(plugin, keeper.volume_id)
    assert_no_trace(plugin)


def test_crash_left_by_another_request_is_not_reused(plugin):
    """A half-made volume from a request that was never answered must not hand its data (or
    its size) to a later, different request under the same name."""
    secret = plugin.create("tenant-a", size=64 * MiB, block=True)
    device = plugin.stage_and_publish(secret, "tenant-a", block=True)
    write_random(device, 8 * MiB, seed=31)
    plugin.unpublish_and_unstage(secret.volume_id, "tenant-a")
    plugin.stop(kill=True)
    volumes = plugin.state_dir / "local" / "volumes"
    # Killed after a clone of tenant-a was copied into place, before it was marked ready.
    half_id = "lcl-" + hashlib.sha256(b"reused").hexdigest()[:32]
    (volumes / half_id).mkdir()
    subprocess.run(["cp", "--sparse=always", volumes / secret.volume_id / "disk.img",
                    volumes / half_id / "disk.img"], check=True)
    os.truncate(volumes / half_id / "disk.img", 128 * MiB)
    stored = state.read(volumes / secret.volume_id / "meta.json")
    state.write_atomic(volumes / half_id / "meta.json", {
        **stored, "volume_id": half_id, "name": "reused", "size_bytes": 128 * MiB,
        "state": "creating", "source_volume_id": secret.volume_id})
    plugin.start()

    fresh = plugin.create("reused", size=64 * MiB, block=True)  # no source, smaller
    assert fresh.volume_id == half_id and fresh.capacity_bytes == 64 * MiB
    assert not fresh.HasField("content_source")
    device = plugin.stage_and_publish(fresh, "reused", block=True)
    assert block_device_bytes(device) == 64 * MiB
    with open(device, "rb") as blank:
        assert blank.read(8 * MiB) == bytes(8 * MiB), "a new volume holds another volume's data"
    plugin.unpublish_and_unstage(fresh.volume_id, "reused")
    delete(plugin, fresh.volume_id)
    delete(plugin, secret.volume_id)
    assert_no_trace(plugin)
