"""The filesystem layer, shared by every backend: format, mount, bind, grow, stats.

Every step is "make it so": it looks at what the kernel has (mountinfo, blkid) and only
acts on the difference, so a retried or interrupted RPC converges on the same state.
"""

import contextlib
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

from . import command
from .errors import CommandFailed, FailedPrecondition, InvalidArgument

SUPPORTED_FS = ("ext4", "xfs")
# mkfs.xfs in Debian 12 refuses filesystems smaller than 300 MiB.
MIN_FS_BYTES = {"ext4": 16 << 20, "xfs": 300 << 20}
UMOUNT_ATTEMPTS = 8


@dataclass(frozen=True)
class Mount:
    mount_id: int
    device: str  # "major:minor"
    root: str  # the path inside the source filesystem (bind mounts of a subdirectory)
    target: str
    options: str
    fstype: str
    source: str


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo octal. Only those: other
    # bytes (UTF-8 names) are left as they are, so "unicode_escape" would garble them.
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), field) if "\\" in field else field


def _escape(path: str) -> str:
    """A path as mountinfo writes it (the inverse of `_unescape`)."""
    for char in "\\ \t\n":
        if char in path:
            path = path.replace(char, f"\\{ord(char):03o}")
    return path


def _read_mountinfo() -> str:
    with open("/proc/self/mountinfo") as table:
        return table.read()


def mounts(mountinfo: str | None = None) -> list[Mount]:
    """Every mount in this process's namespace; `mountinfo` is that file's text (tests pass their own)."""
    return _parse((_read_mountinfo() if mountinfo is None else mountinfo).splitlines())


def _parse(lines) -> list[Mount]:
    result = []
    for line in lines:
        left, _, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        result.append(Mount(int(fields[0]), fields[2], _unescape(fields[3]), _unescape(fields[4]),
                            fields[5], tail[0], _unescape(tail[1]) if len(tail) > 1 else ""))
    return result


def _mounts_with(needle: str) -> list[Mount]:
    """The mounts whose mountinfo line contains `needle`: a node has hundreds of mounts and a
    lookup wants one or two, so only the lines that can match are parsed (the caller still
    checks the field it wanted)."""
    text = _read_mountinfo()
    if needle not in text:
        return []
    return _parse(line for line in text.splitlines() if needle in line)


def mounts_at(target: str) -> list[Mount]:
    target = os.path.normpath(target)
    return [m for m in _mounts_with(f" {_escape(target)} ") if m.target == target]


def is_mounted(target: str) -> bool:
    return bool(mounts_at(target))


def device_number(device: str) -> str:
    st = os.stat(device)
    return f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"


def mounts_of_device(device: str) -> list[Mount]:
    number = device_number(device)
    return [m for m in _mounts_with(f" {number} ") if m.device == number]


def probe_fs(device: str) -> str | None:
    """The filesystem type on a block device, or None when it is blank."""
    found = command.run(["blkid", "-p", "-o", "value", "-s", "TYPE", device], ok_codes=(0, 2))
    return found.stdout.strip() or None


def ensure_formatted(device: str, fstype: str) -> bool:
    """Make a `fstype` filesystem on a blank device; True when this call made it (it then
    fills the device: nothing to grow), False when the device already had one."""
    existing = probe_fs(device)
    if existing == fstype:
        return False
    if existing is not None:
        raise FailedPrecondition(
            f"{device} already holds a {existing} filesystem, not {fstype}: "
            f"request fsType {existing} or use a new volume")
    if fstype == "ext4":
        # Lazy init keeps mkfs fast on large sparse volumes; the kernel finishes it in the background.
        command.run(["mkfs.ext4", "-q", "-F", "-m", "0",
                     "-E", "lazy_itable_init=1,lazy_journal_init=1,nodiscard", device])
    elif fstype == "xfs":
        command.run(["mkfs.xfs", "-q", "-f", "-K", device])
    else:
        raise InvalidArgument(f"fsType {fstype!r} is not supported; use one of {', '.join(SUPPORTED_FS)}")
    return True


