"""Loop devices over files: the local attach, and the last step of the user-space network attach.

Loop devices are found again by their backing file (losetup's own table), so attach and
detach are safe to repeat and a restarted plugin re-adopts the devices it made before.
"""

import json
import os
import threading

from .. import command

# `losetup --find` picks the first free device and retries after 200 ms when another
# process configured it first, holding that device open meanwhile (which defers a detach
# of it). Concurrent attaches in this plugin would race for the same device; take turns.
_attach_turn = threading.Lock()


def _loops() -> list[dict]:
    listing = command.run(["losetup", "--list", "--json", "--output", "NAME,BACK-FILE"])
    if not listing.stdout.strip():
        return []
    return json.loads(listing.stdout).get("loopdevices", [])


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
    with _attach_turn:
        made = command.run(["losetup", "--find", "--show", "--direct-io=on",
                            os.path.realpath(backing_file)])
    return made.stdout.strip()


def ensure_detached(backing_file: str) -> None:
    for device in find(backing_file):
        # A device still mounted somewhere is only marked autoclear; it goes when the last user does.
        command.run(["losetup", "--detach", device], ok_codes=(0, 1))


def refresh_size(device: str) -> None:
    """Make the loop device see a backing file that has grown."""
    command.run(["losetup", "--set-capacity", device])
