"""Loop devices over files: the local attach, and the last step of the user-space network attach.

Loop devices are found again by their backing file (losetup's own table), so attach and
detach are safe to repeat and a restarted plugin re-adopts the devices it made before.

Attaching is done in-process with two ioctls (LOOP_CTL_GET_FREE, then LOOP_CONFIGURE, which
sets the file, direct I/O and the size in one step). `losetup --find` does the same but,
when another attach takes its device first, sleeps 200 ms and retries while holding that
device open, which defers a concurrent detach of it; with 16 attaches at once that cost
more than everything else in a stage. Here a lost race is just an EBUSY and another try.
Growing and detaching are one ioctl each too (LOOP_SET_CAPACITY and LOOP_CLR_FD, as
`losetup --set-capacity` and `--detach`). The time spent in these ioctls is the kernel's work
on the volume and is accounted as such (`command.kernel`), like the losetup they replace.
"""

import errno
import fcntl
import os
import struct
import threading
import time

from .. import command, log

_log = log.get("loop")
LOOP_CTL_GET_FREE = 0x4C82
LOOP_SET_CAPACITY = 0x4C07
LOOP_CLR_FD = 0x4C01
LOOP_CONFIGURE = 0x4C0A  # Linux 5.8+
LO_FLAGS_DIRECT_IO = 16
# struct loop_info64, then struct loop_config {u32 fd; u32 block_size; loop_info64; u64[8]}
_LOOP_INFO64 = struct.Struct("=QQQQQIIII64s64s32sQQ")
_LOOP_CONFIG = struct.Struct(f"=II{_LOOP_INFO64.size}s64s")
ATTACH_ATTEMPTS = 20
# Kernels without LOOP_CONFIGURE fall back to losetup, one attach at a time (see above).
_losetup_turn = threading.Lock()
_DELETED = b" (deleted)"


def _loops() -> list[tuple[str, str]]:
    """(device, backing file) of every configured loop device, as losetup --list reports
    them, read from sysfs where losetup reads them too (no process to start on every lookup).

    This runs several times per RPC, and a node may have dozens of idle loop devices, so
    the candidates come from /proc/partitions, which lists only devices with a capacity:
    one read instead of one sysfs lookup per device. (A loop device over an empty file has
    no capacity and is not listed; polyvol never makes one.)"""
    found = []
    for name in _sized_loop_names():
        try:  # ENOENT: not configured (no loop/ directory); or detached meanwhile
            fd = os.open(f"/sys/block/{name}/loop/backing_file", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            backing = os.read(fd, 8192)
        except OSError:
            continue
        finally:
            os.close(fd)
        found.append((f"/dev/{name}", os.fsdecode(backing.rstrip(b"\n").removesuffix(_DELETED))))
    return found


def _sized_loop_names(partitions: bytes | None = None) -> list[str]:
    """Names of the loop devices (not their partitions) that have a capacity, from
    /proc/partitions (or `partitions`, that file's content)."""
    if partitions is None:
        try:
            with open("/proc/partitions", "rb") as table:
                partitions = table.read()
        except OSError:  # no procfs: every loop device in sysfs
            return [entry.name for entry in os.scandir("/sys/block") if entry.name.startswith("loop")]
    names = (line.split()[-1] for line in partitions.splitlines()[2:] if b"loop" in line)
    return [os.fsdecode(name) for name in names if name.startswith(b"loop") and name[4:].isdigit()]


def find(backing_file: str, resolved: bool = False) -> list[str]:
    """Loop devices currently backed by `backing_file` (normally zero or one). The kernel
    names backing files by their real path; `resolved` says `backing_file` is one already."""
    wanted = backing_file if resolved else os.path.realpath(backing_file)
    return [device for device, backing in _loops() if backing == wanted]


def ensure_attached(backing_file: str, resolved: bool = False) -> str:
    """The loop device for `backing_file`, creating one with direct I/O if there is none
    (`resolved`: as for `find`).

    Direct I/O stops the page cache from holding every block twice (once for the
    filesystem on top, once for the backing file) and makes fsync reach the backing store.
    """
    path = backing_file if resolved else os.path.realpath(backing_file)
    for device, backing in _loops():
        if backing == path:
            return device
    try:
        return _configure(path)
    except OSError as error:
        if error.errno not in (errno.EINVAL, errno.ENOTTY):
            raise
    with _losetup_turn:
        return command.run(["losetup", "--find", "--show", "--direct-io=on", path]).stdout.strip()


def _configure(path: str) -> str:
    info = _LOOP_INFO64.pack(0, 0, 0, 0, 0, 0, 0, 0, LO_FLAGS_DIRECT_IO,
                             os.fsencode(path)[:63], b"", b"", 0, 0)
    with command.kernel("LOOP_CONFIGURE", backing_file=path) as logged:
        backing = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        try:
            config = _LOOP_CONFIG.pack(backing, 0, info, b"")
            control = os.open("/dev/loop-control", os.O_RDWR | os.O_CLOEXEC)
            try:
                for attempt in range(1, ATTACH_ATTEMPTS + 1):
                    # Takes a kernel-wide lock, and makes a new device when none is free.
                    device = f"/dev/loop{fcntl.ioctl(control, LOOP_CTL_GET_FREE)}"
                    try:
                        loop_fd = os.open(device, os.O_RDWR | os.O_CLOEXEC)
                    except FileNotFoundError:  # the node of a new device is not there yet
                        time.sleep(0.01)
                        continue
                    try:
                        fcntl.ioctl(loop_fd, LOOP_CONFIGURE, config)
                    except OSError as error:
                        if error.errno != errno.EBUSY:  # EBUSY: another attach took it first
                            raise
                        continue
                    finally:
                        os.close(loop_fd)
                    logged.update(device=device, attempts=attempt)
                    return device
            finally:
                os.close(control)
        finally:
            os.close(backing)
    raise OSError(errno.EBUSY, f"no free loop device after {ATTACH_ATTEMPTS} attempts")


def ensure_detached(backing_file: str, resolved: bool = False) -> None:
    for device in find(backing_file, resolved):
        with command.kernel("LOOP_CLR_FD", device=device) as logged:
            try:
                fd = os.open(device, os.O_RDWR | os.O_CLOEXEC)
            except FileNotFoundError:
                logged.update(outcome="gone")
                continue
            try:
                # A device still open elsewhere (mounted) is only marked autoclear: the kernel
                # detaches it when its last user closes it.
                fcntl.ioctl(fd, LOOP_CLR_FD, 0)
            except OSError as error:
                if error.errno not in (errno.ENXIO, errno.EBUSY):  # ENXIO: detached already
                    raise
                logged.update(outcome=errno.errorcode[error.errno])
            finally:
                os.close(fd)


def refresh_size(device: str) -> None:
    """Make the loop device see a backing file that has grown."""
    with command.kernel("LOOP_SET_CAPACITY", device=device):
        fd = os.open(device, os.O_RDWR | os.O_CLOEXEC)
        try:
            fcntl.ioctl(fd, LOOP_SET_CAPACITY)
        finally:
            os.close(fd)