def ensure_mounted(device: str, target: str, fstype: str, flags=()) -> None:
    """Mount `device` at the directory `target`, unless it already is."""
    present = mounts_at(target)
    if present:
        if present[-1].device == device_number(device):
            return
        raise FailedPrecondition(f"{target} already has {present[-1].source} mounted on it")
    os.makedirs(target, exist_ok=True)
    # A restored snapshot or a clone carries its source's XFS UUID, and XFS refuses to mount
    # a second filesystem with a UUID already mounted: the copy could never be used while
    # its source is. (ceph-csi and TopoLVM mount XFS with nouuid for the same reason.)
    extra = ["nouuid"] if fstype == "xfs" and "nouuid" not in flags else []
    options = ",".join(["defaults", *extra, *flags])
    command.run(["mount", "-t", fstype, "-o", options, device, target])


def ensure_bind(source: str, target: str, readonly: bool, flags=()) -> None:
    """Bind-mount `source` (a directory or a device node) at `target`, creating the target."""
    source_is_dir = os.path.isdir(source)
    present = mounts_at(target)
    if present:
        if _is_bind_of(source, present[-1]):
            return
        raise FailedPrecondition(f"{target} already has {present[-1].source} mounted on it")
    if source_is_dir:
        os.makedirs(target, exist_ok=True)
    else:
        Path(target).parent.mkdir(parents=True, exist_ok=True)
        Path(target).touch(exist_ok=True)
    options = ["bind", *flags] + (["ro"] if readonly else [])
    command.run(["mount", "-o", ",".join(options), source, target])


def bind_targets(source: str) -> list[str]:
    """Every path where `source` (a mounted directory or a device node) is bound."""
    every = mounts()
    return [m.target for m in every if _is_bind_of(source, m, every)]


def _is_bind_of(source: str, mount: Mount, every: list[Mount] | None = None) -> bool:
    if os.path.isdir(source):
        source = os.path.normpath(source)
        below = ([m for m in every if m.target == source] if every is not None
                 else mounts_at(source))
        return bool(below) and (below[-1].device, below[-1].root) == (mount.device, mount.root)
    # A bound device node shows up as a mount of devtmpfs whose root is the node's path in /dev.
    return mount.root == "/" + os.path.relpath(os.path.realpath(source), "/dev")


def ensure_unmounted(target: str) -> None:
    """Unmount everything stacked on `target` (bounded), leaving the path itself in place.

    mountinfo is read once: each umount that succeeds takes the top mount off the stack it
    shows, so as many umounts as it lists are the job; only a stack taller than the bound
    is looked at again."""
    stacked = len(mounts_at(target))
    for _ in range(min(stacked, UMOUNT_ATTEMPTS)):
        command.run(["umount", target])
    if stacked > UMOUNT_ATTEMPTS and is_mounted(target):
        raise FailedPrecondition(f"{target} is still mounted after {UMOUNT_ATTEMPTS} unmounts")


def ensure_path_absent(path: str) -> None:
    """Remove an unmounted publish target: an empty directory or a plain file."""
    with contextlib.suppress(FileNotFoundError):
        mode = os.lstat(path).st_mode
        if stat.S_ISDIR(mode):
            os.rmdir(path)
        else:
            os.unlink(path)


def grow(device: str, mount_path: str, fstype: str) -> None:
    """Grow a mounted filesystem to the size of its device (a no-op when it already fills it)."""
    if fstype == "ext4":
        try:
            command.run(["resize2fs", device])
        except CommandFailed as failed:
            if "Permission denied to resize" not in failed.stderr:
                raise
            # The kernel lets only CAP_SYS_RESOURCE grow a mounted ext4 (EXT4_IOC_RESIZE_FS).
            raise FailedPrecondition(
                f"growing the mounted ext4 filesystem on {device} needs CAP_SYS_RESOURCE, which "
                f"this plugin lacks: run it privileged (or add that capability), or unstage and "
                f"stage the volume again, which grows it offline") from None
    elif fstype == "xfs":
        command.run(["xfs_growfs", mount_path])


