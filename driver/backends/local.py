"""The local-ephemeral class: a sparse file per volume on this node, attached as a loop device.

Volumes live in a FileStore under <state-dir>/local/ (see driver/filestore.py for the
layout and the crash-safety rules). Ids are a hash of the request name, so retries and
inline volumes (whose CSI id is chosen by kubelet) find their volume again.
"""

import contextlib
import hashlib
import os

from .. import fs, log
from ..attach import loop
from ..errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted
from ..filestore import FileStore
from ..parameters import COMMON_KEYS, TOPOLOGY_NODE_KEY, check_common
from .base import (HEALTHY, Attachment, Backend, Condition, CreateRequest, Publication, Snapshot,
                   Volume, check_known_keys, check_publication)

_log = log.get("local")
TYPE = "local-ephemeral"
PREFIX = "lcl"


def _digest(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()[:32]


class LocalBackend(Backend):
    types = (TYPE,)
    id_prefix = PREFIX

    def __init__(self, state_dir: str, node_id: str, reserve_bytes: int = 0):
        self.node_id = node_id
        # Resolved once: the kernel names a loop device's backing file by its real path, and
        # with a real root every data path is one (the store makes no links below it), so
        # the loop lookups below need no realpath of their own.
        self.store = FileStore(os.path.realpath(f"{state_dir}/local"), rf"{PREFIX}-[0-9a-f]{{32}}",
                               rf"{PREFIX}-snap-[0-9a-f]{{32}}", reserve_bytes, f"node {node_id}")

        self._thaw_left_frozen()

    def _thaw_left_frozen(self) -> None:
        """A plugin killed while copying a mounted volume (snapshot, clone) leaves that
        filesystem frozen, and the pod's writes hang; thaw every mounted volume at start
        (thawing one that is not frozen is a harmless EINVAL)."""
        for record in self.store.list_volumes():
            for device in loop.find(str(self.store.data_path(record["volume_id"])), resolved=True):
                for mount in fs.mounts_of_device(device)[:1]:
                    fs.thaw(mount.target)

    def volume_id_for(self, name: str) -> str:
        return f"{PREFIX}-{_digest(name)}"

    def snapshot_id_for(self, name: str) -> str:
        return f"{PREFIX}-snap-{_digest(name)}"

    # --- controller side ---
    def check_parameters(self, parameters: dict) -> dict:
        check_known_keys(parameters, COMMON_KEYS, TYPE)
        return check_common(parameters)

    def create_volume(self, request: CreateRequest) -> Volume:
        if request.requisite_topology and not any(
                seg.get(TOPOLOGY_NODE_KEY) == self.node_id for seg in request.requisite_topology):
            raise ResourceExhausted(
                f"local-ephemeral volumes are created on the node that asks; this is node "
                f"{self.node_id}, which the requested topology does not allow")
        record = self.store.create_volume(
            self.volume_id_for(request.name), request.name, request.size_bytes,
            source_snapshot_id=request.source_snapshot_id, source_volume_id=request.source_volume_id,
            attributes={"parameters": request.parameters, "node_id": self.node_id},
            quiesce=self._frozen_if_mounted)
        _log.info("volume ready", volume_id=record["volume_id"], size_bytes=record["size_bytes"])
        return self._volume(record)

    @contextlib.contextmanager
    def _frozen_if_mounted(self, disk):
        """Copy a volume that a pod is using only with its filesystem frozen, so the copy
        is a consistent point in time rather than a file torn by writes during the copy."""
        mount_path = None
        for device in loop.find(os.path.realpath(disk), resolved=True):
            mounted = fs.mounts_of_device(device)
            if mounted:
                mount_path = mounted[0].target
        with fs.frozen(mount_path):
            yield

    def delete_volume(self, volume_id: str) -> None:
        try:
            in_use = loop.find(str(self.store.data_path(volume_id)), resolved=True)
        except NotFound:
            return
        if in_use:
            raise FailedPrecondition(f"volume {volume_id} is attached on this node as {in_use[0]}; "
                                     f"unpublish and unstage it before deleting")
        if self.store.delete_volume(volume_id):
            _log.info("volume deleted", volume_id=volume_id)

    def _volume(self, record: dict) -> Volume:
        return Volume(
            volume_id=record["volume_id"], name=record["name"], size_bytes=record["size_bytes"],
            storage_class_type=TYPE, parameters=record["parameters"], copies=1,
            topology=[{TOPOLOGY_NODE_KEY: record["node_id"]}],
            source_snapshot_id=record["source_snapshot_id"],
            source_volume_id=record["source_volume_id"],
            publication=Publication.in_record(record))

    def get_volume(self, volume_id: str) -> Volume:
        return self._volume(self.store.read_volume(volume_id))

    def publish(self, volume_id: str, node_id: str, readonly: bool) -> dict:
        """Not needed by the local driver (it does not advertise publishing), but a plugin
        serving local and network classes does, and then a local volume follows the same
        rules: only on its own node, once, with one readonly flag."""
        record = self.store.read_volume(volume_id)
        if node_id != record["node_id"]:
            raise FailedPrecondition(f"volume {volume_id} lives on node {record['node_id']} and "
                                     f"cannot be used on {node_id}")
        if not check_publication(volume_id, Publication.in_record(record), node_id, readonly):
            record["publication"] = Publication(node_id, readonly).as_record()
            self.store.update_volume(record)
        return {}

    def unpublish(self, volume_id: str, node_id: str) -> None:
        try:
            record = self.store.read_volume(volume_id)
        except NotFound:
            return
        current = Publication.in_record(record)
        if current is not None and node_id in ("", current.node_id):
            del record["publication"]
            self.store.update_volume(record)

    def lookup_name(self, name: str) -> Volume | None:
        try:
            return self.get_volume(self.volume_id_for(name))
        except NotFound:
            return None

    def list_volumes(self) -> list[Volume]:
        return [self._volume(r) for r in self.store.list_volumes()]

    def expand_volume(self, volume_id: str, size_bytes: int) -> int:
        return self.store.expand_volume(volume_id, size_bytes)["size_bytes"]

    def capacity(self, parameters: dict, segment: dict | None) -> int:
        if segment and segment.get(TOPOLOGY_NODE_KEY, self.node_id) != self.node_id:
            return 0
        return self.store.available_bytes()

    def create_snapshot(self, source_volume_id: str, name: str, parameters: dict) -> Snapshot:
        if parameters:
            raise InvalidArgument(f"local-ephemeral snapshots take no parameters, got {sorted(parameters)}")
        return _snapshot(self.store.create_snapshot(self.snapshot_id_for(name), name, source_volume_id,
                                                    quiesce=self._frozen_if_mounted))

    def get_snapshot(self, snapshot_id: str) -> Snapshot:
        return _snapshot(self.store.read_snapshot(snapshot_id))

    def delete_snapshot(self, snapshot_id: str) -> None:
        self.store.delete_snapshot(snapshot_id)

    def list_snapshots(self) -> list[Snapshot]:
        return [_snapshot(r) for r in self.store.list_snapshots()]

    def condition(self, volume_id: str) -> Condition:
        record = self.store.read_volume(volume_id)
        disk = self.store.data_path(volume_id)
        if not disk.exists():
            return Condition(True, f"the data file of {volume_id} is missing on node {self.node_id}")
        if disk.stat().st_size < record["size_bytes"]:
            return Condition(True, f"the data file of {volume_id} is shorter than its recorded size")
        return HEALTHY

    # --- node side ---
    def attach(self, volume_id: str, context: dict) -> Attachment:
        self.store.read_volume(volume_id)
        return Attachment(loop.ensure_attached(str(self.store.data_path(volume_id)), resolved=True),
                          "loop")

    def find_attachment(self, volume_id: str) -> Attachment | None:
        self.store.read_volume(volume_id)
        devices = loop.find(str(self.store.data_path(volume_id)), resolved=True)
        return Attachment(devices[0], "loop") if devices else None

    def detach(self, volume_id: str) -> None:
        with contextlib.suppress(NotFound):
            loop.ensure_detached(str(self.store.data_path(volume_id)), resolved=True)

    def node_expand(self, volume_id: str, size_bytes: int) -> None:
        # In a cluster the resizer talks to a central controller that has no local files,
        # so the node grows the file itself; when controller and node share a host this is a no-op.
        self.store.expand_volume(volume_id, size_bytes)
        attached = self.find_attachment(volume_id)
        if attached:
            loop.refresh_size(attached.device)


def _snapshot(record: dict) -> Snapshot:
    return Snapshot(record["snapshot_id"], record["name"], record["source_volume_id"],
                    record["size_bytes"], record["created_at"])
