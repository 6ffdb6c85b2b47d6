"""Kernel NBD device (/dev/nbdN) connected to a local qemu-storage-daemon's unix socket.

UNTESTED: the machines this project is developed and tested on have no `nbd` kernel module,
so nothing in this module has ever run against a real /dev/nbdN. It is kept deliberately
small; `driver.attach.nbd` uses it only when /dev/nbd0 exists and `nbd-client` is installed
(or when configured with mode "kernel"), and logs that choice. Treat its first use on a
real node as a test.

Design: TLS-PSK and reconnection stay in qemu-storage-daemon (kernel NBD has no TLS-PSK and
does not reconnect); the kernel only talks plain NBD over a unix socket to it. `nbd-client`
(3.17+) configures the device through the NBD generic-netlink family and then exits; the
kernel keeps the socket. Options:
- the logical block size is 512, as on the loop device of the user-space path, so a
  filesystem made on one path mounts on the other (XFS refuses a device whose sector is
  larger than its own);
- the request timeout is longer than qemu-storage-daemon's reconnect-delay: qsd fails the
  request itself with EIO when the server stays away longer, and the kernel must not give up
  first (a kernel timeout would kill the connection to a healthy qsd).
"""

import os
import shutil
from pathlib import Path

from .. import command, log
from ..errors import CommandFailed, CommandTimedOut, FailedPrecondition, ResourceExhausted

_log = log.get("attach.nbd.kernel")
SYS_BLOCK = Path("/sys/block")
BLOCK_SIZE = 512


def available() -> tuple[bool, str]:
    """(usable, why): kernel NBD needs the nbd module (/dev/nbd0) and nbd-client."""
    if not os.path.exists("/dev/nbd0"):
        return False, "no /dev/nbd0 (nbd kernel module not loaded)"
    if shutil.which("nbd-client") is None:
        return False, "nbd-client is not installed"
    return True, "/dev/nbd0 and nbd-client present"


def connected(device: str) -> bool:
    """Whether /dev/nbdN is connected (the kernel shows /sys/block/nbdN/pid only then)."""
    return (SYS_BLOCK / os.path.basename(device) / "pid").exists()


def _free_devices() -> list[str]:
    names = sorted((p.name for p in SYS_BLOCK.glob("nbd*") if p.name[3:].isdigit()),
                   key=lambda name: int(name[3:]))
    return [f"/dev/{name}" for name in names if not connected(name)
            and (SYS_BLOCK / name / "size").read_text().strip() == "0"]


def connect(socket_path: str, export: str, timeout_s: int) -> str:
    """Connect the first free /dev/nbdN to the NBD server on `socket_path`; return the device.

    Two attaches racing for the same index: the loser's nbd-client fails (device busy) and
    the next free index is tried."""
    last_error = None
    for device in _free_devices()[:8]:
        try:
            command.run(["nbd-client", "-unix", socket_path, device, "-name", export,
                         "-block-size", str(BLOCK_SIZE), "-timeout", str(timeout_s)],
                        timeout=60)
        except (CommandFailed, CommandTimedOut) as error:
            last_error = error  # most likely a lost race for this index: try the next one
            continue
        if connected(device):
            _log.info("kernel nbd connected", device=device, socket=socket_path)
            return device
        last_error = FailedPrecondition(f"nbd-client returned but {device} is not connected")
    if last_error is None:
        raise ResourceExhausted("no free /dev/nbdN device (load nbd with a larger nbds_max)")
    raise FailedPrecondition(f"could not connect a kernel NBD device to {socket_path}: {last_error}")


def disconnect(device: str) -> None:
    """Disconnect /dev/nbdN (a no-op when it is not connected)."""
    if connected(device):
        command.run(["nbd-client", "-d", device], timeout=60)
        _log.info("kernel nbd disconnected", device=device)