def grow_unmounted(device: str, fstype: str) -> None:
    """Grow an unmounted ext4 to its device before mounting it: offline growth needs no
    CAP_SYS_RESOURCE (online growth does) and handles a volume expanded while unstaged or
    restored into a larger size. XFS can only grow mounted; `grow` does that."""
    if fstype != "ext4":
        return
    fs_bytes, device_bytes = _ext4_bytes(device)
    if fs_bytes is None:  # not a superblock this code reads: let the e2fsprogs judge it
        header = command.run(["dumpe2fs", "-h", device]).stdout
        fields = dict(line.split(":", 1) for line in header.splitlines() if ":" in line)
        fs_bytes = int(fields["Block count"]) * int(fields["Block size"])
    if fs_bytes >= device_bytes:
        return
    # resize2fs wants a freshly checked filesystem; -p replays the journal (a snapshot of a
    # mounted volume has one to replay) and fixes only what is safe without a human.
    command.run(["e2fsck", "-f", "-p", device], ok_codes=(0, 1), timeout=3600)
    command.run(["resize2fs", device], timeout=3600)


_EXT4_MAGIC = 0xEF53
_EXT4_INCOMPAT_64BIT = 0x80


def _ext4_bytes(device: str) -> tuple[int | None, int]:
    """(bytes the ext4 filesystem on `device` spans, or None if its superblock does not look
    like one; the device's size). Read from the primary superblock (1 KiB at offset 1024)
    instead of starting dumpe2fs for two numbers: s_blocks_count (lo at 0x04, hi at 0x150
    with the 64bit feature), s_log_block_size at 0x18, s_magic at 0x38, s_feature_incompat
    at 0x60."""
    with open(device, "rb", buffering=0) as dev:
        device_bytes = dev.seek(0, os.SEEK_END)
        block = os.pread(dev.fileno(), 1024, 1024)
    if len(block) < 1024 or int.from_bytes(block[0x38:0x3A], "little") != _EXT4_MAGIC:
        return None, device_bytes
    log_block_size = int.from_bytes(block[0x18:0x1C], "little")
    if log_block_size > 6:  # 1 KiB << 6 = 64 KiB, the largest ext4 block
        return None, device_bytes
    blocks = int.from_bytes(block[0x04:0x08], "little")
    if int.from_bytes(block[0x60:0x64], "little") & _EXT4_INCOMPAT_64BIT:
        blocks |= int.from_bytes(block[0x150:0x154], "little") << 32
    return blocks * (1024 << log_block_size), device_bytes


@contextlib.contextmanager
def frozen(mount_path: str | None):
    """Hold writes on a mounted filesystem (fsfreeze) so a copy of its device is consistent."""
    if mount_path is None:
        yield
        return
    command.run(["fsfreeze", "--freeze", mount_path])
    try:
        yield
    finally:
        command.run(["fsfreeze", "--unfreeze", mount_path])


def thaw(mount_path: str) -> None:
    """Undo a freeze; a filesystem that is not frozen answers EINVAL (exit 1), which is fine."""
    command.run(["fsfreeze", "--unfreeze", mount_path], ok_codes=(0, 1))


@dataclass
class Usage:
    total_bytes: int
    used_bytes: int
    available_bytes: int
    total_inodes: int
    used_inodes: int
    available_inodes: int


def usage(mount_path: str) -> Usage:
    vfs = os.statvfs(mount_path)
    total = vfs.f_blocks * vfs.f_frsize
    available = vfs.f_bavail * vfs.f_frsize
    used = (vfs.f_blocks - vfs.f_bfree) * vfs.f_frsize
    return Usage(total, used, available, vfs.f_files, vfs.f_files - vfs.f_ffree, vfs.f_favail)


def block_size_bytes(device: str) -> int:
    with open(device, "rb") as dev:
        return dev.seek(0, os.SEEK_END)
