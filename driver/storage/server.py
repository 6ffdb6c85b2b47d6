"""The storage server: the control API (polyvol.storage.v1) over a FileStore, and its data plane.

Layout of the data directory (mode 0700, the volume data is nobody else's business):
    volumes/, snapshots/, trash/   the FileStore (driver/filestore.py)
    exports/<export-name>          hard links to volumes/<volume-id>/disk.img, served by nbdkit
    nbdkit.pid                     written by nbdkit when it accepts connections

nbdkit serves every file in exports/ as an export named after it. A hard link (not a
symlink, not the store's own directory) keeps exports/ flat while the store keeps its
per-volume directories, and removing the link takes the export away without touching the
data. A link exists exactly while the volume is ready: made after CreateVolume, removed
before DeleteVolume deletes, and put right at start (after a crash) from the store's records.
The link's name, the volume's export name, is recorded in the volume's record (`export`;
absent = the volume id, which is also how records written before it existed read).

"Attached" means nbdkit has the volume's file open: it opens an export's file when a node
connects to it and keeps it open for the connection (see nbdkit.Nbdkit.open_files).
DeleteVolume removes the link first, so no new connection can start, then refuses if the
file is still open and puts the link back. Right after nbdkit (re)starts, nodes that had
volumes attached may not have reconnected yet, so for `reconnect_grace` seconds deletes
and plain copies are refused with a retryable error rather than trusting an empty list.

"Published" is the controller's decision that one node may attach the volume (CSI
ControllerPublishVolume). It is kept here, in the volume's own record (`publication`:
{node_id, readonly}; absent = not published, which is also how records written before
publication existed read), not in the controller: the server is the one place every
controller replica and every controller restart asks, so "one node per volume" holds
whoever asks. A published volume is not deleted: the node it belongs to may attach it at
any moment.

The fence: a node that lost its volume to another node (Kubernetes unpublished it from a lost
node, by the out-of-service taint or its force-detach timeout) may be partitioned, not dead:
its NBD client keeps its connection, or reconnects when the network heals, and two nodes
writing one ext4 corrupt it. So when a volume is published to a node other than the one it
was published to last (`last_node`, kept across unpublish; for older records, the node of the
publication), it gets a new export name, `<volume-id>.<8 random hex>`: the new name is written
to the record, linked, the old name unlinked. A client can only (re)connect by name, so the
old node can no longer reach the volume; and if it still has it open, every NBD connection is
cut by killing nbdkit (Nbdkit.restart_if_open). Other volumes' clients reconnect to their
unchanged names and resend; the old node's client finds no export of its name and its I/O
fails once its reconnect delay is over. The record is written before the links change: it is
the truth, and a crash in between leaves links that reconcile_exports makes match it at start,
before nbdkit serves again (and nbdkit died with the server, cutting the old connection).
The same node again, or the first publication ever, keeps the name.
"""

import contextlib
import ipaddress
import os
import re
import secrets
from concurrent import futures
from pathlib import Path

import grpc

from .. import __version__, command, log, metrics, state
from ..backends.base import Publication, check_publication
from ..errors import FailedPrecondition, InvalidArgument, NotFound, PolyvolError, Unavailable
from ..filestore import FileStore
from ..locks import OperationLocks
from ..proto import storage_pb2, storage_pb2_grpc
from ..rpc import method, require
from ..signals import termination_event
from . import (DEFAULT_RECONNECT_GRACE, check_server_name, export_name_pattern, server_of,
               snapshot_id_pattern, tls, volume_id_pattern)
from .nbdkit import Nbdkit, read_psk_identities

_log = log.get("storage")
# 1: volumes, snapshots, capacity. 2: PublishVolume/UnpublishVolume and the publication in
# StoredVolume (a version-1 server answers those calls UNIMPLEMENTED). 3: export names that
# change when a volume moves to another node (StoredVolume.export_name; "" from version 2).
API_VERSION = 3
MAX_NAME = 256
MAX_NODE_ID = 256  # bytes; the CSI spec's limit for a node id
MAX_SPREAD_GROUP = 253


