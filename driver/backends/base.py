"""The one interface every storage backend implements, and the records it trades in.

The CSI services talk only to this interface: they validate requests, pick the backend
by StorageClass `type` (create, capacity) or by the prefix of an id (everything else),
and map the typed errors backends raise to gRPC codes. Backends know nothing of gRPC.
"""

import abc
import re
from dataclasses import dataclass, field

from ..errors import AlreadyExists, FailedPrecondition, InvalidArgument, OutOfRange

MiB = 1 << 20
GiB = 1 << 30
DEFAULT_SIZE = 1 * GiB


@dataclass
class Volume:
    volume_id: str
    name: str
    size_bytes: int
    storage_class_type: str
    parameters: dict
    copies: float  # storage copies of every byte (1, 3, 1.5): the copy accounting starts here
    topology: list[dict] = field(default_factory=list)  # accessible segments; empty = everywhere
    source_snapshot_id: str = ""
    source_volume_id: str = ""
    context: dict = field(default_factory=dict)  # extra volume_context for the node
    publication: "Publication | None" = None  # the node it is published to (network classes)


@dataclass(frozen=True)
class Publication:
    """The one node a network volume is attached to (ControllerPublishVolume), kept with the
    volume's own metadata so that it survives a controller restart."""
    node_id: str
    readonly: bool

    @classmethod
    def in_record(cls, record: dict) -> "Publication | None":
        """The publication kept in a FileStore volume record (key `publication`); None when it
        is not published (records written before publication existed have no such key)."""
        published = record.get("publication")
        if not published:
            return None
        return cls(published["node_id"], bool(published["readonly"]))

    def as_record(self) -> dict:
        return {"node_id": self.node_id, "readonly": self.readonly}


def check_publication(volume_id: str, current: Publication | None, node_id: str,
                      readonly: bool) -> bool:
    """The rule every publishing backend applies before it records `node_id`: a volume is
    published to at most one node, read-write or read-only. Return True when exactly this
    publication is recorded already (nothing to write), False when it is free to record;
    raise when another node has it (FAILED_PRECONDITION, as the spec says) or this node has
    it with the other readonly flag (ALREADY_EXISTS)."""
    if current is None:
        return False
    if current.node_id != node_id:
        raise FailedPrecondition(
            f"volume {volume_id} is published to node {current.node_id}; a polyvol volume is "
            f"attached to one node at a time: unpublish it there first (Kubernetes does so "
            f"once the pod on {current.node_id} is gone)")
    if current.readonly != readonly:
        raise AlreadyExists(
            f"volume {volume_id} is published to node {node_id} "
            f"{'read-only' if current.readonly else 'read-write'} already; unpublish it first "
            f"to publish it {'read-only' if readonly else 'read-write'}")
    return True


@dataclass
class Snapshot:
    snapshot_id: str
    name: str
    source_volume_id: str
    size_bytes: int
    created_at: float  # seconds since the epoch
    ready: bool = True


@dataclass
class Condition:
    abnormal: bool
    message: str


HEALTHY = Condition(False, "healthy")


@dataclass
class CreateRequest:
    name: str
    size_bytes: int
    parameters: dict
    source_snapshot_id: str = ""
    source_volume_id: str = ""
    requisite_topology: list[dict] = field(default_factory=list)
    preferred_topology: list[dict] = field(default_factory=list)
    mutable_parameters: dict = field(default_factory=dict)
    secrets: dict = field(default_factory=dict)  # never logged


@dataclass
class Attachment:
    """A volume made into a block device on this node."""
    device: str
    method: str  # "loop", "nbd-kernel", "nbd-user", ...


