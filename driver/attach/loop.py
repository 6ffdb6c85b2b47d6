"""Loop devices over files: the local attach, and the last step of the user-space network attach.

Loop devices are found again by their backing file (losetup's own table), so attach and
detach are safe to repeat and a restarted plugin re-adopts the devices it made before.

Attaching is done in-process with two ioctls (LOOP_CTL_GET_FREE, then LOOP_CONFIGURE, which
sets the file, direct I/O and the size in one step). `losetup --find` does the same but,
when another attach takes its device first, sleeps 200 ms and retries while holding that
device open, which defers a concurrent detach of it; with 16 attaches at once that cost
more than everything else in a stage. Here a lost race is just an EBUSY and another try.
"""

import errno
import fcntl
import os
import struct
import threading
import time
from pathlib import Path

from .. import command, log

_log = log.get("loop")
LOOP_CTL_GET_FREE = 0x4C82
LOOP_CONFIGURE = 0x4C0A  # Linux 5.8+
LO_FLAGS_DIRECT_IO = 16
# struct loop_info64, then struct loop_config {u32 fd; u32 block_size; loop_info64; u64[8]}
_LOOP_INFO64 = struct.Struct("=QQQQQIIII64s64s32sQQ")
_LOOP_CONFIG = struct.Struct(f"=II{_LOOP_INFO64.size}s64s")
ATTACH_ATTEMPTS = 20
# Kernels without LOOP_CONFIGURE fall back to losetup, one attach at a time (see above).
_losetup_turn = threading.Lock()


def _loops() -> list[dict]:
    """Configured loop devices and their backing files, as losetup --list reports them, read
    from sysfs where losetup reads them too (no process to start on every lookup)."""
    found = []
    for entry in os.scandir("/sys/block"):
        if not entry.name.startswith("loop"):
            continue
        try:
            backing = Path(entry.path, "loop", "backing_file").read_text().rstrip("\n")
        except OSError:  # not configured (no loop/ directory), or detached meanwhile
            continue
        found.append({"name": f"/dev/{entry.name}", "back-file": backing})
    return found


def find(backing_file: str) -> list[str]:
    """Loop devices currently backed by `backing_file` (normally zero or one)."""
    wanted = os.path.realpath(backing_file)
    return [loop["name"] for loop in _loops()
            if (loop.get("back-file") or "").removesuffix(" (deleted)") == wanted]


def ensure_attached(backing_file: str) -> str:
    """The loop device for `backing_file`, creating one with direct I/O if there is none.

    Direct I/O stops the page cache from holding every block twice (once for the
    filesystem on top, once for the backing file) and makes fsync reach the backing store.
    """
    existing = find(backing_file)
    if existing:
        return existing[0]
    path = os.path.realpath(backing_file)
    try:
        return _configure(path)
    except OSError as error:
        if error.errno not in (errno.EINVAL, errno.ENOTTY):
            raise
    with _losetup_turn:
        return command.run(["losetup", "--find", "--show", "--direct-io=on", path]).stdout.strip()


def _configure(path: str) -> str:
    started = time.monotonic()
    info = _LOOP_INFO64.pack(0, 0, 0, 0, 0, 0, 0, 0, LO_FLAGS_DIRECT_IO,
                             os.fsencode(path)[:63], b"", b"", 0, 0)
    backing = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    try:
        config = _LOOP_CONFIG.pack(backing, 0, info, b"")
        control = os.open("/dev/loop-control", os.O_RDWR | os.O_CLOEXEC)
        try:
            for _ in range(ATTACH_ATTEMPTS):
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
                _log.debug("loop attached", device=device, backing_file=path,
                           ms=round((time.monotonic() - started) * 1000, 1))
                return device
        finally:
            os.close(control)
    finally:
        os.close(backing)
    raise OSError(errno.EBUSY, f"no free loop device after {ATTACH_ATTEMPTS} attempts")


def ensure_detached(backing_file: str) -> None:
    for device in find(backing_file):
        # A device still mounted somewhere is only marked autoclear; it goes when the last user does.
        command.run(["losetup", "--detach", device], ok_codes=(0, 1))


def refresh_size(device: str) -> None:
    """Make the loop device see a backing file that has grown."""
    command.run(["losetup", "--set-capacity", device])
