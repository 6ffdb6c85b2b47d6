"""The local-ephemeral class: a sparse file per volume on this node, attached as a loop device.

Layout under <state-dir>/local/:
    volumes/<volume-id>/meta.json    the record (schema-versioned, written atomically)
    volumes/<volume-id>/disk.img     the sparse data file
    snapshots/<snapshot-id>/...      the same for snapshots (a copy of a volume's file)
    trash/                           directories renamed here to be deleted

Ids are derived from the request name (a hash), so a retried CreateVolume, even after a
crash half-way, lands on the same directory and finishes the job instead of making a
second volume. A directory is deleted by renaming it into trash/ first, so a crash in the
middle of a delete leaves nothing that looks like a live volume; trash is emptied on start.
"""

import contextlib
import hashlib
import os
import shutil
import time
from pathlib import Path

from .. import command, fs, log, state
from ..attach import loop
from ..errors import (AlreadyExists, FailedPrecondition, InvalidArgument, NotFound,
                      OutOfRange, ResourceExhausted)
from ..parameters import COMMON_KEYS, FS_TYPE, TOPOLOGY_NODE_KEY, check_common
from .base import (HEALTHY, Attachment, Backend, Condition, CreateRequest, Snapshot, Volume,
                   check_known_keys)

_log = log.get("local")
TYPE = "local-ephemeral"
READY, CREATING = "ready", "creating"
DISK = "disk.img"
META = "meta.json"