class CopyRefused(FailedPrecondition):
    """A volume could not be copied safely; the unfinished target is discarded."""


class StorageServicer(storage_pb2_grpc.StorageServerServicer):
    def __init__(self, name: str, store: FileStore, exports_dir: Path, nbdkit: Nbdkit, *,
                 labels: dict, nbd_address: str, reflink: bool, reconnect_grace: float):
        self.name = name
        self.store = store
        self.exports_dir = Path(exports_dir)
        self.nbdkit = nbdkit
        self.labels = dict(labels)
        self.nbd_address = nbd_address
        self.reflink = reflink
        self.reconnect_grace = reconnect_grace
        self.locks = OperationLocks()
        self._volume_id = re.compile(volume_id_pattern(name))
        self._snapshot_id = re.compile(snapshot_id_pattern(name))

    # --- RPCs ---
    @method
    def GetInfo(self, request, context):
        return storage_pb2.ServerInfo(name=self.name, labels=self.labels, nbd_address=self.nbd_address,
                                      nbd_tls=self.nbdkit.psk_file is not None,
                                      version=__version__, api_version=API_VERSION)

    @method
    def GetCapacity(self, request, context):
        return storage_pb2.GetCapacityResponse(available_bytes=self.store.available_bytes(),
                                               total_bytes=self.store.total_bytes(),
                                               volumes=len(self.store.list_volumes()))

    @method
    def CreateVolume(self, request, context):
        volume_id = self._own_id(request.volume_id, "volume_id")
        _check_name(request.name)
        _check_size(request.size_bytes)
        if request.source_snapshot_id and request.source_volume_id:
            raise InvalidArgument("give source_snapshot_id or source_volume_id, not both")
        if request.source_snapshot_id:
            self._own_id(request.source_snapshot_id, "source_snapshot_id", snapshot=True)
        if request.source_volume_id:
            self._own_id(request.source_volume_id, "source_volume_id")
            if request.source_volume_id == volume_id:
                raise InvalidArgument("source_volume_id cannot be the volume being created")
        if len(request.spread_group) > MAX_SPREAD_GROUP:
            raise InvalidArgument(f"spread_group is longer than {MAX_SPREAD_GROUP} characters")
        if any(not key for key in request.parameters):
            raise InvalidArgument("parameters cannot have an empty key")
        with self._held(volume_id, request.source_volume_id or request.source_snapshot_id,
                        operation="CreateVolume"):
            try:
                record = self.store.create_volume(
                    volume_id, request.name, request.size_bytes,
                    source_snapshot_id=request.source_snapshot_id,
                    source_volume_id=request.source_volume_id,
                    attributes={"parameters": dict(request.parameters),
                                "spread_group": request.spread_group},
                    quiesce=self._copy_guard if request.source_volume_id else None)
            except CopyRefused:
                self.store.delete_volume(volume_id)
                raise
            self._export(record)  # a retry finds the record of a volume that may have moved
        _log.info("volume ready", volume_id=volume_id, size_bytes=record["size_bytes"],
                  spread_group=request.spread_group)
        return self._stored(record, self._open_now())

    @method
    def DeleteVolume(self, request, context):
        volume_id = self._own_id(request.volume_id, "volume_id")
        with self._held(volume_id, operation="DeleteVolume"):
            self._refuse_if_published(volume_id)
            try:
                disk = os.stat(self.store.data_path(volume_id))
            except FileNotFoundError:
                disk = None  # never finished, or gone already: nothing can be attached
            exported = self._unexport(volume_id)  # from here on no node can open it
            if disk is not None:
                try:
                    self._refuse_if_attached(volume_id, disk, "deleted")
                except PolyvolError:
                    if exported:
                        with contextlib.suppress(NotFound):
                            self._export(self.store.read_volume(volume_id))
                    raise
            if self.store.delete_volume(volume_id):
                _log.info("volume deleted", volume_id=volume_id)
        return storage_pb2.DeleteVolumeResponse()

    @method
    def GetVolume(self, request, context):
        volume_id = self._own_id(request.volume_id, "volume_id")
        return self._stored(self.store.read_volume(volume_id), self._open_now())

    @method
    def ListVolumes(self, request, context):
        open_now = self._open_now()
        return storage_pb2.ListVolumesResponse(volumes=[
            self._stored(record, open_now) for record in self.store.list_volumes()
            if not request.spread_group or record["spread_group"] == request.spread_group])

    @method
    def ExpandVolume(self, request, context):
        volume_id = self._own_id(request.volume_id, "volume_id")
        _check_size(request.size_bytes)
        with self._held(volume_id, operation="ExpandVolume"):
            record = self.store.expand_volume(volume_id, request.size_bytes)
        return self._stored(record, self._open_now())

    @method
    def CreateSnapshot(self, request, context):
        snapshot_id = self._own_id(request.snapshot_id, "snapshot_id", snapshot=True)
        _check_name(request.name)
        source = self._own_id(request.source_volume_id, "source_volume_id")
        with self._held(snapshot_id, source, operation="CreateSnapshot"):
            try:
                record = self.store.create_snapshot(snapshot_id, request.name, source,
                                                    quiesce=self._copy_guard)
            except CopyRefused:
                self.store.delete_snapshot(snapshot_id)
                raise
        return _snapshot(record)

    @method
    def DeleteSnapshot(self, request, context):
        snapshot_id = self._own_id(request.snapshot_id, "snapshot_id", snapshot=True)
        with self._held(snapshot_id, operation="DeleteSnapshot"):
            self.store.delete_snapshot(snapshot_id)
        return storage_pb2.DeleteSnapshotResponse()

    @method
    def ListSnapshots(self, request, context):
        return storage_pb2.ListSnapshotsResponse(
            snapshots=[_snapshot(record) for record in self.store.list_snapshots()])

    @method
    def PublishVolume(self, request, context):
        volume_id = self._own_id(request.volume_id, "volume_id")
        _check_node_id(request.node_id, required=True)
        # Under the volume's lock, as every other change to its record: two publishes to
        # different nodes cannot both see "not published" and both win.
        with self._held(volume_id, operation="PublishVolume"):
            record = self.store.read_volume(volume_id)
            previous = _last_node(record)
            if not check_publication(volume_id, Publication.in_record(record), request.node_id,
                                     request.readonly):
                record["publication"] = Publication(request.node_id, request.readonly).as_record()
                record["last_node"] = request.node_id
                if previous is not None and previous != request.node_id:
                    record["export"] = f"{volume_id}.{secrets.token_hex(4)}"
                    # Until the old node's connections are known to be cut: a call that fails
                    # after the links changed leaves the cut to its retry.
                    record["fence_pending"] = True
                # The record first (see the module docstring): a crash before the links follow
                # leaves them for reconcile_exports to put right.
                self.store.update_volume(record)
                _log.info("volume published", volume_id=volume_id, node=request.node_id,
                          readonly=request.readonly, export=_export_name(record))
            # Also on a retry: an earlier call may have failed between the record and here.
            removed = self._export(record, only=True)
            if removed or record.get("fence_pending"):
                self._fence(record, removed,
                            previous if previous != request.node_id else None)
            if record.pop("fence_pending", False):
                self.store.update_volume(record)
        return self._stored(record, self._open_now())

    @method
    def UnpublishVolume(self, request, context):
        volume_id = self._own_id(request.volume_id, "volume_id")
        _check_node_id(request.node_id, required=False)
        with self._held(volume_id, operation="UnpublishVolume"):
            try:
                record = self.store.read_volume(volume_id)
            except NotFound:
                return storage_pb2.UnpublishVolumeResponse()  # no volume: nothing is published
            current = Publication.in_record(record)
            # Another node's publication stays: this call is a detach from request.node_id
            # (perhaps a late retry), and must not free the volume for a third node.
            if current is not None and request.node_id in ("", current.node_id):
                del record["publication"]
                record["last_node"] = current.node_id  # the fence needs it (records before it)
                self.store.update_volume(record)
                _log.info("volume unpublished", volume_id=volume_id, node=current.node_id)
        return storage_pb2.UnpublishVolumeResponse()

    # --- checks ---
    def _own_id(self, value: str, field: str, snapshot: bool = False) -> str:
        """`value` if it is a well-formed id of this server; nothing else becomes a path."""
        require(value, field)
        pattern, kind = (self._snapshot_id, "rd-snap") if snapshot else (self._volume_id, "rd")
        if pattern.fullmatch(value):
            return value
        other = server_of(value)
        if other is not None and other != self.name:
            raise InvalidArgument(f"{field} {value!r} belongs to storage server {other!r}; this is "
                                  f"{self.name!r}: send the request to that server")
        raise InvalidArgument(f"{field} {value[:100]!r} is not valid here: expected "
                              f"{kind}-<32 lowercase hex>-{self.name}")

    @contextlib.contextmanager
    def _held(self, *keys: str, operation: str):
        """Per-id operation locks (ABORTED when busy), the same rule the CSI plugin follows."""
        with contextlib.ExitStack() as stack:
            for key in keys:
                if key:
                    stack.enter_context(self.locks.hold(key, operation))
            yield

    def _refuse_if_published(self, volume_id: str) -> None:
        try:
            current = Publication.in_record(self.store.read_volume(volume_id))
        except NotFound:
            return  # never finished, or gone already
        if current is not None:
            raise FailedPrecondition(
                f"volume {volume_id} is published to node {current.node_id}: unpublish it first "
                f"(ControllerUnpublishVolume; Kubernetes detaches it once no pod on "
                f"{current.node_id} uses it)")

    def _refuse_if_attached(self, volume_id: str, disk: os.stat_result, what: str) -> None:
        running_for = self.nbdkit.ready_for()
        if running_for is None:
            raise Unavailable(f"the NBD data plane is restarting, so whether a node has "
                              f"{volume_id} attached is unknown; retry in a few seconds")
        if running_for < self.reconnect_grace:
            raise Unavailable(
                f"the NBD data plane started {running_for:.0f}s ago and nodes that had {volume_id} "
                f"attached may still be reconnecting; it can be {what} in "
                f"{self.reconnect_grace - running_for:.0f}s")
        if (disk.st_dev, disk.st_ino) in self.nbdkit.open_files():
            raise FailedPrecondition(f"volume {volume_id} is attached: a node has its NBD export "
                                     f"open; detach it from that node before it can be {what}")

    @contextlib.contextmanager
    def _copy_guard(self, source: Path):
        """Held by the FileStore while it copies a volume's file (snapshot or clone)."""
        if self.reflink:
            yield  # a reflink copy is one atomic clone: a point in time even while in use
            return
        volume_id = source.parent.name
        before = source.stat()
        try:
            self._refuse_if_attached(volume_id, before, "copied")
        except PolyvolError as error:
            raise CopyRefused(
                f"{error} (the data directory's filesystem cannot make reflink copies, and a plain "
                f"copy of a volume in use would be torn by writes during the copy; use xfs or "
                f"btrfs for the data directory to snapshot attached volumes)") from None
        yield
        after = source.stat()
        if (after.st_mtime_ns, after.st_size) != (before.st_mtime_ns, before.st_size):
            raise CopyRefused(f"volume {volume_id} was written while it was being copied (a node "
                              f"attached it meanwhile); the copy was discarded, retry when it is "
                              f"detached")

    # --- exports ---
    def _export(self, record: dict, only: bool = False) -> list[str]:
        """Serve the volume under its recorded export name (a hard link in exports/). With
        `only`, also remove every other name it is exported under (a name it had before it
        moved to another node); returns the names removed. The new name is linked before the
        old ones go, and exports/ is fsynced once, after both."""
        volume_id, name = record["volume_id"], _export_name(record)
        disk, link = self.store.data_path(volume_id), self.exports_dir / name
        changed = False
        try:
            os.link(disk, link)
            changed = True
        except FileExistsError:
            if not os.path.samefile(disk, link):
                link.unlink()
                os.link(disk, link)
                changed = True
        removed = []
        if only:
            for other in self._names_of(volume_id):
                if other != name:
                    with contextlib.suppress(FileNotFoundError):
                        (self.exports_dir / other).unlink()
                        removed.append(other)
        if changed or removed:
            state.fsync_dir(self.exports_dir)
        return removed

    def _unexport(self, volume_id: str) -> bool:
        """Remove every export of the volume; False when there was none."""
        names = self._names_of(volume_id)
        for name in names:
            with contextlib.suppress(FileNotFoundError):
                (self.exports_dir / name).unlink()
        if names:
            state.fsync_dir(self.exports_dir)
        return bool(names)

    def _names_of(self, volume_id: str) -> list[str]:
        """The names the volume is exported under now (one, but for a crash or an error in
        the middle of a move)."""
        pattern = re.compile(export_name_pattern(volume_id))
        with os.scandir(self.exports_dir) as entries:
            return sorted(e.name for e in entries if pattern.fullmatch(e.name))

    def _fence(self, record: dict, removed: list[str], previous: str | None) -> None:
        """The volume's old export names are gone: cut every connection if a node still has
        the volume open (the node it was published to before, lost or partitioned)."""
        volume_id = record["volume_id"]
        node = record["publication"]["node_id"]
        try:
            disk = os.stat(self.store.data_path(volume_id))
        except FileNotFoundError:
            return
        reason = f"{volume_id} moved to node {node}"
        took = self.nbdkit.restart_if_open((disk.st_dev, disk.st_ino), reason)
        if took is None:
            _log.info("volume moved to another node: export renamed", volume_id=volume_id,
                      from_node=previous, to_node=node, export=_export_name(record),
                      old_exports=removed)
            return
        _log.warning("volume moved to another node while a node still had it open: export "
                     "renamed and every NBD connection cut (nbdkit restarted; other volumes' "
                     "clients reconnect)", volume_id=volume_id, from_node=previous, to_node=node,
                     export=_export_name(record), old_exports=removed,
                     restart_ms=round(took * 1000))

    def reconcile_exports(self) -> None:
        """Make exports/ hold exactly the ready volumes under their recorded names (a crash
        may have left it behind, e.g. between a move's record and its links)."""
        records = self.store.list_volumes()
        wanted = {_export_name(record) for record in records}
        for entry in os.scandir(self.exports_dir):
            if entry.name not in wanted:
                os.unlink(entry.path)
                _log.warning("removed stale export", export=entry.name)
        for record in sorted(records, key=lambda r: r["volume_id"]):
            self._export(record)

    # --- replies ---
    def _open_now(self) -> set:
        try:
            return self.nbdkit.open_files()
        except Unavailable:
            return set()  # nbdkit is restarting: no connection is open

    def _stored(self, record: dict, open_now: set) -> storage_pb2.StoredVolume:
        volume_id = record["volume_id"]
        try:
            st = os.stat(self.store.data_path(volume_id))
            in_use = (st.st_dev, st.st_ino) in open_now
        except FileNotFoundError:
            in_use = False
        publication = Publication.in_record(record)
        return storage_pb2.StoredVolume(
            volume_id=volume_id, name=record["name"], size_bytes=record["size_bytes"],
            parameters=record["parameters"], source_snapshot_id=record["source_snapshot_id"],
            source_volume_id=record["source_volume_id"], spread_group=record["spread_group"],
            created_at=record["created_at"], in_use=in_use,
            allocated_bytes=self.store.allocated_bytes(volume_id),
            published_node=publication.node_id if publication else "",
            published_readonly=publication.readonly if publication else False,
            export_name=_export_name(record))


