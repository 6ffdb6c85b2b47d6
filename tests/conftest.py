"""Shared fixtures: a real polyvol plugin process on a unix socket, and CSI helpers.

The plugin runs as a subprocess (exactly as a user starts it), with its state directory,
socket and publish root inside a per-test temporary directory. Teardown unmounts whatever
is left under that directory, detaches loop devices backed by its files and removes it, so
a failing test still leaves the machine clean.
"""

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
import pytest

from driver.proto import csi_pb2, csi_pb2_grpc

REPO = Path(__file__).resolve().parent.parent
AccessMode = csi_pb2.VolumeCapability.AccessMode
MiB = 1 << 20


class Plugin:
    """A running `polyvol plugin`, with CSI stubs connected to it."""

    def __init__(self, workdir: Path, extra_args=(), node_id: str = "node-test", argv_prefix=()):
        self.workdir = workdir
        self.node_id = node_id
        self.state_dir = workdir / "state"
        self.publish_root = workdir / "kubelet"
        self.publish_root.mkdir(parents=True, exist_ok=True)
        self.socket = workdir / "csi.sock"
        self.endpoint = f"unix://{self.socket}"
        self.log_path = workdir / "plugin.log"
        self.extra_args = list(extra_args)
        self.argv_prefix = list(argv_prefix)  # e.g. nsenter into a test network namespace
        self.process = None
        self.channel = None

    def start(self) -> None:
        argv = [*self.argv_prefix, sys.executable, "-m", "driver.cli", "plugin", "--endpoint", self.endpoint,
                "--node-id", self.node_id, "--state-dir", str(self.state_dir),
                "--publish-root", str(self.publish_root), "--default-type", "local-ephemeral",
                "--log-level", "debug", *self.extra_args]
        log = open(self.log_path, "a")
        self.process = subprocess.Popen(argv, stdout=log, stderr=log, cwd=REPO)
        deadline = time.monotonic() + 20
        while not self.socket.exists():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"plugin did not start:\n{self.log_path.read_text()[-3000:]}")
            time.sleep(0.05)
        self.channel = grpc.insecure_channel(self.endpoint)
        grpc.channel_ready_future(self.channel).result(timeout=20)
        self.identity = csi_pb2_grpc.IdentityStub(self.channel)
        self.controller = csi_pb2_grpc.ControllerStub(self.channel)
        self.node = csi_pb2_grpc.NodeStub(self.channel)

    def stop(self, kill: bool = False) -> None:
        if self.channel is not None:
            self.channel.close()
            self.channel = None
        if self.process is not None and self.process.poll() is None:
            if kill:
                self.process.kill()
            else:
                self.process.terminate()
            self.process.wait(timeout=30)
        self.process = None

    def restart(self, kill: bool = False) -> None:
        self.stop(kill=kill)
        self.start()

    def log_lines(self) -> list[dict]:
        return json_lines(self.log_path)

    # --- CSI helpers used by many tests ---
    def path(self, *parts: str) -> str:
        return str(self.publish_root.joinpath(*parts))

    def create(self, name: str, size: int = 64 * MiB, block: bool = False, fs_type: str = "",
               parameters=None, source=None) -> csi_pb2.Volume:
        params = {"type": "local-ephemeral", **(parameters or {})}
        return self.controller.CreateVolume(csi_pb2.CreateVolumeRequest(
            name=name, capacity_range=csi_pb2.CapacityRange(required_bytes=size),
            volume_capabilities=[capability(block, fs_type)], parameters=params,
            volume_content_source=source), timeout=120).volume

    def stage_and_publish(self, volume: csi_pb2.Volume, name: str, block: bool = False,
                          fs_type: str = "", readonly: bool = False) -> str:
        staging, target = self.path(name, "staging"), self.path(name, "target")
        os.makedirs(staging, exist_ok=True)
        cap = capability(block, fs_type, readonly)
        self.node.NodeStageVolume(csi_pb2.NodeStageVolumeRequest(
            volume_id=volume.volume_id, staging_target_path=staging, volume_capability=cap,
            volume_context=volume.volume_context), timeout=120)
        self.node.NodePublishVolume(csi_pb2.NodePublishVolumeRequest(
            volume_id=volume.volume_id, staging_target_path=staging, target_path=target,
            volume_capability=cap, readonly=readonly, volume_context=volume.volume_context),
            timeout=120)
        return target

    def unpublish_and_unstage(self, volume_id: str, name: str) -> None:
        self.node.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(
            volume_id=volume_id, target_path=self.path(name, "target")), timeout=120)
        self.node.NodeUnstageVolume(csi_pb2.NodeUnstageVolumeRequest(
            volume_id=volume_id, staging_target_path=self.path(name, "staging")), timeout=120)


