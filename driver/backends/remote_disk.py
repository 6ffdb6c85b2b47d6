"""The remote-disk class: one copy of the data, whole, on one storage server, served over NBD.

Controller side: the volume id names its server (`rd-<digest>-<server>`); placement
(driver.placement) picks the server from capacity and the volume's spread group; every
file operation is a call to that server's control API (driver.storage.client).
Node side: the volume context carries the server's NBD address, and the NBD attach layer
(driver.attach.nbd) turns the export into a block device; the node needs no control-API
credentials, only the data-plane PSK.

Publication (ControllerPublishVolume): a volume is attached to one node at a time. The rule
(base.check_publication) is applied by the storage server, under its per-volume lock, and the
publication lives in the volume's record there, so it holds across controller restarts and
replicas. The publish_context carries the server's NBD address as the server reports it at
publish time; it overrides the one the volume_context recorded at create, so a server that
came back under a new address is still reached. It also carries the volume's NBD export name
(CTX_NBD_EXPORT): the server renames the export when the volume moves to another node, so the
node it moved away from (lost, perhaps only partitioned) cannot reach it any more (the fence:
driver/storage/server.py). Without the key (volumes staged before it existed, a stage without
ControllerPublish) the export name is the volume id.
"""

import hashlib
import json
import re
import threading
from dataclasses import dataclass
from pathlib import Path

from .. import fs, log, placement
from ..attach.nbd import NbdTarget
from ..errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, Unavailable
from ..parameters import COMMON_KEYS, check_common
from ..storage import export_name_pattern
from .base import (HEALTHY, Attachment, Backend, Condition, CreateRequest, Publication, Snapshot,
                   Volume, check_known_keys)

_log = log.get("remote-disk")
TYPE = "remote-disk"
PREFIX = "rd"
KEYS = COMMON_KEYS | {"spreadGroup", "spreadPolicy", "spreadTopologyKey"}
SERVER_NAME = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
VOLUME_ID = re.compile(rf"{PREFIX}-(?P<digest>[0-9a-f]{{32}})-(?P<server>{SERVER_NAME.pattern})")
SNAPSHOT_ID = re.compile(rf"{PREFIX}-snap-(?P<digest>[0-9a-f]{{32}})-(?P<server>{SERVER_NAME.pattern})")

CTX_SERVER = "polyvol.csi.io/server"
CTX_NBD_ADDRESS = "polyvol.csi.io/nbd-address"
CTX_NBD_TLS = "polyvol.csi.io/nbd-tls"
CTX_NBD_EXPORT = "polyvol.csi.io/nbd-export"
# The storage API version from which a server fences a volume that moved (export names).
FENCE_API_VERSION = 3
CTX_SPREAD_GROUP = "polyvol.csi.io/spread-group"
CTX_SPREAD = "polyvol.csi.io/spread"
# GetCapacity with this segment key reports one storage server's free space.
TOPOLOGY_SERVER_KEY = "storage.polyvol.csi.io/server"