def _export_name(record: dict) -> str:
    """The NBD export name of a volume: the volume id unless it moved (records written before
    export names existed have no such key)."""
    return record.get("export") or record["volume_id"]


def _last_node(record: dict) -> str | None:
    """The node the volume was last published to, published now or not; None if never.
    Records written before `last_node` existed read as their publication's node."""
    if "last_node" in record:
        return record["last_node"] or None
    publication = Publication.in_record(record)
    return publication.node_id if publication else None


def _snapshot(record: dict) -> storage_pb2.StoredSnapshot:
    return storage_pb2.StoredSnapshot(
        snapshot_id=record["snapshot_id"], name=record["name"],
        source_volume_id=record["source_volume_id"], size_bytes=record["size_bytes"],
        created_at=record["created_at"])


def _check_name(name: str) -> None:
    require(name, "name")
    if len(name) > MAX_NAME:
        raise InvalidArgument(f"name is longer than {MAX_NAME} characters")


def _check_node_id(node_id: str, required: bool) -> None:
    if required and not node_id:
        raise InvalidArgument("node_id is required: the CSI node id of the node the volume is "
                              "published to (NodeGetInfo's node_id; in Kubernetes the node name)")
    if len(node_id.encode()) > MAX_NODE_ID:
        raise InvalidArgument(f"node_id is longer than {MAX_NODE_ID} bytes (the CSI limit)")


