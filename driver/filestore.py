"""Sparse-file volumes and snapshots in a directory: the storage both file-based classes share.

The local-ephemeral backend keeps its volumes in a FileStore on the node; a remote-disk
storage server keeps its volumes in a FileStore and serves the data files over NBD.

Layout under the store's root:
    volumes/<volume-id>/meta.json    the record (schema-versioned, written atomically)
    volumes/<volume-id>/disk.img     the sparse data file
    snapshots/<snapshot-id>/...      the same for snapshots (a copy of a volume's file)
    trash/                           directories renamed here to be deleted

Ids are chosen by the caller and checked against the store's id patterns before they
become paths, so nothing a client sends can name a file outside the store. Callers derive
ids from request names, so a retried create (even after a crash half-way) lands on the same
directory and finishes the job: a record in state "creating" is resumed, not duplicated.
A directory is deleted by renaming it into trash/ first, so a crash in the middle of a
delete leaves nothing that looks like a live volume; trash is emptied when the store opens.
"""

import contextlib
import os
import re
import shutil
import time
from pathlib import Path

from . import command, state
from .errors import AlreadyExists, NotFound, OutOfRange, ResourceExhausted

READY, CREATING = "ready", "creating"
DISK = "disk.img"
META = "meta.json"
COPY_TIMEOUT = 3600.0


