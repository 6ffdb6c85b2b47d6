"""StorageClass parameters every class shares, and the topology keys polyvol reports.

Class-specific keys are checked by each backend's `check_parameters`; every key is
documented in docs/parameters.md, and unknown keys are refused so a typo is not ignored.
"""

from .errors import InvalidArgument
from .fs import SUPPORTED_FS

TYPE = "type"
FS_TYPE = "fsType"
APP_REPLICAS = "appReplicas"
COMMON_KEYS = {TYPE, FS_TYPE, APP_REPLICAS}

DEFAULT_FS = "ext4"
TOPOLOGY_NODE_KEY = "topology.polyvol.csi.io/node"

# Keys of the volume_context polyvol hands to the node.
CTX_TYPE = "polyvol.csi.io/type"
CTX_COPIES = "polyvol.csi.io/copies"
CTX_EPHEMERAL = "csi.storage.k8s.io/ephemeral"
# Key of the publish_context: the publication is read-only (ControllerPublish readonly or a
# read-only access mode), so the node publishes the volume read-only whatever the pod asks.
CTX_READONLY = "polyvol.csi.io/readonly"


def check_common(parameters: dict) -> dict:
    """Normalise the shared keys: fsType defaults to ext4, appReplicas to 1."""
    result = dict(parameters)
    fs_type = result.get(FS_TYPE) or DEFAULT_FS
    if fs_type not in SUPPORTED_FS:
        raise InvalidArgument(f"fsType {fs_type!r} is not supported; use one of {', '.join(SUPPORTED_FS)}")
    result[FS_TYPE] = fs_type
    replicas = result.get(APP_REPLICAS, "1")
    if not replicas.isdigit() or not 1 <= int(replicas) <= 16:
        raise InvalidArgument(f"appReplicas must be a whole number from 1 to 16, not {replicas!r}")
    result[APP_REPLICAS] = replicas
    return result