def _check_size(size_bytes: int) -> None:
    if size_bytes <= 0 or size_bytes % 512:
        raise InvalidArgument(f"size_bytes must be a positive multiple of 512 (a block device's "
                              f"sector), not {size_bytes}")


def parse_address(text: str, flag: str) -> tuple[str, int]:
    """HOST:PORT or [IPV6]:PORT."""
    host, _, port = text.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise InvalidArgument(f"{flag} {text!r} must be HOST:PORT (IPv6: [ADDR]:PORT)")
    return host, int(port)


def _is_wildcard(host: str) -> bool:
    with contextlib.suppress(ValueError):
        return ipaddress.ip_address(host).is_unspecified
    return False


def reflink_supported(directory: Path) -> bool:
    """Whether `cp --reflink` can clone files in `directory` (xfs, btrfs: yes; ext4: no)."""
    probe, clone = directory / ".reflink-probe", directory / ".reflink-probe.clone"
    try:
        probe.write_bytes(b"\0" * 4096)
        return command.run(["cp", "--reflink=always", probe, clone], check=False).returncode == 0
    finally:
        probe.unlink(missing_ok=True)
        clone.unlink(missing_ok=True)


def _nbd_psk(psk_file: str, insecure_nbd: bool, nbd_listen: str) -> str | None:
    """The PSK file nbdkit should use, checked; None for the --insecure-nbd opt-out."""
    if insecure_nbd:
        _log.warning("NBD data plane WITHOUT TLS (--insecure-nbd): anyone who can reach "
                     f"{nbd_listen} can read and write every volume; use only on a dedicated, "
                     "trusted storage network")
        return None
    if not psk_file:
        raise InvalidArgument("--nbd-psk-file is required (or --insecure-nbd on a trusted network)")
    identities = read_psk_identities(Path(psk_file))
    if os.stat(psk_file).st_mode & 0o077:
        _log.warning("PSK file is readable by other users; chmod 600 it", path=psk_file)
    _log.info("NBD clients", psk_identities=identities)
    return os.path.abspath(psk_file)


