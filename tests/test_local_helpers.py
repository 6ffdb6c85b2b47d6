"""Helpers shared by the local-ephemeral integration tests (this module holds no tests).

They look at the machine itself (losetup, /proc/self/mountinfo, the state directory), not
at what the plugin says, so a test can tell "the plugin says it cleaned up" from "it did".
"""

import hashlib
import json
import os
import subprocess
from pathlib import Path

import grpc
import pytest

from driver.proto import csi_pb2

MiB = 1 << 20
AccessMode = csi_pb2.VolumeCapability.AccessMode


def loops_under(directory: Path) -> list[str]:
    """Loop devices whose backing file lies below `directory`."""
    listing = subprocess.run(["losetup", "--list", "--json", "-O", "NAME,BACK-FILE"],
                             capture_output=True, text=True, check=True).stdout
    prefix = str(directory) + "/"
    return [loop["name"] for loop in (json.loads(listing)["loopdevices"] if listing.strip() else [])
            if (loop.get("back-file") or "").startswith(prefix)]


def mounts_under(directory: Path) -> list[str]:
    prefix = str(directory) + "/"
    targets = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        target = line.split()[4].encode().decode("unicode_escape")
        if target.startswith(prefix):
            targets.append(target)
    return targets


def volume_dirs(plugin) -> list[str]:
    return sorted(p.name for p in (plugin.state_dir / "local" / "volumes").iterdir())


def snapshot_dirs(plugin) -> list[str]:
    return sorted(p.name for p in (plugin.state_dir / "local" / "snapshots").iterdir())


def trash(plugin) -> list[str]:
    return sorted(p.name for p in (plugin.state_dir / "local" / "trash").iterdir())


def ephemeral_dirs(plugin) -> list[str]:
    return sorted(p.name for p in (plugin.state_dir / "ephemeral").iterdir())


def assert_no_trace(plugin, volumes=True) -> None:
    """Nothing attached, mounted or left in the state dir (volumes too, unless told)."""
    assert loops_under(plugin.workdir) == []
    assert mounts_under(plugin.workdir) == []
    assert trash(plugin) == []
    assert ephemeral_dirs(plugin) == []
    if volumes:
        assert volume_dirs(plugin) == []
        assert snapshot_dirs(plugin) == []


def rpc_error(call, *args, **kwargs) -> grpc.RpcError:
    """Run a stub call that must fail; return its error."""
    with pytest.raises(grpc.RpcError) as caught:
        call(*args, timeout=60, **kwargs)
    return caught.value


def expect(code: grpc.StatusCode, call, *args, mentions=(), **kwargs) -> str:
    """Assert a call fails with `code` and a message naming every string in `mentions`."""
    error = rpc_error(call, *args, **kwargs)
    assert error.code() == code, f"expected {code.name}, got {error.code().name}: {error.details()}"
    message = error.details() or ""
    assert message.strip(), f"{code.name} with an empty message"
    for word in mentions:
        assert word in message, f"message {message!r} does not mention {word!r}"
    return message


def capability(block=False, fs_type="", mode=AccessMode.SINGLE_NODE_WRITER):
    access = AccessMode(mode=mode)
    if block:
        return csi_pb2.VolumeCapability(block=csi_pb2.VolumeCapability.BlockVolume(),
                                        access_mode=access)
    return csi_pb2.VolumeCapability(mount=csi_pb2.VolumeCapability.MountVolume(fs_type=fs_type),
                                    access_mode=access)


def write_random(path: str, size: int, seed: int) -> str:
    """Write `size` pseudo-random bytes (reproducible from `seed`), fsync; return their sha256."""
    digest = hashlib.sha256()
    block = hashlib.sha256(str(seed).encode()).digest() * (MiB // 32)
    with open(path, "wb") as out:
        for index in range(size // MiB):
            chunk = index.to_bytes(8, "little") + block[8:]
            out.write(chunk)
            digest.update(chunk)
        out.flush()
        os.fsync(out.fileno())
    return digest.hexdigest()


def sha256(path: str, size: int | None = None) -> str:
    digest = hashlib.sha256()
    left = size
    with open(path, "rb") as source:
        while left is None or left > 0:
            chunk = source.read(MiB if left is None else min(MiB, left))
            if not chunk:
                break
            digest.update(chunk)
            if left is not None:
                left -= len(chunk)
    return digest.hexdigest()


def uncache(*paths: str) -> None:
    """Make the next read of these files (or block devices) come from the device, not the page
    cache. Per file, not the global drop_caches/sync: those wait on every filesystem of the
    host, and one dead FUSE mount elsewhere would hang the test."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def fio_verify(filename: str, size: str, *extra: str, name: str = "verify") -> dict:
    """Random writes of mixed sizes at queue depth 32 with direct I/O, then a crc32c verify of
    every block; any verify error fails fio (verify_fatal) and so the test. Returns fio's job."""
    argv = ["fio", f"--name={name}", f"--filename={filename}", f"--size={size}",
            "--rw=randwrite", "--bsrange=4k-1m", "--ioengine=libaio", "--iodepth=32",
            "--direct=1", "--verify=crc32c", "--verify_fatal=1", "--do_verify=1",
            "--verify_state_save=0", "--randseed=20261125", "--output-format=json", *extra]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, f"fio failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    report = json.loads(done.stdout[done.stdout.index("{"):])
    job = report["jobs"][0]
    assert job["error"] == 0, job
    return job


def statvfs_bytes(path: str) -> int:
    vfs = os.statvfs(path)
    return vfs.f_blocks * vfs.f_frsize


def block_device_bytes(path: str) -> int:
    done = subprocess.run(["blockdev", "--getsize64", path], capture_output=True, text=True,
                          check=True)
    return int(done.stdout)
