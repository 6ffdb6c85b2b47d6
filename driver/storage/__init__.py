"""The remote-disk storage server: a FileStore of sparse volume files on one machine,
managed over an mTLS gRPC control API (proto/storage.proto) and served over NBD by nbdkit.

Modules: `server` (the control API), `nbdkit` (the supervised data plane), `client` (what
the controller uses), `tls` (certificates), `cli` (`polyvol storage-server`, `polyvol storage ...`).

Ids are chosen by the controller and name the server that holds the volume:
`rd-<32 hex>-<server>` for volumes, `rd-snap-<32 hex>-<server>` for snapshots. A server
accepts only ids that end in its own name, so an id can never steer one server to another
server's volume. A volume's NBD export name is its id, or `<id>.<8 hex>` once it has moved
from one node to another (a new name at each move: see server.py, the fence).
"""

import re

from ..errors import InvalidArgument

# After nbdkit (re)starts, nodes that had volumes attached reconnect; QEMU's NBD client
# retries at +0, 1, 3, 7, 15, 31, 47 s (measured), so a minute covers a node whose
# reconnect-delay allows it. Until then an idle export does not prove a volume detached.
DEFAULT_RECONNECT_GRACE = 60.0
VOLUME_PREFIX = "rd"
SNAPSHOT_PREFIX = "rd-snap"
_DNS_LABEL = r"[a-z0-9](?:[-a-z0-9]{0,61}[a-z0-9])?"
_ANY_ID = re.compile(rf"(?:{SNAPSHOT_PREFIX}|{VOLUME_PREFIX})-[0-9a-f]{{32}}-(?P<server>{_DNS_LABEL})")


def check_server_name(name: str) -> str:
    """Server names are DNS labels: they end every id and every NBD export name."""
    if not re.fullmatch(_DNS_LABEL, name):
        raise InvalidArgument(f"storage server name {name!r} must be a DNS label: 1-63 characters "
                              f"of a-z, 0-9 and '-', starting and ending with a letter or digit")
    return name


def volume_id_pattern(server: str) -> str:
    return rf"{VOLUME_PREFIX}-[0-9a-f]{{32}}-{re.escape(server)}"


def snapshot_id_pattern(server: str) -> str:
    return rf"{SNAPSHOT_PREFIX}-[0-9a-f]{{32}}-{re.escape(server)}"


def export_name_pattern(volume_id_: str) -> str:
    """The NBD export names a volume may have: its id, or its id and 8 hex digits."""
    return rf"{re.escape(volume_id_)}(?:\.[0-9a-f]{{8}})?"


def volume_id(digest: str, server: str) -> str:
    """The id of a volume on `server`; `digest` is 32 lowercase hex characters."""
    return f"{VOLUME_PREFIX}-{digest}-{server}"


def snapshot_id(digest: str, server: str) -> str:
    return f"{SNAPSHOT_PREFIX}-{digest}-{server}"


def server_of(any_id: str) -> str | None:
    """The server a volume or snapshot id names, or None when it is not a remote-disk id."""
    match = _ANY_ID.fullmatch(any_id)
    return match["server"] if match else None