def register_metrics(servicer: StorageServicer) -> None:
    """The server's numbers for Prometheus, read from the store and nbdkit at each scrape."""
    store, nbdkit = servicer.store, servicer.nbdkit

    def volumes():
        records = store.list_volumes()
        open_now = servicer._open_now()
        stored = [servicer._stored(r, open_now) for r in records]
        yield ("all",), len(stored)
        yield ("published",), sum(1 for v in stored if v.published_node)
        yield ("attached",), sum(1 for v in stored if v.in_use)

    def space():
        yield ("total",), store.total_bytes()
        yield ("available",), store.available_bytes()
        yield ("allocated",), sum(store.allocated_bytes(r["volume_id"]) for r in store.list_volumes())

    def data_plane():
        yield ("up",), 1 if nbdkit.ready_for() is not None else 0
        yield ("restarts",), nbdkit.restarts

    metrics.register_gauges("polyvol_storage_volumes", "Volumes on this storage server: all, "
                            "published to a node, attached (a node has the export open)",
                            ["state"], volumes)
    metrics.register_gauges("polyvol_storage_bytes", "Space of the data directory: total, "
                            "available to new volumes (after what sparse volumes may still "
                            "claim), allocated by volume data", ["kind"], space)
    metrics.register_gauges("polyvol_storage_nbdkit", "The NBD data plane: up (1/0) and restarts "
                            "since the server started", ["what"], data_plane)