class FileStore:
    def __init__(self, root: Path, volume_id_pattern: str, snapshot_id_pattern: str,
                 reserve_bytes: int = 0, what: str = "this host"):
        self.root = Path(root)
        self.volumes_dir = self.root / "volumes"
        self.snapshots_dir = self.root / "snapshots"
        self.trash_dir = self.root / "trash"
        self._volume_id = re.compile(volume_id_pattern)
        self._snapshot_id = re.compile(snapshot_id_pattern)
        self.reserve_bytes = reserve_bytes
        self.what = what  # for messages: "node node-a", "storage server s1"
        for directory in (self.volumes_dir, self.snapshots_dir, self.trash_dir):
            directory.mkdir(parents=True, exist_ok=True)
        self._empty_trash()

    # --- paths ---
    def volume_dir(self, volume_id: str) -> Path:
        if not self._volume_id.fullmatch(volume_id):
            raise NotFound(f"volume {volume_id!r} does not exist on {self.what}")
        return self.volumes_dir / volume_id

    def snapshot_dir(self, snapshot_id: str) -> Path:
        if not self._snapshot_id.fullmatch(snapshot_id):
            raise NotFound(f"snapshot {snapshot_id!r} does not exist on {self.what}")
        return self.snapshots_dir / snapshot_id

    def data_path(self, volume_id: str) -> Path:
        return self.volume_dir(volume_id) / DISK

    # --- volumes ---
    def create_volume(self, volume_id: str, name: str, size_bytes: int, *, source_snapshot_id: str = "",
                      source_volume_id: str = "", attributes: dict, quiesce=None) -> dict:
        """Create or resume the volume; return its record. `attributes` are stored with it and
        must match on a retry (with size and source), else ALREADY_EXISTS. `quiesce(path)` is
        a context manager held while a source file is copied (e.g. fsfreeze)."""
        directory = self.volume_dir(volume_id)
        record = state.read(directory / META)
        if record is not None and record["state"] == READY:
            if (record["size_bytes"], record["source_snapshot_id"], record["source_volume_id"]) \
                    != (size_bytes, source_snapshot_id, source_volume_id) \
                    or any(record.get(k) != v for k, v in attributes.items()):
                raise AlreadyExists(
                    f"a volume named {name!r} already exists with {record['size_bytes']} bytes "
                    f"and other settings; use another name or repeat the original request")
            return record
        if source_snapshot_id:
            source_record = self.read_snapshot(source_snapshot_id)
            source = self.snapshot_dir(source_snapshot_id) / DISK
        elif source_volume_id:
            source_record = self.read_volume(source_volume_id)
            source = self.volume_dir(source_volume_id) / DISK
        else:
            source_record, source = {"size_bytes": 0}, None
        if size_bytes < source_record["size_bytes"]:
            raise OutOfRange(f"the requested size {size_bytes} is smaller than the source "
                             f"({source_record['size_bytes']} bytes); request at least that much")
        fresh = False  # the directory is made by this call: nothing can be left in it
        if record is None:
            self.check_room(size_bytes)
            try:
                directory.mkdir()
                fresh = True
            except FileExistsError:
                pass
        elif (record["size_bytes"], record["source_snapshot_id"], record["source_volume_id"]) \
                != (size_bytes, source_snapshot_id, source_volume_id):
            # A crash left a half-made volume of another request (never answered) under this
            # name: start again rather than hand out its data, or its size, to this one.
            for leftover in (directory / DISK, directory / f"{DISK}.partial"):
                leftover.unlink(missing_ok=True)
        record = {"volume_id": volume_id, "name": name, "size_bytes": size_bytes, "state": CREATING,
                  "source_snapshot_id": source_snapshot_id, "source_volume_id": source_volume_id,
                  "created_at": time.time(), **attributes}
        if source is None:
            # An empty sparse file is made in one quick step that is simply redone on a retry,
            # so it needs no "creating" record (two fsyncs fewer on the common path): a crash
            # before the record below leaves a directory without one, which nothing lists.
            if not fresh:
                for leftover in (directory / DISK, directory / f"{DISK}.partial"):
                    leftover.unlink(missing_ok=True)
        else:
            state.write_atomic(directory / META, record)
        self._fill(directory / DISK, source, size_bytes, quiesce)
        record["state"] = READY
        state.write_atomic(directory / META, record)
        return record

    def check_room(self, needed: int) -> None:
        available = self.available_bytes()
        if needed > available:
            raise ResourceExhausted(f"{self.what} has {available} bytes left for volumes, "
                                    f"{needed} requested: ask for less or use another host")

    def _fill(self, disk: Path, source: Path | None, size_bytes: int, quiesce) -> None:
        """Make `disk` a sparse file of `size_bytes`, holding a copy of `source` if given."""
        if source is None:  # the caller removed any earlier file: make it in place
            # The volume's storage itself (the counterpart of unlinking it on delete): kernel
            # work on the volume, accounted like a command's time.
            with command.kernel("create data file"):
                fd = os.open(disk, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
                try:
                    os.ftruncate(fd, size_bytes)
                finally:
                    os.close(fd)
            return
        partial = disk.with_name(disk.name + ".partial")
        if not disk.exists():
            with (quiesce(source) if quiesce else contextlib.nullcontext()):
                command.run(["cp", "--reflink=auto", "--sparse=always", source, partial],
                            timeout=COPY_TIMEOUT)
            os.replace(partial, disk)
        if disk.stat().st_size < size_bytes:
            os.truncate(disk, size_bytes)

    def read_volume(self, volume_id: str) -> dict:
        record = state.read(self.volume_dir(volume_id) / META)
        if record is None or record["state"] != READY:
            raise NotFound(f"volume {volume_id} does not exist on {self.what}")
        return record

    def list_volumes(self) -> list[dict]:
        return self._list(self.volumes_dir)

    def update_volume(self, record: dict) -> None:
        """Rewrite a ready volume's record after the caller changed fields it owns (such as
        its publication); the caller holds the volume's lock."""
        self.read_volume(record["volume_id"])  # NotFound rather than resurrect a deleted one
        state.write_atomic(self.volume_dir(record["volume_id"]) / META, record)

    def expand_volume(self, volume_id: str, size_bytes: int) -> dict:
        record = self.read_volume(volume_id)
        if size_bytes > record["size_bytes"]:
            self.check_room(size_bytes - record["size_bytes"])
            os.truncate(self.volume_dir(volume_id) / DISK, size_bytes)
            record["size_bytes"] = size_bytes
            state.write_atomic(self.volume_dir(volume_id) / META, record)
        return record

    def delete_volume(self, volume_id: str) -> bool:
        """Remove the volume; False when there was nothing to remove."""
        try:
            directory = self.volume_dir(volume_id)
        except NotFound:
            return False
        return self._discard(directory)

    # --- snapshots ---
    def create_snapshot(self, snapshot_id: str, name: str, source_volume_id: str, quiesce=None) -> dict:
        directory = self.snapshot_dir(snapshot_id)
        record = state.read(directory / META)
        if record is not None and record["state"] == READY:
            if record["source_volume_id"] != source_volume_id:
                raise AlreadyExists(f"snapshot name {name!r} is already used for volume "
                                    f"{record['source_volume_id']}")
            return record
        source = self.read_volume(source_volume_id)
        if record is None:
            self.check_room(source["size_bytes"])
            directory.mkdir(exist_ok=True)
        elif record["source_volume_id"] != source_volume_id:
            (directory / DISK).unlink(missing_ok=True)  # a crashed snapshot of another volume
        record = {"snapshot_id": snapshot_id, "name": name, "source_volume_id": source_volume_id,
                  "size_bytes": source["size_bytes"], "created_at": time.time(), "state": CREATING}
        state.write_atomic(directory / META, record)
        self._fill(directory / DISK, self.volume_dir(source_volume_id) / DISK, 0, quiesce)
        record["state"] = READY
        state.write_atomic(directory / META, record)
        return record

    def read_snapshot(self, snapshot_id: str) -> dict:
        record = state.read(self.snapshot_dir(snapshot_id) / META)
        if record is None or record["state"] != READY:
            raise NotFound(f"snapshot {snapshot_id} does not exist on {self.what}")
        return record

    def list_snapshots(self) -> list[dict]:
        return self._list(self.snapshots_dir)

    def delete_snapshot(self, snapshot_id: str) -> bool:
        try:
            directory = self.snapshot_dir(snapshot_id)
        except NotFound:
            return False
        return self._discard(directory)

    # --- space ---
    def available_bytes(self) -> int:
        """Free space, less what sparse files may still claim and the reserve."""
        vfs = os.statvfs(self.root)
        free = vfs.f_bavail * vfs.f_frsize
        # Sparse files have only been promised their size; what they have not written yet
        # is still free on disk but already spoken for. (Every CreateVolume asks: plain os
        # calls, one stat per volume.)
        promised = 0
        for directory in (self.volumes_dir, self.snapshots_dir):
            with os.scandir(directory) as entries:
                for entry in entries:
                    if entry.name.startswith("."):
                        continue
                    try:
                        st = os.stat(f"{entry.path}/{DISK}")
                    except (FileNotFoundError, NotADirectoryError):
                        continue
                    promised += max(0, st.st_size - st.st_blocks * 512)
        return max(0, free - promised - self.reserve_bytes)

    def total_bytes(self) -> int:
        vfs = os.statvfs(self.root)
        return vfs.f_blocks * vfs.f_frsize

    def allocated_bytes(self, volume_id: str) -> int:
        with contextlib.suppress(FileNotFoundError):
            return (self.volume_dir(volume_id) / DISK).stat().st_blocks * 512
        return 0

    # --- internals ---
    def _list(self, directory: Path) -> list[dict]:
        found = []
        for entry in sorted(directory.iterdir()):
            record = state.read(entry / META)
            if record is not None and record["state"] == READY:
                found.append(record)
        return found

    def _discard(self, directory: Path) -> bool:
        if not directory.exists():
            return False
        doomed = self.trash_dir / f"{directory.name}.{time.monotonic_ns()}"
        os.rename(directory, doomed)
        state.fsync_dir(directory.parent)
        self._remove(doomed)
        return True

    @staticmethod
    def _remove(doomed: Path) -> None:
        """Remove a directory already renamed into trash/. The data file goes first, on its
        own: the kernel freeing its blocks is the delete's real work (accounted like a
        command's time); the record and the directory are the store's bookkeeping."""
        with command.kernel("unlink data file"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(doomed / DISK)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(doomed / META)
        try:
            os.rmdir(doomed)
        except OSError:  # something else in there (a .partial, a temporary record): all of it
            shutil.rmtree(doomed)

    def _empty_trash(self) -> None:
        for leftover in self.trash_dir.iterdir():
            shutil.rmtree(leftover, ignore_errors=True)
        for directory in (self.volumes_dir, self.snapshots_dir):
            for partial in directory.glob("*/*.partial"):
                partial.unlink()