class Backend(abc.ABC):
    """A kind of storage. One instance serves all volumes whose ids start with `id_prefix`."""

    #: the StorageClass `type` values this backend serves
    types: tuple[str, ...] = ()
    #: volume ids look like "<id_prefix>-<rest>", snapshot ids "<id_prefix>-snap-<rest>"
    id_prefix: str = ""

    # --- controller side ---
    @abc.abstractmethod
    def check_parameters(self, parameters: dict) -> dict:
        """Validate StorageClass parameters; return them normalised. Raise InvalidArgument."""

    @abc.abstractmethod
    def create_volume(self, request: CreateRequest) -> Volume:
        """Create (or find, for the same name and size) a volume. Idempotent."""

    @abc.abstractmethod
    def delete_volume(self, volume_id: str) -> None:
        """Delete a volume; succeed if it is already gone."""

    @abc.abstractmethod
    def get_volume(self, volume_id: str) -> Volume:
        """The volume, or NotFound."""

    @abc.abstractmethod
    def lookup_name(self, name: str) -> Volume | None:
        """The volume created under this request name, if any (inline volumes are found so)."""

    @abc.abstractmethod
    def list_volumes(self) -> list[Volume]:
        """Every volume, in a stable order (ids sorted) so list tokens stay meaningful."""

    @abc.abstractmethod
    def expand_volume(self, volume_id: str, size_bytes: int) -> int:
        """Grow the volume to at least `size_bytes`; return the new size. Never shrinks."""

    @abc.abstractmethod
    def capacity(self, parameters: dict, segment: dict | None) -> int:
        """Bytes a new volume of this class could still get in `segment` (None: anywhere)."""

    @abc.abstractmethod
    def create_snapshot(self, source_volume_id: str, name: str, parameters: dict) -> Snapshot:
        """Snapshot a volume; idempotent for the same name and source."""

    @abc.abstractmethod
    def delete_snapshot(self, snapshot_id: str) -> None:
        """Delete a snapshot; succeed if it is already gone."""

    @abc.abstractmethod
    def get_snapshot(self, snapshot_id: str) -> Snapshot:
        """The snapshot, or NotFound."""

    @abc.abstractmethod
    def list_snapshots(self) -> list[Snapshot]:
        """Every snapshot, ids sorted."""

    # Network volumes must be published (ControllerPublishVolume) to one node before a node
    # attaches them; node-local volumes need not, they already live on their node (but a
    # plugin serving both kinds advertises publishing, so they implement it too).
    #: whether this backend's volumes need ControllerPublish (PUBLISH_UNPUBLISH_VOLUME)
    publishes: bool = False

    @abc.abstractmethod
    def publish(self, volume_id: str, node_id: str, readonly: bool) -> dict:
        """Record `node_id` as the volume's one node (see check_publication) and return the
        publish_context the node needs to attach it. Idempotent. NotFound for no volume."""

    @abc.abstractmethod
    def unpublish(self, volume_id: str, node_id: str) -> None:
        """Forget the publication to `node_id` ("": to any node). Succeed when the volume or
        the publication is gone, or the volume is published to another node."""

    @abc.abstractmethod
    def condition(self, volume_id: str) -> Condition:
        """Whether the volume's data is reachable and intact, from where this plugin runs."""

    # --- node side ---
    def node_condition(self, volume_id: str) -> Condition:
        """Whether the volume works as attached on this node (NodeGetVolumeStats)."""
        return self.condition(volume_id)

    @abc.abstractmethod
    def attach(self, volume_id: str, context: dict) -> Attachment:
        """Make the volume a block device on this node, or return the one already made.
        `context` is the volume_context with the publish_context over it."""

    @abc.abstractmethod
    def find_attachment(self, volume_id: str) -> Attachment | None:
        """The existing block device of an attached volume, without attaching it."""

    def prepare_detach(self, volume_id: str) -> None:
        """Called before the node unmounts the volume: a backend whose device can hang (a dead
        server) makes sure the unmount cannot block on it. Nothing to do for most."""

    @abc.abstractmethod
    def detach(self, volume_id: str) -> None:
        """Undo attach; succeed when nothing is attached."""

    @abc.abstractmethod
    def node_expand(self, volume_id: str, size_bytes: int) -> None:
        """Make the attached block device show the volume's new size."""

    # --- helpers shared by the backends ---
    def owns(self, object_id: str) -> bool:
        return object_id.startswith(self.id_prefix + "-")


def choose_size(required: int, limit: int, minimum: int, granularity: int = MiB) -> int:
    """The size to allocate for a CSI capacity range: at least `required` and the class minimum,
    rounded up to `granularity` when the limit leaves room, never above `limit`."""
    if required < 0 or limit < 0:
        raise OutOfRange("capacity_range bytes cannot be negative")
    if limit and required > limit:
        raise OutOfRange(f"required_bytes {required} is larger than limit_bytes {limit}")
    if limit and limit < minimum:
        raise OutOfRange(f"limit_bytes {limit} is below this class's minimum volume size {minimum}")
    wanted = max(required or (min(DEFAULT_SIZE, limit) if limit else DEFAULT_SIZE), minimum)
    for step in (granularity, 4096, 512):
        size = -(-wanted // step) * step
        if not limit or size <= limit:
            return size
    raise OutOfRange(f"no size that is a multiple of 512 bytes fits between {required} and {limit}")


_SAFE_PARAMETER_VALUE = re.compile(r"^[A-Za-z0-9._:/=,@+-]*$")


def check_known_keys(parameters: dict, known: set[str], class_type: str) -> None:
    """Reject unknown StorageClass parameter keys: a typo must not silently change nothing."""
    unknown = sorted(k for k in parameters
                     if k not in known and not k.startswith("csi.storage.k8s.io/"))
    if unknown:
        raise InvalidArgument(f"unknown parameter(s) {', '.join(unknown)} for type {class_type}; "
                              f"known: {', '.join(sorted(known))}")
    for key, value in parameters.items():
        if not _SAFE_PARAMETER_VALUE.match(value):
            raise InvalidArgument(f"parameter {key} has characters polyvol does not accept: {value!r}")