def serve(*, name: str, data_dir: str, listen: str, nbd_listen: str, nbd_advertise: str,
          tls_dir: str, psk_file: str, labels: dict, reserve_bytes: int, insecure_nbd: bool,
          reconnect_grace: float = DEFAULT_RECONNECT_GRACE, metrics_address: str = "",
          workers: int = 8) -> None:
    check_server_name(name)
    parse_address(listen, "--listen")
    nbd_host, nbd_port = parse_address(nbd_listen, "--nbd-listen")
    if _is_wildcard(nbd_host) and not nbd_advertise:
        raise InvalidArgument(f"--nbd-listen {nbd_listen} listens on every address; give "
                              f"--nbd-advertise HOST:PORT, the address nodes should dial")
    if nbd_advertise:
        parse_address(nbd_advertise, "--nbd-advertise")
    psk = _nbd_psk(psk_file, insecure_nbd, nbd_listen)
    credentials = tls.server_credentials(Path(tls_dir))

    root = Path(data_dir).absolute()  # nbdkit is given paths below it
    root.mkdir(parents=True, exist_ok=True)
    os.chmod(root, 0o700)
    store = FileStore(root, volume_id_pattern(name), snapshot_id_pattern(name), reserve_bytes,
                      f"storage server {name}")
    exports_dir = root / "exports"
    exports_dir.mkdir(exist_ok=True)
    nbdkit = Nbdkit(exports_dir, root / "nbdkit.pid", nbd_host, nbd_port, psk)
    servicer = StorageServicer(name, store, exports_dir, nbdkit, labels=labels,
                               nbd_address=nbd_advertise or nbd_listen,
                               reflink=reflink_supported(root), reconnect_grace=reconnect_grace)
    servicer.reconcile_exports()
    register_metrics(servicer)
    metrics.serve(metrics_address, "storage-server")

    stopping = termination_event()
    nbdkit.start()
    try:
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers))
        storage_pb2_grpc.add_StorageServerServicer_to_server(servicer, server)
        try:
            bound = server.add_secure_port(listen, credentials)
        except RuntimeError:
            bound = 0
        if not bound:
            raise FailedPrecondition(f"cannot listen on {listen} (in use, or not an address of this host)")
        server.start()
        _log.info("serving", name=name, version=__version__, listen=listen, mtls=True,
                  nbd_address=servicer.nbd_address, nbd_tls=psk is not None, data_dir=str(root),
                  reflink=servicer.reflink, volumes=len(store.list_volumes()), labels=labels)
        stopping.wait()
        server.stop(grace=5).wait()
    finally:
        nbdkit.stop()