def _digest(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()[:32]


class LocalBackend(Backend):
    types = (TYPE,)
    id_prefix = "lcl"

    def __init__(self, state_dir: str, node_id: str, reserve_bytes: int = 0):
        self.root = Path(state_dir) / "local"
        self.node_id = node_id
        self.reserve_bytes = reserve_bytes
        self.volumes_dir = self.root / "volumes"
        self.snapshots_dir = self.root / "snapshots"
        self.trash_dir = self.root / "trash"
        for directory in (self.volumes_dir, self.snapshots_dir, self.trash_dir):
            directory.mkdir(parents=True, exist_ok=True)
        self._empty_trash()

    # --- ids and paths ---
    def volume_id_for(self, name: str) -> str:
        return f"{self.id_prefix}-{_digest(name)}"

    def snapshot_id_for(self, name: str) -> str:
        return f"{self.id_prefix}-snap-{_digest(name)}"

    def _volume_dir(self, volume_id: str) -> Path:
        # Only ids of our own exact shape ever become paths: nothing a client sends can
        # name a directory outside volumes/.
        prefix, _, digest = volume_id.partition("-")
        if prefix != self.id_prefix or len(digest) != 32 or not _is_hex(digest):
            raise NotFound(f"volume {volume_id!r} does not exist (not a local-ephemeral volume id)")
        return self.volumes_dir / volume_id

    def _snapshot_dir(self, snapshot_id: str) -> Path:
        prefix = f"{self.id_prefix}-snap-"
        digest = snapshot_id[len(prefix):]
        if not snapshot_id.startswith(prefix) or len(digest) != 32 or not _is_hex(digest):
            raise NotFound(f"snapshot {snapshot_id!r} does not exist (not a local-ephemeral snapshot id)")
        return self.snapshots_dir / snapshot_id

    # --- controller side ---
    def check_parameters(self, parameters: dict) -> dict:
        check_known_keys(parameters, COMMON_KEYS, TYPE)
        return check_common(parameters)

    def create_volume(self, request: CreateRequest) -> Volume:
        volume_id = self.volume_id_for(request.name)
        self._check_topology(request)
        directory = self._volume_dir(volume_id)
        record = state.read(directory / META)
        if record is not None and record["state"] == READY:
            return self._existing_matches(record, request)
        source_file, source_size = self._content_source(request)
        if request.size_bytes < source_size:
            raise OutOfRange(f"the requested size {request.size_bytes} is smaller than the "
                             f"source ({source_size} bytes); request at least that much")
        if record is None:
            needed = request.size_bytes
            available = self.capacity(request.parameters, None)
            if needed > available:
                raise ResourceExhausted(
                    f"node {self.node_id} has {available} bytes left for local volumes, "
                    f"{needed} requested: ask for less or schedule on another node")
            directory.mkdir(exist_ok=True)
        record = {
            "volume_id": volume_id, "name": request.name, "size_bytes": request.size_bytes,
            "parameters": request.parameters, "state": CREATING, "node_id": self.node_id,
            "source_snapshot_id": request.source_snapshot_id,
            "source_volume_id": request.source_volume_id, "created_at": time.time(),
        }
        state.write_atomic(directory / META, record)
        self._fill(directory / DISK, source_file, request.size_bytes)
        record["state"] = READY
        state.write_atomic(directory / META, record)
        _log.info("volume created", volume_id=volume_id, size_bytes=request.size_bytes)
        return self._volume(record)

    def _check_topology(self, request: CreateRequest) -> None:
        if request.requisite_topology and not any(
                seg.get(TOPOLOGY_NODE_KEY) == self.node_id for seg in request.requisite_topology):
            raise ResourceExhausted(
                f"local-ephemeral volumes are created on the node that asks; this is node "
                f"{self.node_id}, which the requested topology does not allow")

    def _existing_matches(self, record: dict, request: CreateRequest) -> Volume:
        same_source = (record["source_snapshot_id"], record["source_volume_id"]) == \
            (request.source_snapshot_id, request.source_volume_id)
        if record["size_bytes"] != request.size_bytes or not same_source \
                or record["parameters"].get(FS_TYPE) != request.parameters.get(FS_TYPE):
            raise AlreadyExists(
                f"a volume named {request.name!r} already exists with {record['size_bytes']} bytes "
                f"and other settings; use another name or the same request")
        return self._volume(record)

    def _content_source(self, request: CreateRequest) -> tuple[Path | None, int]:
        if request.source_snapshot_id:
            record = self._read_snapshot(request.source_snapshot_id)
            return self._snapshot_dir(record["snapshot_id"]) / DISK, record["size_bytes"]
        if request.source_volume_id:
            record = self._read_volume(request.source_volume_id)
            return self.volumes_dir / record["volume_id"] / DISK, record["size_bytes"]
        return None, 0

    def _fill(self, disk: Path, source: Path | None, size_bytes: int) -> None:
        """Make `disk` a sparse file of `size_bytes`, holding a copy of `source` if given."""
        partial = disk.with_name(disk.name + ".partial")
        if source is None:
            if not disk.exists():
                with open(partial, "wb") as out:
                    out.truncate(size_bytes)
                os.replace(partial, disk)
        elif not disk.exists():
            with fs.frozen(self._mount_of(source)):
                command.run(["cp", "--reflink=auto", "--sparse=always", source, partial],
                            timeout=3600)
            os.replace(partial, disk)
        if disk.stat().st_size < size_bytes:
            os.truncate(disk, size_bytes)

    def _mount_of(self, disk: Path) -> str | None:
        """Where the filesystem on a volume's loop device is mounted on this node, if anywhere."""
        for device in loop.find(str(disk)):
            mounted = fs.mounts_of_device(device)
            if mounted:
                return mounted[0].target
        return None

    def delete_volume(self, volume_id: str) -> None:
        try:
            directory = self._volume_dir(volume_id)
        except NotFound:
            return
        if not directory.exists():
            return
        in_use = loop.find(str(directory / DISK))
        if in_use:
            raise FailedPrecondition(f"volume {volume_id} is attached on this node as {in_use[0]}; "
                                     f"unpublish and unstage it before deleting")
        self._discard(directory)
        _log.info("volume deleted", volume_id=volume_id)

    def _discard(self, directory: Path) -> None:
        doomed = self.trash_dir / f"{directory.name}.{time.monotonic_ns()}"
        os.rename(directory, doomed)
        state.fsync_dir(directory.parent)
        shutil.rmtree(doomed)

    def _empty_trash(self) -> None:
        for leftover in self.trash_dir.iterdir():
            shutil.rmtree(leftover, ignore_errors=True)
        for directory in (self.volumes_dir, self.snapshots_dir):
            for partial in directory.glob("*/*.partial"):
                partial.unlink()

    def _read_volume(self, volume_id: str) -> dict:
        record = state.read(self._volume_dir(volume_id) / META)
        if record is None or record["state"] != READY:
            raise NotFound(f"volume {volume_id} does not exist")
        return record

    def _volume(self, record: dict) -> Volume:
        return Volume(
            volume_id=record["volume_id"], name=record["name"], size_bytes=record["size_bytes"],
            storage_class_type=TYPE, parameters=record["parameters"], copies=1,
            topology=[{TOPOLOGY_NODE_KEY: record["node_id"]}],
            source_snapshot_id=record["source_snapshot_id"],
            source_volume_id=record["source_volume_id"])

    def get_volume(self, volume_id: str) -> Volume:
        return self._volume(self._read_volume(volume_id))

    def lookup_name(self, name: str) -> Volume | None:
        try:
            return self.get_volume(self.volume_id_for(name))
        except NotFound:
            return None

    def list_volumes(self) -> list[Volume]:
        found = []
        for directory in sorted(self.volumes_dir.iterdir()):
            record = state.read(directory / META)
            if record is not None and record["state"] == READY:
                found.append(self._volume(record))
        return found

    def expand_volume(self, volume_id: str, size_bytes: int) -> int:
        directory = self._volume_dir(volume_id)
        record = self._read_volume(volume_id)
        if size_bytes <= record["size_bytes"]:
            return record["size_bytes"]
        growth = size_bytes - record["size_bytes"]
        available = self.capacity(record["parameters"], None)
        if growth > available:
            raise ResourceExhausted(f"node {self.node_id} has {available} bytes left; growing "
                                    f"{volume_id} by {growth} bytes does not fit")
        os.truncate(directory / DISK, size_bytes)
        record["size_bytes"] = size_bytes
        state.write_atomic(directory / META, record)
        return size_bytes

    def capacity(self, parameters: dict, segment: dict | None) -> int:
        if segment and segment.get(TOPOLOGY_NODE_KEY, self.node_id) != self.node_id:
            return 0
        vfs = os.statvfs(self.root)
        free = vfs.f_bavail * vfs.f_frsize
        # Sparse files have only been promised their size; what they have not written yet
        # is still free on disk but already spoken for.
        promised = 0
        for disk in [*self.volumes_dir.glob(f"*/{DISK}"), *self.snapshots_dir.glob(f"*/{DISK}")]:
            with contextlib.suppress(FileNotFoundError):
                st = disk.stat()
                promised += max(0, st.st_size - st.st_blocks * 512)
        return max(0, free - promised - self.reserve_bytes)

    def create_snapshot(self, source_volume_id: str, name: str, parameters: dict) -> Snapshot:
        if parameters:
            raise InvalidArgument(f"local-ephemeral snapshots take no parameters, got {sorted(parameters)}")
        snapshot_id = self.snapshot_id_for(name)
        directory = self._snapshot_dir(snapshot_id)
        record = state.read(directory / META)
        if record is not None and record["state"] == READY:
            if record["source_volume_id"] != source_volume_id:
                raise AlreadyExists(f"snapshot name {name!r} is already used for volume "
                                    f"{record['source_volume_id']}")
            return self._snapshot(record)
        source = self._read_volume(source_volume_id)
        directory.mkdir(exist_ok=True)
        record = {"snapshot_id": snapshot_id, "name": name, "source_volume_id": source_volume_id,
                  "size_bytes": source["size_bytes"], "created_at": time.time(), "state": CREATING}
        state.write_atomic(directory / META, record)
        self._fill(directory / DISK, self.volumes_dir / source_volume_id / DISK, 0)
        record["state"] = READY
        state.write_atomic(directory / META, record)
        return self._snapshot(record)

    def _read_snapshot(self, snapshot_id: str) -> dict:
        record = state.read(self._snapshot_dir(snapshot_id) / META)
        if record is None or record["state"] != READY:
            raise NotFound(f"snapshot {snapshot_id} does not exist")
        return record

    @staticmethod
    def _snapshot(record: dict) -> Snapshot:
        return Snapshot(record["snapshot_id"], record["name"], record["source_volume_id"],
                        record["size_bytes"], record["created_at"])

    def delete_snapshot(self, snapshot_id: str) -> None:
        try:
            directory = self._snapshot_dir(snapshot_id)
        except NotFound:
            return
        if directory.exists():
            self._discard(directory)

    def get_snapshot(self, snapshot_id: str) -> Snapshot:
        return self._snapshot(self._read_snapshot(snapshot_id))

    def list_snapshots(self) -> list[Snapshot]:
        found = []
        for directory in sorted(self.snapshots_dir.iterdir()):
            record = state.read(directory / META)
            if record is not None and record["state"] == READY:
                found.append(self._snapshot(record))
        return found

    def condition(self, volume_id: str) -> Condition:
        record = self._read_volume(volume_id)
        disk = self.volumes_dir / volume_id / DISK
        if not disk.exists():
            return Condition(True, f"the data file of {volume_id} is missing on node {self.node_id}")
        if disk.stat().st_size < record["size_bytes"]:
            return Condition(True, f"the data file of {volume_id} is shorter than its recorded size")
        return HEALTHY

    # --- node side ---
    def attach(self, volume_id: str, context: dict) -> Attachment:
        self._read_volume(volume_id)
        return Attachment(loop.ensure_attached(str(self.volumes_dir / volume_id / DISK)), "loop")

    def find_attachment(self, volume_id: str) -> Attachment | None:
        devices = loop.find(str(self._volume_dir(volume_id) / DISK))
        return Attachment(devices[0], "loop") if devices else None

    def detach(self, volume_id: str) -> None:
        try:
            directory = self._volume_dir(volume_id)
        except NotFound:
            return
        loop.ensure_detached(str(directory / DISK))

    def node_expand(self, volume_id: str, size_bytes: int) -> None:
        # In a cluster the resizer talks to a central controller that has no local files,
        # so the node grows the file itself; on the same host this is a no-op.
        record = self._read_volume(volume_id)
        if size_bytes > record["size_bytes"]:
            self.expand_volume(volume_id, size_bytes)
        attached = self.find_attachment(volume_id)
        if attached:
            loop.refresh_size(attached.device)


def _is_hex(text: str) -> bool:
    return all(c in "0123456789abcdef" for c in text)