def capability(block: bool = False, fs_type: str = "", readonly: bool = False):
    mode = AccessMode(mode=AccessMode.SINGLE_NODE_READER_ONLY if readonly
                      else AccessMode.SINGLE_NODE_WRITER)
    if block:
        return csi_pb2.VolumeCapability(block=csi_pb2.VolumeCapability.BlockVolume(), access_mode=mode)
    return csi_pb2.VolumeCapability(mount=csi_pb2.VolumeCapability.MountVolume(fs_type=fs_type),
                                    access_mode=mode)


def json_lines(path: Path) -> list[dict]:
    """The JSON log lines of a polyvol process's log file (other lines skipped; [] when the
    file does not exist yet)."""
    if not path.exists():
        return []
    lines = []
    for raw in path.read_text().splitlines():
        try:
            lines.append(json.loads(raw))
        except json.JSONDecodeError:
            pass
    return lines


def timed(fn, *args, **kwargs):
    """fn(*args, **kwargs) and the seconds it took."""
    started = time.monotonic()
    result = fn(*args, **kwargs)
    return result, time.monotonic() - started


def attach_helper_pids(marker: str) -> list[int]:
    """Live qemu-storage-daemon / nbdfuse processes whose command line contains `marker` (a
    state directory: the attach helpers name their volume's directory in their arguments)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().decode(errors="replace")
            status = Path(f"/proc/{entry}/stat").read_text().rpartition(")")[2].split()[0]
        except OSError:
            continue
        if status != "Z" and ("qemu-storage-daemon" in argv or "nbdfuse" in argv) \
                and marker in argv:
            pids.append(int(entry))
    return pids


def clean_up_below(directory: Path) -> None:
    """Detach loop devices backed by files below `directory`, then unmount everything below it
    (deepest first). Loops go first: a loop over an nbdfuse file loses its backing path once
    the FUSE mount is gone, and could no longer be recognised as ours."""
    prefix = str(directory) + "/"
    listing = subprocess.run(["losetup", "--list", "--json", "-O", "NAME,BACK-FILE"],
                             capture_output=True, text=True, check=False).stdout
    for loop in (json.loads(listing)["loopdevices"] if listing.strip() else []):
        if (loop.get("back-file") or "").startswith(prefix):
            # Still mounted? Then the kernel frees it (autoclear) at the unmount below.
            subprocess.run(["losetup", "-d", loop["name"]], check=False, capture_output=True)
    for _ in range(5):
        targets = [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()
                   if line.split()[4].startswith(prefix)]
        if not targets:
            break
        for target in sorted(targets, key=len, reverse=True):
            subprocess.run(["umount", "-l", target], check=False, capture_output=True)


@pytest.fixture
def workdir():
    directory = Path(tempfile.mkdtemp(prefix="polyvol-test-"))
    try:
        yield directory
    finally:
        clean_up_below(directory)
        subprocess.run(["rm", "-rf", "--one-file-system", str(directory)], check=False)


@pytest.fixture
def plugin(workdir):
    running = Plugin(workdir)
    running.start()
    try:
        yield running
    finally:
        running.stop()