def _digest(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()[:32]


@dataclass(frozen=True)
class ServerEntry:
    name: str
    address: str  # host:port of the control API


class ServerDirectory:
    """The storage servers this controller may use, read from a JSON file
    `{"servers": [{"name": "s1", "address": "10.0.0.5:9740"}, ...]}` and re-read when the
    file changes (a mounted ConfigMap is updated in place)."""

    def __init__(self, path: str):
        self.path = Path(path)
        self._mtime = None
        self._servers: dict[str, ServerEntry] = {}
        self._lock = threading.Lock()

    def servers(self) -> dict[str, ServerEntry]:
        with self._lock:
            mtime = self.path.stat().st_mtime_ns
            if mtime != self._mtime:
                self._servers = self._parse(json.loads(self.path.read_text()))
                self._mtime = mtime
                _log.info("storage servers loaded", path=str(self.path), servers=sorted(self._servers))
            return dict(self._servers)

    def _parse(self, document: dict) -> dict[str, ServerEntry]:
        servers = {}
        for entry in document.get("servers", []):
            name, address = entry.get("name", ""), entry.get("address", "")
            if not SERVER_NAME.fullmatch(name) or ":" not in address:
                raise FailedPrecondition(f"{self.path}: each server needs a DNS-label name and a "
                                         f"host:port address, got {entry!r}")
            servers[name] = ServerEntry(name, address)
        return servers


class RemoteDiskBackend(Backend):
    types = (TYPE,)
    id_prefix = PREFIX
    publishes = True

    def __init__(self, directory: ServerDirectory | None, tls_dir: str | None, attacher=None,
                 psk_identity: str = "", psk_file: str = "", client_factory=None):
        self.directory = directory
        self.tls_dir = tls_dir
        self.attacher = attacher
        self.psk_identity = psk_identity
        self.psk_file = psk_file
        self._client_factory = client_factory or _default_client_factory
        self._clients: dict[str, object] = {}
        self._clients_lock = threading.Lock()
        self._group_locks: dict[str, threading.Lock] = {}

    # --- servers ---
    def _client(self, server: str):
        if self.directory is None:
            raise FailedPrecondition("this plugin has no storage servers configured; start the "
                                     "controller with --storage-servers FILE --storage-tls-dir DIR")
        entry = self.directory.servers().get(server)
        if entry is None:
            raise NotFound(f"storage server {server!r} is not in {self.directory.path}")
        with self._clients_lock:
            client = self._clients.get(entry.address)
            if client is None:
                client = self._client_factory(entry.address, self.tls_dir)
                self._clients[entry.address] = client
            return client

    def _known_client(self, server: str):
        """The client of a server that a volume id names, so one that must exist: a server that
        is down or not ready yet is missing from discovery too, and that is not "no such
        volume" (a delete would forget the file for good, a publish would fail for good)."""
        try:
            return self._client(server)
        except NotFound:
            raise Unavailable(f"storage server {server} is not known right now (down, not ready, "
                              f"or removed from {self.directory.path}); retry. For a server "
                              f"removed for good, remove its PVs by hand") from None

    def _reachable(self) -> dict[str, tuple[object, object]]:
        """name -> (client, info) for every configured server that answers now."""
        if self.directory is None:
            self._client("")  # raises the configuration error
        found = {}
        for name in sorted(self.directory.servers()):
            client = self._client(name)
            try:
                found[name] = (client, client.get_info())
            except Unavailable as error:
                _log.warning("storage server unreachable", server=name, error=str(error))
        return found

    @staticmethod
    def _parse_volume_id(volume_id: str) -> re.Match:
        match = VOLUME_ID.fullmatch(volume_id)
        if match is None:
            raise NotFound(f"volume {volume_id!r} does not exist (not a remote-disk volume id)")
        return match

    # --- controller side ---
    def check_parameters(self, parameters: dict) -> dict:
        check_known_keys(parameters, KEYS, TYPE)
        result = check_common(parameters)
        result["spreadPolicy"] = placement.check_policy(parameters.get("spreadPolicy", placement.REQUIRED))
        return result

    def create_volume(self, request: CreateRequest) -> Volume:
        digest = _digest(request.name)
        group = placement.spread_group(request.parameters)
        with self._group_lock(group):
            servers = self._reachable()
            for name, (client, info) in servers.items():
                try:
                    existing = client.get_volume(f"{PREFIX}-{digest}-{name}")
                except NotFound:
                    continue
                return self._create_on(client, info, existing.volume_id, request, group,
                                       existing.parameters.get(CTX_SPREAD, "ok"))
            decision = self._place(servers, request, group)
            client, info = servers[decision.server]
            _log.info("placed", name=request.name, server=decision.server, group=group or "-",
                      note=decision.note)
            if not decision.spread_ok:
                _log.warning("spread not met", name=request.name, note=decision.note)
            spread = "ok" if decision.spread_ok else f"degraded: {decision.note}"
            return self._create_on(client, info, f"{PREFIX}-{digest}-{decision.server}", request,
                                   group, spread)

    def _group_lock(self, group: str) -> threading.Lock:
        # Two volumes of one group placed at the same moment must not both pick the same
        # server; the controller is a single leader, so a process-local lock is enough.
        with self._clients_lock:
            return self._group_locks.setdefault(group, threading.Lock())

    def _place(self, servers: dict, request: CreateRequest, group: str) -> placement.Decision:
        source = request.source_snapshot_id or request.source_volume_id
        if source:
            # A copy is made on the server that holds the source (no data crosses the network).
            match = SNAPSHOT_ID.fullmatch(source) or VOLUME_ID.fullmatch(source)
            if match is None or match["server"] not in servers:
                raise NotFound(f"source {source} does not exist or its server is unreachable")
            return placement.Decision(match["server"], True, "copy made next to its source")
        states = []
        for name, (client, info) in servers.items():
            capacity = client.get_capacity()
            members = [v.name for v in client.list_volumes(spread_group=group)] if group else []
            states.append(placement.ServerState(name, dict(info.labels), capacity.available_bytes,
                                                members))
        if not states:
            raise Unavailable("no storage server is reachable; check the storage-server pods "
                              "and the controller's --storage-servers file")
        return placement.choose(states, request.size_bytes, group,
                                request.parameters["spreadPolicy"],
                                request.parameters.get("spreadTopologyKey", ""))

    def _create_on(self, client, info, volume_id: str, request: CreateRequest, group: str,
                   spread: str) -> Volume:
        parameters = {**request.parameters, CTX_SPREAD: spread}
        stored = client.create_volume(volume_id, request.name, request.size_bytes, parameters,
                                      source_snapshot_id=request.source_snapshot_id,
                                      source_volume_id=request.source_volume_id, spread_group=group)
        return self._volume(stored, info)

    def _volume(self, stored, info) -> Volume:
        parameters = dict(stored.parameters)
        return Volume(
            volume_id=stored.volume_id, name=stored.name, size_bytes=stored.size_bytes,
            storage_class_type=TYPE, parameters=parameters, copies=1, topology=[],
            source_snapshot_id=stored.source_snapshot_id, source_volume_id=stored.source_volume_id,
            context={CTX_SERVER: info.name, **_data_plane(info),
                     CTX_SPREAD_GROUP: stored.spread_group,
                     CTX_SPREAD: parameters.get(CTX_SPREAD, "ok")},
            publication=(Publication(stored.published_node, stored.published_readonly)
                         if stored.published_node else None))

    def delete_volume(self, volume_id: str) -> None:
        self._known_client(self._parse_volume_id(volume_id)["server"]).delete_volume(volume_id)

    def publish(self, volume_id: str, node_id: str, readonly: bool) -> dict:
        server = self._parse_volume_id(volume_id)["server"]
        client = self._known_client(server)
        stored = client.publish_volume(volume_id, node_id, readonly)
        # Asked now, not copied from the volume_context: the address recorded at create is
        # stale once the server has moved (a rescheduled pod gets a new IP).
        info = client.get_info()
        if info.api_version < FENCE_API_VERSION:
            # Still correct (such a server's export is always the volume id), but not fenced.
            _log.warning("storage server predates the fence of moved volumes: a node this "
                         "volume was published to before may still write to it; upgrade polyvol "
                         "on that server", server=server, volume_id=volume_id,
                         api_version=info.api_version)
        return {**_data_plane(info), CTX_NBD_EXPORT: stored.export_name or volume_id}

    def unpublish(self, volume_id: str, node_id: str) -> None:
        match = VOLUME_ID.fullmatch(volume_id)
        if match is None:
            return  # not a remote-disk volume id: no such volume, so nothing is published
        # A server that is unknown right now is not "nothing published": its record would keep
        # the volume tied to this node, so the detach is retried (as a delete is).
        self._known_client(match["server"]).unpublish_volume(volume_id, node_id)

    def get_volume(self, volume_id: str) -> Volume:
        server = self._parse_volume_id(volume_id)["server"]
        client = self._client(server)
        return self._volume(client.get_volume(volume_id), client.get_info())

    def lookup_name(self, name: str) -> Volume | None:
        for server, (client, info) in self._reachable().items():
            try:
                return self._volume(client.get_volume(f"{PREFIX}-{_digest(name)}-{server}"), info)
            except NotFound:
                continue
        return None

    def list_volumes(self) -> list[Volume]:
        if self.directory is None:
            return []  # no servers configured: no remote disks (ListVolumes lists every class)
        return [self._volume(stored, info) for client, info in self._reachable().values()
                for stored in client.list_volumes()]

    def expand_volume(self, volume_id: str, size_bytes: int) -> int:
        server = self._parse_volume_id(volume_id)["server"]
        return self._client(server).expand_volume(volume_id, size_bytes).size_bytes

    def capacity(self, parameters: dict, segment: dict | None) -> int:
        # A remote disk is reachable from every node, so the node segment Kubernetes asks
        # about does not narrow it; a server segment narrows it to that server.
        wanted = (segment or {}).get(TOPOLOGY_SERVER_KEY)
        sizes = [client.get_capacity().available_bytes
                 for name, (client, _) in self._reachable().items() if wanted in (None, name)]
        return max(sizes, default=0)

    def create_snapshot(self, source_volume_id: str, name: str, parameters: dict) -> Snapshot:
        if parameters:
            raise InvalidArgument(f"remote-disk snapshots take no parameters, got {sorted(parameters)}")
        server = self._parse_volume_id(source_volume_id)["server"]
        digest = _digest(name)
        # Snapshot names are unique across the class: one taken under this name on another
        # server (of another volume) makes this request a conflict, not a second snapshot.
        for other, (client, _) in self._reachable().items():
            if other != server and any(s.snapshot_id == f"{PREFIX}-snap-{digest}-{other}"
                                       for s in client.list_snapshots()):
                raise AlreadyExists(f"snapshot name {name!r} is already used on storage server "
                                    f"{other} for another volume")
        stored = self._client(server).create_snapshot(f"{PREFIX}-snap-{digest}-{server}", name,
                                                      source_volume_id)
        return _snapshot(stored)

    def get_snapshot(self, snapshot_id: str) -> Snapshot:
        match = SNAPSHOT_ID.fullmatch(snapshot_id)
        if match is None:
            raise NotFound(f"snapshot {snapshot_id!r} does not exist (not a remote-disk snapshot id)")
        for stored in self._client(match["server"]).list_snapshots():
            if stored.snapshot_id == snapshot_id:
                return _snapshot(stored)
        raise NotFound(f"snapshot {snapshot_id} does not exist")

    def delete_snapshot(self, snapshot_id: str) -> None:
        match = SNAPSHOT_ID.fullmatch(snapshot_id)
        if match is None:
            return
        self._known_client(match["server"]).delete_snapshot(snapshot_id)

    def list_snapshots(self) -> list[Snapshot]:
        if self.directory is None:
            return []  # as list_volumes
        return [_snapshot(s) for client, _ in self._reachable().values() for s in client.list_snapshots()]

    def condition(self, volume_id: str) -> Condition:
        server = self._parse_volume_id(volume_id)["server"]
        try:
            self._client(server).get_volume(volume_id)
        except Unavailable as error:
            return Condition(True, f"storage server {server} is unreachable: {error}")
        except NotFound as missing:
            return Condition(True, str(missing))
        return HEALTHY

    # --- node side ---
    def _require_attacher(self):
        if self.attacher is None:
            raise FailedPrecondition("this plugin does not serve the node role for remote-disk")
        return self.attacher

    def attach(self, volume_id: str, context: dict) -> Attachment:
        self._parse_volume_id(volume_id)
        address = context.get(CTX_NBD_ADDRESS, "")
        if ":" not in address:
            raise InvalidArgument(f"volume_context lacks {CTX_NBD_ADDRESS}; pass the volume_context "
                                  f"that CreateVolume returned")
        host, _, port = address.rpartition(":")
        if not port.isdigit():
            raise InvalidArgument(f"{CTX_NBD_ADDRESS} {address!r} is not host:port")
        export = context.get(CTX_NBD_EXPORT) or volume_id
        if not re.fullmatch(export_name_pattern(volume_id), export):
            raise InvalidArgument(f"{CTX_NBD_EXPORT} {export[:100]!r} is not an export name of "
                                  f"{volume_id}; pass the publish_context ControllerPublishVolume "
                                  f"returned")
        tls = context.get(CTX_NBD_TLS, "true") == "true"
        if tls and not self.psk_file:
            raise FailedPrecondition(f"{volume_id} is served over TLS-PSK but this node has no key; "
                                     f"start the node plugin with --nbd-psk-file")
        target = NbdTarget(host=host.strip("[]"), port=int(port), export=export,
                           psk_identity=self.psk_identity if tls else None,
                           psk_key_file=self.psk_file if tls else None, tls=tls)
        return self._require_attacher().attach(volume_id, target)

    def find_attachment(self, volume_id: str) -> Attachment | None:
        self._parse_volume_id(volume_id)
        return self._require_attacher().find(volume_id)

    def prepare_detach(self, volume_id: str) -> None:
        if VOLUME_ID.fullmatch(volume_id):
            self._require_attacher().prepare_detach(volume_id)

    def detach(self, volume_id: str) -> None:
        if VOLUME_ID.fullmatch(volume_id):
            self._require_attacher().detach(volume_id)

    def node_expand(self, volume_id: str, size_bytes: int) -> None:
        attached = self.find_attachment(volume_id)
        if attached is None:
            raise FailedPrecondition(f"volume {volume_id} is not staged on this node")
        device_size = fs.block_size_bytes(attached.device)
        if size_bytes > device_size:
            raise FailedPrecondition(
                f"{volume_id} grew on its storage server, but an NBD connection keeps the size it "
                f"had when it was opened ({device_size} bytes); the node sees the new size when the "
                f"volume is staged again (restart the pod)")

    def node_condition(self, volume_id: str) -> Condition:
        return self._require_attacher().condition(volume_id)


def _data_plane(info) -> dict:
    """Where a node attaches a server's volumes: the volume_context and publish_context keys."""
    return {CTX_NBD_ADDRESS: info.nbd_address, CTX_NBD_TLS: "true" if info.nbd_tls else "false"}


def _snapshot(stored) -> Snapshot:
    return Snapshot(stored.snapshot_id, stored.name, stored.source_volume_id, stored.size_bytes,
                    stored.created_at)


def _default_client_factory(address: str, tls_dir: str | None):
    from ..storage.client import StorageClient

    if not tls_dir:
        raise FailedPrecondition("--storage-tls-dir is required to talk to storage servers")
    return StorageClient(address, tls_dir)
