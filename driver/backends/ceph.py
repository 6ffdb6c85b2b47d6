"""The replicated and erasure-coded classes: RBD images in a Ceph cluster.

    type: replicated      an image in a replicated pool (`pool`, size 3 = 3 copies)
    type: erasure-coded   the image's header/metadata in a replicated `pool`, its data in an
                          erasure-coded `dataPool` (k=2 m=1 = 1.5 copies), like ceph-csi's dataPool

Controller side talks to the cluster through the librados/librbd Python bindings (Debian's
python3-rados/python3-rbd); nothing here runs the `ceph`/`rbd` commands.
Node side hands the image to the RBD attach layer (driver.attach.rbd).

Credentials. The cephx user and key come only from the CSI request's secrets (`userID`,
`userKey`, as with ceph-csi: StorageClass `csi.storage.k8s.io/provisioner-secret-name`,
`.../node-stage-secret-name`, ...). The key is handed to librados in memory (`conf={"key": ...}`,
no ceph.conf, no keyring file, no command line) and never logged; a key that is not even a
well-formed cephx key is refused before librados sees it (librados would print it to stderr).
Connections are kept per (cluster, monitors, user, key digest) and closed when idle. RPCs that
carry no secrets at all (ListVolumes, GetCapacity, ControllerGetVolume, NodeGetVolumeStats) use
the connection of the latest request for that cluster that did; before any, they have nothing
to authenticate with (GetCapacity, ControllerGetVolume: FAILED_PRECONDITION; ListVolumes: the
cluster is left out). A refused key is remembered for DENIED_SECONDS, so a CO retrying fast
does not make every retry a monitor round trip ("no retry storm"); librados itself is told to
give up quickly (client_mount_timeout, rados_mon_op_timeout, rados_osd_op_timeout). The
secrets reach the backend through driver.rpc.request_secrets() (the request being served),
the CreateRequest for CreateVolume.

Clusters. A volume id names its cluster; the monitors of a `clusterID` come from the plugin's
`--ceph-config` file (`{"clusters": [{"clusterID": "c1", "monitors": ["10.0.0.1:6789", ...]}]}`,
or ceph-csi's list form; re-read when it changes). A StorageClass may instead give `monitors`:
when they are up to four IPv4 `host:port` addresses, the id carries them, packed
(`m.<base32>`, see monitors_token), so any plugin finds the cluster from the id alone, with no
configuration and no state; otherwise (host names, IPv6) the cluster's fsid becomes the cluster
part of the id and the plugin remembers fsid -> monitors in its state directory (a controller
whose state directory is lost cannot delete those volumes until a CreateVolume of the class
teaches it again: use clusterID for such clusters). The node also finds the monitors in the
volume_context.

Ids (nothing in an id ever becomes a path or a shell word; every part is checked by a regex):

    volume    rbd-<uuid: 32 hex>-<pool id: decimal>-<cluster>
    snapshot  rbd-snap-<image uuid: 32 hex>-<snap uuid: 16 hex>-<pool id>-<cluster>

(<cluster>: the clusterID, a monitors token or a fsid; at most 48 characters.)

The image of a volume is `pv-<uuid>` in pool <pool id> (the pool holding the header: `pool`;
its data may be in a dataPool); a CSI snapshot is the RBD snapshot `pvs-<snap uuid>` of that
image. Pool ids, not names: a renamed pool keeps its volumes. With <cluster> at most 48
characters, ids stay under CSI's 128 bytes (volume 96, snapshot 118 at most).

Crash-safe naming. In every pool polyvol uses, the omap of the object `polyvol.volumes` maps a
request name to its uuid (`name.<name>`) and holds the volume's record (`vol.<uuid>`: state,
requested size, source, parameters). The record is written, under a RADOS object lock with a
deadline, BEFORE the image is made, in state "creating"; every step after it (create or clone,
resize, image metadata `polyvol.volume_name`, flatten) is idempotent and the record turns
"ready" last. A CreateVolume retried after a crash at any point finds the record and finishes
the same image; it never makes a second one. DeleteVolume removes the image first and the
record last, and also removes what a half-made clone may have left (its source snapshot).
Snapshots have the same in `polyvol.snapshots` (`name.<name>`, `snap.<image>.<snap>`).
Names are unique per pool (Kubernetes names are UUIDs; the same name in another pool would be
another volume). Records also keep the cluster part of the id they were created under: one
cluster reached under two names (a clusterID and a monitors token) lists each volume once,
under its own id, and an alias id is treated as not found.

Snapshots, clones, flatten policy. Images are made with clone format 2: a clone needs no
protected snapshot, and a snapshot that still has clones can be deleted (RBD keeps it in its
trash namespace until the last clone is flattened or deleted). A volume cloned from a volume
goes through a hidden snapshot `pvc-<new uuid>` of the source, deleted right after the clone.
A clone is flattened (its data copied, the link to its parent cut) when its chain of
ancestors would be longer than `max_clone_depth` (default 3): reads never walk more than 3
parents, and a restored volume's snapshot chain stays short. Flattening happens inside
CreateVolume, so it costs time for large parents; that is the price of a bounded chain.
A volume deleted while it still has snapshots or clones cannot be removed from RBD yet: its
record goes (CSI sees it deleted) and the image stays as a "zombie" (`zombie.<uuid>`), removed
by the DeleteVolume/DeleteSnapshot that frees it.

Publication (ControllerPublishVolume: one node per volume). The node a volume is published to
is the key `pub.<uuid>` in the same `polyvol.volumes` omap, next to the volume's record:
`{"schema": 1, "node_id", "readonly", "published_at"}` (a reader refuses a newer schema).
Written with a compare-and-swap (omap_cmp in the same RADOS write op: the record unchanged, the
publication still what was read), so two controllers, or a DeleteVolume racing a publish,
cannot interleave. Not in the image's own metadata, although that would travel with the image:
librbd sends an image metadata change to the holder of the image's exclusive lock, and when
that holder is a lost node whose watch has not expired yet, metadata_set waits the whole watch
timeout (measured 30 s) and afterwards breaks the lock and blocklists the old node from the
controller; an omap write on another object takes about a millisecond and never touches the
image, its lock or its watchers. The omap is also what ListVolumes already reads, so
published_node_ids cost one more omap read per pool, not one image open per volume.
DeleteVolume removes the publication with the record. The publish_context is empty: the node
needs nothing the volume_context does not already carry (fencing a previous holder is the
node's attach; see driver.attach.rbd).

Image features. Default `layering,exclusive-lock,object-map,fast-diff,deep-flatten`: all five
are supported by librbd (what QEMU's rbd driver and rbd-nbd use) and by krbd since Linux 5.3
(Debian 12 has 6.1). layering is required (snapshots restore as clones); exclusive-lock keeps
one writer and is what object-map needs; object-map and fast-diff make delete, resize, flatten
and `rbd du` proportional to the data written instead of to the image size; deep-flatten lets
a flattened clone drop its parent even when the clone has snapshots of its own, which the
flatten policy needs. Refused: journaling (krbd cannot map it), striping (krbd supports only
the default layout), data-pool (set by `dataPool`). Older kernels: `imageFeatures: layering`.
"""

import base64
import binascii
import contextlib
import errno
import hashlib
import ipaddress
import json
import os
import re
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from .. import log, state
from ..errors import (Aborted, AlreadyExists, FailedPrecondition, InvalidArgument,
                      NotFound, OutOfRange, PermissionDenied, PolyvolError, ResourceExhausted,
                      Unavailable)
from ..parameters import COMMON_KEYS, TYPE, check_common
from ..rpc import request_secrets
from .base import (HEALTHY, Attachment, Backend, Condition, CreateRequest, Publication, Snapshot,
                   Volume, check_known_keys, check_publication)

_log = log.get("ceph")

TYPE_REPLICATED = "replicated"
TYPE_EC = "erasure-coded"
PREFIX = "rbd"

CLUSTER_ID_KEY = "clusterID"
MONITORS_KEY = "monitors"
POOL_KEY = "pool"
DATA_POOL_KEY = "dataPool"
FEATURES_KEY = "imageFeatures"
KEYS = COMMON_KEYS | {CLUSTER_ID_KEY, MONITORS_KEY, POOL_KEY, DATA_POOL_KEY, FEATURES_KEY}

# the CSI secrets, named as ceph-csi names them
SECRET_USER = "userID"
SECRET_KEY = "userKey"

# clusterID as a StorageClass or --ceph-config names it
CLUSTER_ID = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9_.-]{0,38}[A-Za-z0-9])?")
# the cluster part of an id: a clusterID, a fsid, or a monitors token (see monitors_token)
_CLUSTER_ID = r"[A-Za-z0-9](?:[A-Za-z0-9_.-]{0,46}[A-Za-z0-9])?"
VOLUME_ID = re.compile(
    rf"{PREFIX}-(?P<image>[0-9a-f]{{32}})-(?P<pool>[0-9]{{1,10}})-(?P<cluster>{_CLUSTER_ID})")
SNAPSHOT_ID = re.compile(
    rf"{PREFIX}-snap-(?P<image>[0-9a-f]{{32}})-(?P<snap>[0-9a-f]{{16}})-(?P<pool>[0-9]{{1,10}})"
    rf"-(?P<cluster>{_CLUSTER_ID})")
POOL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
USER_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
# one monitor: host:port; an IPv4 address may carry the messenger version (v1:/v2:) as Ceph
# writes it (Ceph does not resolve a host name that has one)
_MONITOR = r"(?:v[12]:[0-9]{1,3}(?:\.[0-9]{1,3}){3}|[A-Za-z0-9.-]+):[0-9]{1,5}"
MONITOR = re.compile(_MONITOR)
MONITOR_VECTOR = re.compile(rf"\[{_MONITOR}(?:,{_MONITOR})*\]")  # [v2:ip:3300,v1:ip:6789]

# feature name -> librbd bit (include/rbd/features.h); only the ones krbd and librbd both map
FEATURE_BITS = {"layering": 1, "exclusive-lock": 4, "object-map": 8, "fast-diff": 16,
                "deep-flatten": 32}
FEATURE_NEEDS = {"object-map": "exclusive-lock", "fast-diff": "object-map"}
FEATURES_REFUSED = {
    "striping": "krbd supports only the default striping",
    "journaling": "krbd cannot map journaled images",
    "data-pool": "set by the dataPool parameter",
}
DEFAULT_FEATURES = ",".join(FEATURE_BITS)

VOLUMES_OBJECT = "polyvol.volumes"
SNAPSHOTS_OBJECT = "polyvol.snapshots"
LOCK_NAME = "polyvol"
LOCK_SECONDS = 30          # a crashed lock holder blocks others at most this long
LOCK_WAIT = 10.0           # then ABORTED
IMAGE_META_NAME = "polyvol.volume_name"
IMAGE_META_ID = "polyvol.volume_id"
PUBLICATION_SCHEMA = 1     # of the `pub.<uuid>` records (see "Publication" above)
SWAP_ATTEMPTS = 5          # compare-and-swap retries before ABORTED (the sidecar retries)

CONNECT_TIMEOUT = 5        # client_mount_timeout: monitors must answer within this
MON_OP_TIMEOUT = 10        # rados_mon_op_timeout
OSD_OP_TIMEOUT = 30        # rados_osd_op_timeout: above the ~20 s a hung OSD takes to be marked down
IDLE_SECONDS = 300         # an unused connection is closed after this
DENIED_SECONDS = 10        # a refused key is refused again without asking the cluster
POOL_CACHE_SECONDS = 30
MAX_CLONE_DEPTH = 3

STATE_CREATING = "creating"
STATE_READY = "ready"

CTX_CLUSTER = "polyvol.csi.io/ceph-cluster"
CTX_MONITORS = "polyvol.csi.io/ceph-monitors"
CTX_POOL = "polyvol.csi.io/ceph-pool"
CTX_DATA_POOL = "polyvol.csi.io/ceph-data-pool"
CTX_IMAGE = "polyvol.csi.io/ceph-image"

# Test-only crash points: `POLYVOL_FAILPOINTS=after-image-create` makes the plugin exit at
# once at that point, as a crash would (tests/test_ceph_backend.py kills it exactly there).
FAILPOINTS_ENV = "POLYVOL_FAILPOINTS"


def _failpoint(name: str) -> None:
    if name in os.environ.get(FAILPOINTS_ENV, "").split(","):
        _log.error("failpoint reached: exiting like a crash", failpoint=name)
        os._exit(86)


def image_name(image_uuid: str) -> str:
    return f"pv-{image_uuid}"


def snap_name(snap_uuid: str) -> str:
    return f"pvs-{snap_uuid}"


def clone_snap_name(image_uuid: str) -> str:
    return f"pvc-{image_uuid}"


def volume_id_of(image_uuid: str, pool_id: int, cluster_id: str) -> str:
    return f"{PREFIX}-{image_uuid}-{pool_id}-{cluster_id}"


def snapshot_id_of(image_uuid: str, snap_uuid: str, pool_id: int, cluster_id: str) -> str:
    return f"{PREFIX}-snap-{image_uuid}-{snap_uuid}-{pool_id}-{cluster_id}"


def _add_omap_changes(ioctx, op, set_: dict[str, str] | None, remove: list[str] | None) -> None:
    if set_:
        ioctx.set_omap(op, tuple(set_), tuple(v.encode() for v in set_.values()))
    if remove:
        ioctx.remove_omap_keys(op, tuple(remove))


def _bindings():
    try:
        import rados
        import rbd
    except ImportError:
        raise FailedPrecondition(
            "the replicated and erasure-coded classes need Ceph's librados/librbd Python "
            "bindings (Debian: python3-rados, python3-rbd; scripts/setup.sh links them into the "
            "virtualenv)") from None
    return rados, rbd


# --- parameters ------------------------------------------------------------------------------

def check_features(text: str) -> str:
    """A validated imageFeatures list, in canonical order."""
    wanted = [f.strip() for f in text.split(",") if f.strip()]
    for name in wanted:
        if name in FEATURES_REFUSED:
            raise InvalidArgument(f"imageFeatures: {name} is not allowed ({FEATURES_REFUSED[name]})")
        if name not in FEATURE_BITS:
            raise InvalidArgument(f"imageFeatures: unknown feature {name!r}; choose from "
                                  f"{', '.join(FEATURE_BITS)}")
    if "layering" not in wanted:
        raise InvalidArgument("imageFeatures must include layering (snapshots are restored as clones)")
    for name, needs in FEATURE_NEEDS.items():
        if name in wanted and needs not in wanted:
            raise InvalidArgument(f"imageFeatures: {name} needs {needs}")
    return ",".join(f for f in FEATURE_BITS if f in wanted)


def _feature_bits(text: str) -> int:
    return sum(FEATURE_BITS[f] for f in text.split(",") if f)


def check_monitors(entries) -> str:
    """A list of monitor addresses (or a comma-separated string) as a librados mon_host."""
    if isinstance(entries, str):
        entries = [e for e in entries.split(",") if e]
    if not entries:
        raise InvalidArgument("no monitors given")
    for entry in entries:
        if not isinstance(entry, str) or not (MONITOR.fullmatch(entry) or MONITOR_VECTOR.fullmatch(entry)):
            raise InvalidArgument(f"monitor address {entry!r} is not host:port, v1:IP:port or "
                                  f"v2:IP:port (or a Ceph address vector like "
                                  f"[v2:10.0.0.1:3300,v1:10.0.0.1:6789])")
    return ",".join(entries)


MONITORS_TOKEN_PREFIX = "m."
_IPV4_MONITOR = re.compile(r"(?:(v[12]):)?([0-9]{1,3}(?:\.[0-9]{1,3}){3}):([0-9]{1,5})")
_MONITOR_KINDS = {None: 0, "v1": 1, "v2": 2}


def monitors_token(monitors: str) -> str | None:
    """The cluster part of the ids of a StorageClass that names `monitors` instead of a
    clusterID: the monitors themselves, packed (kind, IPv4 address, port: 7 bytes each) and
    base32-encoded, when they are IPv4 literals and the token fits (up to 4 monitors). Any
    plugin can then find the cluster of such a volume from its id alone, without
    --ceph-config or state. None otherwise (host names, IPv6, more monitors): the cluster's
    fsid is used, and the plugin must have learned fsid -> monitors (see ClusterDirectory)."""
    packed = b""
    for entry in monitors.split(","):
        m = _IPV4_MONITOR.fullmatch(entry)
        if m is None or not 0 < int(m[3]) < 65536:
            return None
        try:
            address = ipaddress.IPv4Address(m[2])
        except ValueError:
            return None
        packed += bytes([_MONITOR_KINDS[m[1]]]) + address.packed + int(m[3]).to_bytes(2, "big")
    token = MONITORS_TOKEN_PREFIX + base64.b32encode(packed).decode().rstrip("=").lower()
    return token if len(token) <= 48 else None


def monitors_from_token(token: str) -> str | None:
    """The monitors a monitors_token names (None: not such a token)."""
    if not token.startswith(MONITORS_TOKEN_PREFIX):
        return None
    body = token[len(MONITORS_TOKEN_PREFIX):].upper()
    try:
        packed = base64.b32decode(body + "=" * (-len(body) % 8))
    except (binascii.Error, ValueError):
        return None
    if not packed or len(packed) % 7:
        return None
    kinds = {v: k for k, v in _MONITOR_KINDS.items()}
    entries = []
    for at in range(0, len(packed), 7):
        kind, address, port = packed[at], packed[at + 1:at + 5], int.from_bytes(packed[at + 5:at + 7], "big")
        if kind not in kinds or not port:
            return None
        prefix = f"{kinds[kind]}:" if kinds[kind] else ""
        entries.append(f"{prefix}{ipaddress.IPv4Address(address)}:{port}")
    text = ",".join(entries)
    return text if monitors_token(text) == token else None


# --- credentials -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Credentials:
    user: str
    key: str = field(repr=False)

    def digest(self, monitors: str, cluster_id: str | None = None) -> str:
        return hashlib.sha256(
            f"{cluster_id or ''}\0{monitors}\0{self.user}\0{self.key}".encode()).hexdigest()


def credentials_from(secrets: dict, required: bool) -> Credentials | None:
    """The cephx user and key of a request's secrets, checked; None when there are none and
    none are required. The key is never part of a message."""
    user, key = secrets.get(SECRET_USER, ""), secrets.get(SECRET_KEY, "")
    if not user and not key:
        if required:
            raise InvalidArgument(
                f"the request carries no Ceph credentials: its secrets need {SECRET_USER} and "
                f"{SECRET_KEY} (a cephx user and its key; in Kubernetes, the StorageClass "
                f"csi.storage.k8s.io/*-secret-name parameters name the Secret)")
        return None
    if not user or not key:
        missing = SECRET_USER if not user else SECRET_KEY
        raise InvalidArgument(f"the request's secrets have no {missing}: Ceph needs both "
                              f"{SECRET_USER} and {SECRET_KEY}")
    user = user.removeprefix("client.")
    if not USER_ID.fullmatch(user):
        raise InvalidArgument(f"secret {SECRET_USER} {user!r} is not a cephx user id")
    try:
        blob = base64.b64decode(key.strip(), validate=True)
    except (binascii.Error, ValueError):
        blob = b""
    # a cephx key is base64 of: type (u16, 1 = AES), created (u32 + u32), length (u16 = 16), secret
    if len(blob) != 28 or blob[0:2] != b"\x01\x00" or blob[10:12] != b"\x10\x00":
        raise InvalidArgument(f"secret {SECRET_KEY} is not a cephx key (base64, as "
                              f"`ceph auth get-key` prints it); its value is not shown")
    return Credentials(user, key.strip())


# --- clusters --------------------------------------------------------------------------------

class ClusterDirectory:
    """clusterID -> monitors: the --ceph-config file (re-read when it changes), then the
    clusters learned from StorageClasses that name monitors (kept in the state directory)."""

    def __init__(self, path: str = "", state_dir: str = ""):
        self.path = Path(path) if path else None
        self.learned_path = Path(state_dir) / "ceph" / "clusters.json" if state_dir else None
        self._mtime = None
        self._configured: dict[str, str] = {}
        self._learned: dict[str, str] | None = None
        self._lock = threading.Lock()

    def configured(self) -> dict[str, str]:
        if self.path is None:
            return {}
        with self._lock:
            try:
                mtime = self.path.stat().st_mtime_ns
            except FileNotFoundError:
                raise FailedPrecondition(f"--ceph-config {self.path} does not exist") from None
            if mtime != self._mtime:
                self._configured = self._parse(json.loads(self.path.read_text()))
                self._mtime = mtime
                _log.info("ceph clusters loaded", path=str(self.path), clusters=sorted(self._configured))
            return dict(self._configured)

    def _parse(self, document) -> dict[str, str]:
        entries = document.get("clusters", []) if isinstance(document, dict) else document
        clusters = {}
        for entry in entries if isinstance(entries, list) else []:
            cluster_id = entry.get("clusterID", "") if isinstance(entry, dict) else ""
            if not CLUSTER_ID.fullmatch(cluster_id):
                raise FailedPrecondition(f"{self.path}: clusterID {cluster_id!r} must be 1-40 letters, "
                                         f"digits, '.', '_' or '-'")
            try:
                clusters[cluster_id] = check_monitors(entry.get("monitors") or [])
            except InvalidArgument as error:
                raise FailedPrecondition(f"{self.path}: cluster {cluster_id}: {error}") from None
        return clusters

    def _learned_map(self) -> dict[str, str]:
        if self._learned is None:
            record = state.read(self.learned_path) if self.learned_path else None
            self._learned = dict((record or {}).get("clusters", {}))
        return self._learned

    def monitors(self, cluster_id: str) -> str:
        configured = self.configured()
        if cluster_id in configured:
            return configured[cluster_id]
        with self._lock:
            learned = self._learned_map().get(cluster_id)
        if learned:
            return learned
        from_token = monitors_from_token(cluster_id)
        if from_token:
            return from_token
        where = f"--ceph-config {self.path}" if self.path else "no --ceph-config file"
        raise FailedPrecondition(f"Ceph cluster {cluster_id!r} is not known to this plugin ({where}); "
                                 f"add its clusterID and monitors to the --ceph-config file")

    def learn(self, cluster_id: str, monitors: str) -> None:
        with self._lock:
            learned = self._learned_map()
            if learned.get(cluster_id) == monitors:
                return
            learned[cluster_id] = monitors
            if self.learned_path:
                self.learned_path.parent.mkdir(parents=True, exist_ok=True)
                state.write_atomic(self.learned_path, {"clusters": learned})
        _log.info("ceph cluster learned from a StorageClass", cluster_id=cluster_id, monitors=monitors)


# --- connections -----------------------------------------------------------------------------

@dataclass
class _Handle:
    rados: object
    cluster_id: str
    monitors: str
    user: str
    last_used: float
    users: int = 0


class Connections:
    """Connected librados handles, one per (monitors, user, key), shared by threads, closed
    when idle. Also remembers recently refused keys so retries fail without a round trip."""

    def __init__(self, idle_seconds: float = IDLE_SECONDS):
        self.idle_seconds = idle_seconds
        self._lock = threading.Lock()
        self._handles: dict[str, _Handle] = {}
        self._latest: dict[str, str] = {}      # cluster id -> digest of its latest good handle
        self._denied: dict[str, tuple[float, str]] = {}
        self._connecting: dict[str, threading.Lock] = {}

    @contextlib.contextmanager
    def lease(self, monitors: str, credentials: Credentials, cluster_id: str | None):
        """A connected handle for these credentials; cluster_id None: learn it (the fsid)."""
        digest = credentials.digest(monitors, cluster_id)
        handle = self._take(digest)
        if handle is None:
            with self._connect_lock(digest):
                handle = self._take(digest)
                if handle is None:
                    handle = self._open(digest, monitors, credentials, cluster_id)
        try:
            yield handle
        finally:
            self._give_back(handle)

    @contextlib.contextmanager
    def lease_latest(self, cluster_id: str, monitors: str | None = None):
        """The latest connection to this cluster (or, failing that, to these monitors)."""
        with self._lock:
            digest = self._latest.get(cluster_id)
            handle = self._handles.get(digest) if digest else None
            if handle is None and monitors:
                handle = next((h for d, h in sorted(self._handles.items(),
                                                    key=lambda item: -item[1].last_used)
                               if h.monitors == monitors), None)
            if handle is not None:
                handle.users += 1
        if handle is None:
            # Not UNAVAILABLE: ControllerGetVolume would report that as an abnormal volume.
            raise FailedPrecondition(
                f"no Ceph credentials for cluster {cluster_id} yet: this request carries no "
                f"secrets, and polyvol keeps cephx keys only in memory, from the latest request "
                f"for this cluster that carried them (none since the plugin started)")
        try:
            yield handle
        finally:
            self._give_back(handle)

    def cluster_of(self, monitors: str) -> str:
        """The cluster id of a connection to these monitors, or ""."""
        with self._lock:
            return next((h.cluster_id for h in self._handles.values() if h.monitors == monitors), "")

    def cluster_ids(self) -> list[str]:
        with self._lock:
            return sorted(self._latest)

    def close_all(self) -> None:
        with self._lock:
            handles, self._handles, self._latest = list(self._handles.values()), {}, {}
        for handle in handles:
            with contextlib.suppress(Exception):
                handle.rados.shutdown()

    def _connect_lock(self, digest: str) -> threading.Lock:
        with self._lock:
            return self._connecting.setdefault(digest, threading.Lock())

    def _take(self, digest: str) -> _Handle | None:
        now = time.monotonic()
        idle = []
        with self._lock:
            for key, handle in list(self._handles.items()):
                if handle.users == 0 and now - handle.last_used > self.idle_seconds:
                    idle.append(self._handles.pop(key))
                    if self._latest.get(handle.cluster_id) == key:
                        del self._latest[handle.cluster_id]
            handle = self._handles.get(digest)
            if handle is not None:
                handle.users += 1
                handle.last_used = now
                self._latest[handle.cluster_id] = digest
            else:
                denied = self._denied.get(digest)
                if denied and denied[0] > now:
                    raise PermissionDenied(denied[1] + " (refused again without asking: the same "
                                           "key was refused less than "
                                           f"{DENIED_SECONDS} s ago)")
        for handle_ in idle:
            _log.debug("closing idle ceph connection", cluster_id=handle_.cluster_id, user=handle_.user)
            with contextlib.suppress(Exception):
                handle_.rados.shutdown()
        return handle

    def _give_back(self, handle: _Handle) -> None:
        with self._lock:
            handle.users -= 1
            handle.last_used = time.monotonic()

    def _open(self, digest: str, monitors: str, credentials: Credentials,
              cluster_id: str | None) -> _Handle:
        rados, _ = _bindings()
        started = time.monotonic()
        where = f"Ceph cluster {cluster_id or monitors}"
        # Logging settings first: librados applies conf keys in order.
        conf = {
            "log_to_stderr": "false", "err_to_stderr": "false", "log_file": "",
            "admin_socket": "", "keyring": "", "mon_host": monitors, "key": credentials.key,
            "client_mount_timeout": str(CONNECT_TIMEOUT),
            "rados_mon_op_timeout": str(MON_OP_TIMEOUT),
            "rados_osd_op_timeout": str(OSD_OP_TIMEOUT),
            "rbd_default_clone_format": "2",
        }
        client = rados.Rados(rados_id=credentials.user, conf=conf)
        try:
            client.connect(timeout=CONNECT_TIMEOUT)
        except rados.Error as error:
            with contextlib.suppress(Exception):
                client.shutdown()  # else librados keeps hunting for monitors forever
            code = getattr(error, "errno", None)
            if code in (errno.EACCES, errno.EPERM):
                message = (f"{where} refused cephx user {credentials.user}: wrong key, or no such "
                           f"user (check the Secret's {SECRET_USER} and {SECRET_KEY})")
                with self._lock:
                    self._denied[digest] = (time.monotonic() + DENIED_SECONDS, message)
                _log.warning("ceph credentials refused", cluster=cluster_id or monitors,
                             user=credentials.user)
                raise PermissionDenied(message) from None
            if code == errno.EINVAL:
                raise InvalidArgument(f"librados refused the monitor addresses {monitors} "
                                      f"(a name that does not resolve?) or the settings for "
                                      f"user {credentials.user}") from None
            if code == errno.ETIMEDOUT or isinstance(error, rados.TimedOut):
                raise Unavailable(f"no monitor of {where} ({monitors}) answered within "
                                  f"{CONNECT_TIMEOUT} s") from None
            raise Unavailable(f"cannot connect to {where}: {error}") from None
        if cluster_id is None:
            cluster_id = client.get_fsid()
        handle = _Handle(client, cluster_id, monitors, credentials.user, time.monotonic(), users=1)
        with self._lock:
            self._handles[digest] = handle
            self._latest[cluster_id] = digest
            self._denied.pop(digest, None)
        _log.info("ceph connected", cluster_id=cluster_id, user=credentials.user,
                  ms=round((time.monotonic() - started) * 1000, 1))
        return handle


# --- errors ----------------------------------------------------------------------------------

_ERRNO_ERRORS = {
    errno.ENOENT: NotFound, errno.EACCES: PermissionDenied, errno.EPERM: PermissionDenied,
    errno.ENOSPC: ResourceExhausted, errno.EDQUOT: ResourceExhausted,
    errno.EBUSY: FailedPrecondition, errno.ENOTEMPTY: FailedPrecondition,
    errno.EEXIST: AlreadyExists, errno.EINVAL: InvalidArgument,
    errno.ETIMEDOUT: Unavailable, errno.ESHUTDOWN: Unavailable, errno.ENOTCONN: Unavailable,
}


@contextlib.contextmanager
def _ceph_errors(what: str):
    """librados/librbd exceptions as polyvol's typed errors (by errno)."""
    rados, rbd = _bindings()
    try:
        yield
    except (rados.Error, rbd.Error) as error:
        code = getattr(error, "errno", None)
        if code is not None and code < 0:
            code = -code
        if isinstance(error, (getattr(rados, "TimedOut", ()), getattr(rbd, "Timeout", ()))):
            code = errno.ETIMEDOUT
        cls = _ERRNO_ERRORS.get(code, PolyvolError)
        raise cls(f"{what}: {error}") from None


# --- the backend -----------------------------------------------------------------------------

@dataclass
class _Target:
    """Where a new volume goes, from validated StorageClass parameters."""
    cluster_id: str           # "" until connected, when only monitors were given
    monitors: str
    pool: str
    data_pool: str
    features: str


class _Session:
    """One operation's view of a cluster: a connected handle and opened pools."""

    def __init__(self, handle: _Handle, pools_cache, cluster_id: str | None = None):
        self.handle = handle
        self.rados = handle.rados
        self.cluster_id = cluster_id or handle.cluster_id
        self.monitors = handle.monitors
        self._pools_cache = pools_cache
        self._ioctx: dict[str, object] = {}

    def ioctx(self, pool: str):
        if pool not in self._ioctx:
            rados, _ = _bindings()
            try:
                self._ioctx[pool] = self.rados.open_ioctx(pool)
            except rados.ObjectNotFound:
                raise NotFound(f"pool {pool} does not exist in Ceph cluster {self.cluster_id}") from None
        return self._ioctx[pool]

    def pool_name(self, pool_id: int) -> str:
        name = self.rados.pool_reverse_lookup(pool_id)
        if not name:
            raise NotFound(f"pool {pool_id} does not exist in Ceph cluster {self.cluster_id}")
        return name

    def mon(self, prefix: str, **args):
        command = {"prefix": prefix, "format": "json", **args}
        code, out, status = self.rados.mon_command(json.dumps(command), b"", timeout=MON_OP_TIMEOUT)
        if code != 0:
            cls = _ERRNO_ERRORS.get(-code, PolyvolError)
            raise cls(f"ceph {prefix} on cluster {self.cluster_id}: {status or os.strerror(-code)}")
        return json.loads(out) if out else {}

    def pools(self) -> dict[str, dict]:
        return self._pools_cache(self)

    def close(self) -> None:
        for ioctx in self._ioctx.values():
            with contextlib.suppress(Exception):
                ioctx.close()
        self._ioctx.clear()


class CephBackend(Backend):
    types = (TYPE_REPLICATED, TYPE_EC)
    id_prefix = PREFIX
    publishes = True  # one node per image: RWO enforced here, not only by Kubernetes

    def __init__(self, clusters: ClusterDirectory | None = None, attacher=None,
                 max_clone_depth: int = MAX_CLONE_DEPTH):
        self.clusters = clusters or ClusterDirectory()
        self.attacher = attacher
        self.max_clone_depth = max_clone_depth
        self.connections = Connections()
        self._pool_info: dict[str, tuple[float, dict]] = {}
        self._pool_info_lock = threading.Lock()

    # --- sessions --------------------------------------------------------------------------

    @contextlib.contextmanager
    def _session(self, cluster_id: str | None, *, required: bool, monitors: str | None = None,
                 secrets: dict | None = None):
        credentials = credentials_from(request_secrets() if secrets is None else secrets, required)
        if credentials is None:
            if monitors is None:
                with contextlib.suppress(FailedPrecondition):
                    monitors = self.clusters.monitors(cluster_id)
            lease = self.connections.lease_latest(cluster_id, monitors)
        else:
            if monitors is None:
                monitors = self.clusters.monitors(cluster_id)
            lease = self.connections.lease(monitors, credentials, cluster_id)
        with lease as handle:
            session = _Session(handle, self._pools, cluster_id)
            try:
                with _ceph_errors(f"Ceph cluster {handle.cluster_id}"):
                    yield session
            finally:
                session.close()

    def _pools(self, session: _Session) -> dict[str, dict]:
        """name -> {id, kind, size, k, m, ec_overwrites}, cached briefly per cluster."""
        key = session.monitors
        with self._pool_info_lock:
            cached = self._pool_info.get(key)
            if cached and time.monotonic() - cached[0] < POOL_CACHE_SECONDS:
                return cached[1]
        pools = {}
        profiles = {}
        for entry in session.mon("osd pool ls", detail="detail"):
            info = {"id": entry["pool_id"], "size": entry["size"],
                    "kind": "erasure" if entry.get("type") == 3 else "replicated",
                    "ec_overwrites": "ec_overwrites" in entry.get("flags_names", "")}
            if info["kind"] == "erasure":
                name = entry.get("erasure_code_profile", "")
                if name not in profiles:
                    profiles[name] = session.mon("osd erasure-code-profile get", name=name)
                info["k"] = int(profiles[name].get("k", 0))
                info["m"] = int(profiles[name].get("m", 0))
            pools[entry["pool_name"]] = info
        with self._pool_info_lock:
            self._pool_info[key] = (time.monotonic(), pools)
        return pools

    @staticmethod
    def _copies(pools: dict, data_pool: str) -> float:
        info = pools.get(data_pool)
        if info is None:
            return 0
        if info["kind"] == "erasure" and info.get("k"):
            return (info["k"] + info["m"]) / info["k"]
        return float(info["size"])

    # --- parameters ------------------------------------------------------------------------

    def check_parameters(self, parameters: dict) -> dict:
        class_type = parameters.get(TYPE, "")
        check_known_keys(parameters, KEYS, class_type)
        result = check_common(parameters)
        cluster_id, monitors = parameters.get(CLUSTER_ID_KEY, ""), parameters.get(MONITORS_KEY, "")
        if cluster_id and monitors:
            raise InvalidArgument(f"give {CLUSTER_ID_KEY} or {MONITORS_KEY}, not both "
                                  f"(the monitors of a clusterID come from --ceph-config)")
        if not cluster_id and not monitors:
            raise InvalidArgument(f"type {class_type} needs {CLUSTER_ID_KEY} (a cluster of the "
                                  f"plugin's --ceph-config) or {MONITORS_KEY}")
        if cluster_id and not CLUSTER_ID.fullmatch(cluster_id):
            raise InvalidArgument(f"{CLUSTER_ID_KEY} {cluster_id!r} must be 1-40 letters, digits, "
                                  f"'.', '_' or '-', starting and ending with a letter or digit")
        if monitors:
            result[MONITORS_KEY] = check_monitors(monitors)
        pool = parameters.get(POOL_KEY, "")
        if not POOL_NAME.fullmatch(pool):
            raise InvalidArgument(f"type {class_type} needs {POOL_KEY}: the replicated pool that "
                                  f"holds the images" + (f" ({pool!r} is not a pool name)" if pool else ""))
        data_pool = parameters.get(DATA_POOL_KEY, "")
        if class_type == TYPE_EC:
            if not POOL_NAME.fullmatch(data_pool):
                raise InvalidArgument(f"type {TYPE_EC} needs {DATA_POOL_KEY}: the erasure-coded pool "
                                      f"that holds the data" + (f" ({data_pool!r} is not a pool name)"
                                                                if data_pool else ""))
            if data_pool == pool:
                raise InvalidArgument(f"{DATA_POOL_KEY} must differ from {POOL_KEY}: RBD keeps image "
                                      f"headers in a replicated pool")
        elif data_pool:
            raise InvalidArgument(f"type {TYPE_REPLICATED} keeps the data in {POOL_KEY}; "
                                  f"{DATA_POOL_KEY} is for type {TYPE_EC}")
        result[FEATURES_KEY] = check_features(parameters.get(FEATURES_KEY) or DEFAULT_FEATURES)
        return result

    def _target(self, parameters: dict) -> _Target:
        cluster_id = parameters.get(CLUSTER_ID_KEY, "")
        monitors = parameters.get(MONITORS_KEY) or self.clusters.monitors(cluster_id)
        if not cluster_id:
            cluster_id = monitors_token(monitors) or ""  # "": the fsid, learned at connect
        return _Target(cluster_id, monitors, parameters[POOL_KEY],
                       parameters.get(DATA_POOL_KEY, ""), parameters[FEATURES_KEY])

    def _check_pools(self, session: _Session, target: _Target, class_type: str) -> float:
        pools = session.pools()
        if target.pool not in pools or (target.data_pool and target.data_pool not in pools):
            with self._pool_info_lock:
                self._pool_info.pop(session.monitors, None)  # a pool made since: look again
            pools = session.pools()
        pool = pools.get(target.pool)
        if pool is None:
            raise InvalidArgument(f"pool {target.pool} does not exist in Ceph cluster {session.cluster_id}")
        if pool["kind"] != "replicated":
            raise InvalidArgument(f"pool {target.pool} is erasure-coded; RBD images need a "
                                  f"replicated {POOL_KEY} (put the EC pool in {DATA_POOL_KEY}, type {TYPE_EC})")
        if class_type == TYPE_EC:
            data = pools.get(target.data_pool)
            if data is None:
                raise InvalidArgument(f"{DATA_POOL_KEY} {target.data_pool} does not exist in Ceph "
                                      f"cluster {session.cluster_id}")
            if data["kind"] != "erasure":
                raise InvalidArgument(f"{DATA_POOL_KEY} {target.data_pool} is not erasure-coded; "
                                      f"use type {TYPE_REPLICATED} for replicated pools")
            if not data["ec_overwrites"]:
                raise InvalidArgument(f"{DATA_POOL_KEY} {target.data_pool} does not allow overwrites; "
                                      f"run: ceph osd pool set {target.data_pool} allow_ec_overwrites true")
        return self._copies(pools, target.data_pool or target.pool)

    # --- omap records ------------------------------------------------------------------------

    @staticmethod
    def _omap_get(ioctx, obj: str, keys: list[str]) -> dict[str, str]:
        rados, _ = _bindings()
        with rados.ReadOpCtx() as op:
            values, _ = ioctx.get_omap_vals_by_keys(op, tuple(keys))
            try:
                ioctx.operate_read_op(op, obj)
            except rados.ObjectNotFound:
                return {}
            return {k: v.decode() for k, v in values}

    @staticmethod
    def _omap_list(ioctx, obj: str, prefix: str) -> dict[str, str]:
        rados, _ = _bindings()
        found, after = {}, ""
        while True:
            with rados.ReadOpCtx() as op:
                values, _ = ioctx.get_omap_vals(op, after, prefix, 1000)
                try:
                    ioctx.operate_read_op(op, obj)
                except rados.ObjectNotFound:
                    return found
                batch = [(k, v.decode()) for k, v in values]
            found.update(batch)
            if len(batch) < 1000:
                return found
            after = batch[-1][0]

    @staticmethod
    def _omap_write(ioctx, obj: str, set_: dict[str, str] | None = None,
                    remove: list[str] | None = None) -> None:
        rados, _ = _bindings()
        with rados.WriteOpCtx() as op:
            _add_omap_changes(ioctx, op, set_, remove)
            try:
                ioctx.operate_write_op(op, obj)
            except rados.ObjectNotFound:
                if set_:
                    raise

    @staticmethod
    def _omap_swap(ioctx, obj: str, expect: dict[str, str], set_: dict[str, str] | None = None,
                   remove: list[str] | None = None) -> bool:
        """Write only if every key of `expect` still holds that value ("": absent), in one
        RADOS write op (omap_cmp): a compare-and-swap on the object, no lock round trips.
        False when a value changed since it was read (the caller reads again)."""
        rados, _ = _bindings()
        with rados.WriteOpCtx() as op:
            for key, value in expect.items():
                # The binding passes len(str) as the byte length: only ASCII compares right
                # (polyvol's records are json.dumps output, ASCII by default).
                if not value.isascii():
                    raise FailedPrecondition(f"{obj} {key} in pool {ioctx.get_pool_name()} is not "
                                             f"ASCII JSON: polyvol did not write it")
                op.omap_cmp(key, value, rados.LIBRADOS_CMPXATTR_OP_EQ)
            _add_omap_changes(ioctx, op, set_, remove)
            try:
                ioctx.operate_write_op(op, obj)
            except rados.Error as error:
                if abs(getattr(error, "errno", 0) or 0) == errno.ECANCELED:
                    return False  # a comparison failed: nothing was written
                raise
        return True

    @contextlib.contextmanager
    def _naming_lock(self, ioctx, obj: str):
        """Exclusive RADOS lock on a naming object, with a deadline: a crashed holder's lock
        expires after LOCK_SECONDS. Serialises name reservations across controllers."""
        rados, _ = _bindings()
        cookie = uuid.uuid4().hex
        deadline = time.monotonic() + LOCK_WAIT
        while True:
            try:
                ioctx.lock_exclusive(obj, LOCK_NAME, cookie, desc="polyvol naming",
                                     duration=LOCK_SECONDS)
                break
            except (rados.ObjectBusy, rados.ObjectExists):
                if time.monotonic() > deadline:
                    raise Aborted(f"{obj} in pool {ioctx.get_pool_name()} is locked by another "
                                  f"polyvol operation; retry") from None
                time.sleep(0.05)
        try:
            yield
        finally:
            with contextlib.suppress(rados.Error):
                ioctx.unlock(obj, LOCK_NAME, cookie)

    def _volume_record(self, ioctx, image_uuid: str, cluster: str | None = None) -> dict | None:
        """The record of a volume; with `cluster`, only if its id names the cluster that way
        (one physical cluster may be reached under several names: a clusterID, a monitors
        token; a volume has exactly one id, the one it was created with)."""
        raw = self._omap_get(ioctx, VOLUMES_OBJECT, [f"vol.{image_uuid}"]).get(f"vol.{image_uuid}")
        record = json.loads(raw) if raw else None
        if record and cluster is not None and record.get("cluster", cluster) != cluster:
            return None
        return record

    def _read_volume(self, ioctx, image_uuid: str, cluster: str | None = None) -> tuple[dict | None, str, str]:
        """(record, the record as stored, the publication as stored, "" for none) in one omap
        read; the record is None as in _volume_record."""
        keys = [f"vol.{image_uuid}", f"pub.{image_uuid}"]
        found = self._omap_get(ioctx, VOLUMES_OBJECT, keys)
        raw, raw_publication = found.get(keys[0], ""), found.get(keys[1], "")
        record = json.loads(raw) if raw else None
        if record and cluster is not None and record.get("cluster", cluster) != cluster:
            record = None
        return record, raw, raw_publication

    @staticmethod
    def _publication(raw: str, volume_id: str) -> Publication | None:
        if not raw:
            return None
        record = json.loads(raw)
        schema = record.get("schema")
        if not isinstance(schema, int) or schema > PUBLICATION_SCHEMA:
            raise FailedPrecondition(
                f"the publication record of volume {volume_id} has schema {schema!r}; this "
                f"polyvol understands up to {PUBLICATION_SCHEMA}: upgrade the polyvol controller")
        return Publication(record["node_id"], bool(record["readonly"]))

    def _write_volume_record(self, ioctx, record: dict, name_too: bool = False) -> None:
        entries = {f"vol.{record['uuid']}": json.dumps(record, sort_keys=True)}
        if name_too:
            entries[f"name.{record['name']}"] = record["uuid"]
        self._omap_write(ioctx, VOLUMES_OBJECT, entries)

    # --- controller: volumes -----------------------------------------------------------------

    def create_volume(self, request: CreateRequest) -> Volume:
        rados, rbd = _bindings()
        parameters = request.parameters
        class_type = parameters[TYPE]
        target = self._target(parameters)
        with self._session(target.cluster_id or None, required=True, monitors=target.monitors,
                           secrets=request.secrets) as s:
            if not target.cluster_id:
                self.clusters.learn(s.cluster_id, target.monitors)
            copies = self._check_pools(s, target, class_type)
            ioctx = s.ioctx(target.pool)
            pool_id = ioctx.get_pool_id()
            source_size = self._source_size(s, request)
            if source_size > request.size_bytes:
                raise OutOfRange(f"the volume must be at least as large as its source "
                                 f"({source_size} bytes), not {request.size_bytes}")
            stored = {k: v for k, v in parameters.items() if not k.startswith("csi.storage.k8s.io/")}
            with self._naming_lock(ioctx, VOLUMES_OBJECT):
                existing = self._omap_get(ioctx, VOLUMES_OBJECT, [f"name.{request.name}"])
                image_uuid = existing.get(f"name.{request.name}")
                record = self._volume_record(ioctx, image_uuid) if image_uuid else None
                if record is None:
                    image_uuid = image_uuid or uuid.uuid4().hex
                    record = {"uuid": image_uuid, "name": request.name, "state": STATE_CREATING,
                              "cluster": s.cluster_id,
                              "requested_bytes": request.size_bytes, "size_bytes": request.size_bytes,
                              "source_snapshot_id": request.source_snapshot_id,
                              "source_volume_id": request.source_volume_id,
                              "data_pool": target.data_pool, "features": target.features,
                              "type": class_type, "parameters": stored, "created_at": time.time()}
                    self._write_volume_record(ioctx, record, name_too=True)
                    _log.info("volume name reserved", name=request.name, image=image_name(image_uuid),
                              pool=target.pool, cluster_id=s.cluster_id)
            self._check_same(record, request, target, class_type)
            volume_id = volume_id_of(image_uuid, pool_id, record.get("cluster", s.cluster_id))
            if record["state"] != STATE_READY:
                self._materialize(s, ioctx, volume_id, record)
            return self._volume(s, target.pool, pool_id, record, copies=copies)

    @staticmethod
    def _check_same(record: dict, request: CreateRequest, target: _Target, class_type: str) -> None:
        differences = []
        if record["requested_bytes"] != request.size_bytes:
            differences.append(f"size {record['requested_bytes']} bytes, not {request.size_bytes}")
        if record["source_snapshot_id"] != request.source_snapshot_id \
                or record["source_volume_id"] != request.source_volume_id:
            differences.append("another content source")
        if record.get("type", class_type) != class_type or record["data_pool"] != target.data_pool:
            differences.append(f"type {record.get('type')} with dataPool {record['data_pool'] or '-'}")
        if record["features"] != target.features:
            differences.append(f"imageFeatures {record['features']}")
        if differences:
            raise AlreadyExists(f"a volume named {request.name!r} already exists with "
                                f"{'; '.join(differences)}")

    def _source_size(self, s: _Session, request: CreateRequest) -> int:
        """The size of the snapshot or volume a new volume is copied from (0: none)."""
        _, rbd = _bindings()
        if request.source_snapshot_id:
            m = self._parse_snapshot(request.source_snapshot_id, s.cluster_id)
            ioctx = s.ioctx(s.pool_name(int(m["pool"])))
            record = self._snapshot_record(ioctx, m["image"], m["snap"], m["cluster"])
            if record is None or record.get("state") != STATE_READY:
                raise NotFound(f"snapshot {request.source_snapshot_id} does not exist")
            return record["size_bytes"]
        if request.source_volume_id:
            m = self._parse_volume(request.source_volume_id, s.cluster_id)
            ioctx = s.ioctx(s.pool_name(int(m["pool"])))
            record = self._volume_record(ioctx, m["image"], m["cluster"])
            if record is None or record["state"] != STATE_READY:
                raise NotFound(f"volume {request.source_volume_id} does not exist")
            try:
                with rbd.Image(ioctx, image_name(m["image"]), read_only=True) as image:
                    return image.size()
            except rbd.ImageNotFound:
                raise NotFound(f"volume {request.source_volume_id} does not exist") from None
        return 0

    @staticmethod
    def _parse_volume(volume_id: str, cluster_id: str) -> re.Match:
        return _parse_in_cluster(VOLUME_ID, volume_id, cluster_id, "volume")

    @staticmethod
    def _parse_snapshot(snapshot_id: str, cluster_id: str) -> re.Match:
        return _parse_in_cluster(SNAPSHOT_ID, snapshot_id, cluster_id, "snapshot")

    def _materialize(self, s: _Session, ioctx, volume_id: str, record: dict) -> None:
        """Bring a reserved volume to "ready"; every step is idempotent, so this finishes a
        volume whose creation crashed anywhere after its reservation."""
        rados, rbd = _bindings()
        name = image_name(record["uuid"])
        features = _feature_bits(record["features"])
        data_pool = record["data_pool"] or None
        source_volume = None
        if record["source_volume_id"]:
            m = self._parse_volume(record["source_volume_id"], s.cluster_id)
            source_volume = (s.ioctx(s.pool_name(int(m["pool"]))), image_name(m["image"]))
        if not self._image_exists(ioctx, name):
            if record["source_snapshot_id"]:
                m = self._parse_snapshot(record["source_snapshot_id"], s.cluster_id)
                parent_ioctx = s.ioctx(s.pool_name(int(m["pool"])))
                self._clone(parent_ioctx, image_name(m["image"]), snap_name(m["snap"]), ioctx, name,
                            features, data_pool)
            elif source_volume is not None:
                source_ioctx, source_image = source_volume
                hidden = clone_snap_name(record["uuid"])
                with rbd.Image(source_ioctx, source_image) as source:
                    if not source.snap_exists(hidden):
                        source.create_snap(hidden)
                self._clone(source_ioctx, source_image, hidden, ioctx, name, features, data_pool)
            else:
                try:
                    rbd.RBD().create(ioctx, name, record["requested_bytes"], old_format=False,
                                     features=features, data_pool=data_pool)
                except rbd.ImageExists:
                    pass
            _log.info("image created", image=name, pool=ioctx.get_pool_name(),
                      data_pool=data_pool or "-", features=record["features"],
                      source=record["source_snapshot_id"] or record["source_volume_id"] or "-")
        _failpoint("after-image-create")
        if source_volume is not None:
            # The clone exists: the hidden snapshot it was made from is no longer needed (with
            # clone format 2 RBD keeps it in its trash until the clone lets go of it).
            self._remove_snapshot_if_present(*source_volume, clone_snap_name(record["uuid"]))
        with rbd.Image(ioctx, name) as image:
            if image.size() < record["requested_bytes"]:
                image.resize(record["requested_bytes"])
            metadata = dict(image.metadata_list())
            if metadata.get(IMAGE_META_NAME) != record["name"]:
                image.metadata_set(IMAGE_META_NAME, record["name"])
            if metadata.get(IMAGE_META_ID) != volume_id:
                image.metadata_set(IMAGE_META_ID, volume_id)
        self._flatten_if_deep(s, ioctx, name)
        record["state"] = STATE_READY
        self._write_volume_record(ioctx, record)
        _log.info("volume ready", volume_id=volume_id, name=record["name"])

    @staticmethod
    def _clone(parent_ioctx, parent: str, snapshot: str, ioctx, name: str, features: int,
               data_pool: str | None) -> None:
        _, rbd = _bindings()
        try:
            rbd.RBD().clone(parent_ioctx, parent, snapshot, ioctx, name, features=features,
                            data_pool=data_pool)
        except rbd.ImageExists:
            pass
        except rbd.ImageNotFound:
            raise NotFound(f"the source {parent}@{snapshot} no longer exists") from None

    @staticmethod
    def _image_exists(ioctx, name: str) -> bool:
        _, rbd = _bindings()
        try:
            with rbd.Image(ioctx, name, read_only=True):
                return True
        except rbd.ImageNotFound:
            return False

    @staticmethod
    def _remove_snapshot_if_present(ioctx, image: str, snapshot: str) -> None:
        _, rbd = _bindings()
        try:
            with rbd.Image(ioctx, image) as opened:
                if opened.snap_exists(snapshot):
                    opened.remove_snap(snapshot)
        except rbd.ImageNotFound:
            pass

    def clone_depth(self, s: _Session, ioctx, name: str) -> int:
        """How many ancestors an image reads through (0: not a clone)."""
        _, rbd = _bindings()
        depth, pool = 0, ioctx.get_pool_name()
        while depth <= 64:
            try:
                with rbd.Image(s.ioctx(pool), name, read_only=True) as image:
                    parent = image.get_parent_image_spec()
            except rbd.ImageNotFound:
                return depth
            depth += 1
            pool, name = parent["pool_name"], parent["image_name"]
        return depth

    def _flatten_if_deep(self, s: _Session, ioctx, name: str) -> None:
        _, rbd = _bindings()
        depth = self.clone_depth(s, ioctx, name)
        if depth > self.max_clone_depth:
            started = time.monotonic()
            with rbd.Image(ioctx, name) as image:
                image.flatten()
            _log.info("clone flattened", image=name, depth=depth, limit=self.max_clone_depth,
                      ms=round((time.monotonic() - started) * 1000))

    def _volume(self, s: _Session, pool: str, pool_id: int, record: dict,
                size: int | None = None, copies: float | None = None,
                publication: Publication | None = None) -> Volume:
        if copies is None:
            copies = self._copies(s.pools(), record["data_pool"] or pool)
        cluster = record.get("cluster", s.cluster_id)
        return Volume(
            volume_id=volume_id_of(record["uuid"], pool_id, cluster), name=record["name"],
            size_bytes=record["size_bytes"] if size is None else size,
            storage_class_type=record.get("type", TYPE_EC if record["data_pool"] else TYPE_REPLICATED),
            parameters=dict(record["parameters"]), copies=copies, topology=[],
            source_snapshot_id=record["source_snapshot_id"],
            source_volume_id=record["source_volume_id"], publication=publication,
            context={CTX_CLUSTER: cluster, CTX_MONITORS: s.monitors, CTX_POOL: pool,
                     CTX_DATA_POOL: record["data_pool"], CTX_IMAGE: image_name(record["uuid"])})

    def delete_volume(self, volume_id: str) -> None:
        m = VOLUME_ID.fullmatch(volume_id)
        if m is None:
            return  # not an id polyvol ever made: nothing to delete
        _, rbd = _bindings()
        with self._session(m["cluster"], required=True) as s:
            try:
                ioctx = s.ioctx(s.pool_name(int(m["pool"])))
            except NotFound:
                return  # the pool is gone, and its images with it
            record = self._volume_record(ioctx, m["image"])
            if record and record.get("cluster", m["cluster"]) != m["cluster"]:
                _log.warning("delete of an alias id ignored: the volume has another id",
                             volume_id=volume_id, cluster=record["cluster"])
                return
            name = image_name(m["image"])
            kept = ""
            try:
                rbd.RBD().remove(ioctx, name)
            except rbd.ImageNotFound:
                pass
            except rbd.ImageHasSnapshots:
                kept = "it still has snapshots or clones"
            except rbd.ImageBusy:
                watchers = self._watchers(ioctx, name)
                if watchers:
                    raise FailedPrecondition(f"volume {volume_id} is in use (attached by "
                                             f"{', '.join(watchers)}); unstage it first") from None
                kept = "it is busy"
            if record and record.get("source_volume_id"):
                # a clone that crashed before its source's hidden snapshot was removed
                with contextlib.suppress(NotFound, InvalidArgument):
                    source = self._parse_volume(record["source_volume_id"], s.cluster_id)
                    self._remove_snapshot_if_present(s.ioctx(s.pool_name(int(source["pool"]))),
                                                     image_name(source["image"]),
                                                     clone_snap_name(m["image"]))
            with self._naming_lock(ioctx, VOLUMES_OBJECT):
                # a deleted volume is published nowhere: its publication goes with its record
                remove = [f"vol.{m['image']}", f"pub.{m['image']}"]
                if record:
                    owner = self._omap_get(ioctx, VOLUMES_OBJECT, [f"name.{record['name']}"])
                    if owner.get(f"name.{record['name']}") == m["image"]:
                        remove.append(f"name.{record['name']}")
                zombie = {f"zombie.{m['image']}": json.dumps({"deleted_at": time.time(),
                                                              "why": kept})} if kept else None
                self._omap_write(ioctx, VOLUMES_OBJECT, set_=zombie, remove=remove)
            if kept:
                _log.info("volume deleted; image kept until it is free", volume_id=volume_id, why=kept)
            elif record:
                _log.info("volume deleted", volume_id=volume_id)
            self._collect_zombies(s)

    @staticmethod
    def _watchers(ioctx, name: str) -> list[str]:
        _, rbd = _bindings()
        try:
            with rbd.Image(ioctx, name, read_only=True) as image:
                return [w["addr"] for w in image.watchers_list()]
        except rbd.ImageNotFound:
            return []

    def _collect_zombies(self, s: _Session) -> None:
        """Remove images of deleted volumes that nothing needs any more: no snapshot left, no
        clone reading from them. Removing one can free its parent (RBD drops a trashed parent
        snapshot with its last clone), possibly in another pool: repeat until nothing moves."""
        _, rbd = _bindings()
        for _ in range(16):
            removed = 0
            for pool, info in sorted(s.pools().items()):
                if info["kind"] != "replicated":
                    continue
                try:
                    with _ceph_errors(f"pool {pool}"):
                        ioctx = s.ioctx(pool)
                        zombies = self._omap_list(ioctx, VOLUMES_OBJECT, "zombie.")
                except PolyvolError:
                    continue  # a pool these credentials cannot read holds none of ours
                for key in zombies:
                    name = image_name(key.removeprefix("zombie."))
                    try:
                        rbd.RBD().remove(ioctx, name)
                    except rbd.ImageNotFound:
                        pass
                    except (rbd.ImageHasSnapshots, rbd.ImageBusy):
                        continue
                    self._omap_write(ioctx, VOLUMES_OBJECT, remove=[key])
                    removed += 1
                    _log.info("image of a deleted volume removed", image=name, pool=pool)
            if not removed:
                return

    def get_volume(self, volume_id: str) -> Volume:
        m = VOLUME_ID.fullmatch(volume_id)
        if m is None:
            raise NotFound(f"volume {volume_id!r} does not exist (not a Ceph volume id)")
        _, rbd = _bindings()
        with self._session(m["cluster"], required=False) as s:
            pool = s.pool_name(int(m["pool"]))
            ioctx = s.ioctx(pool)
            record, _, raw_publication = self._read_volume(ioctx, m["image"], m["cluster"])
            if record is None or record["state"] != STATE_READY:
                raise NotFound(f"volume {volume_id} does not exist")
            try:
                with rbd.Image(ioctx, image_name(m["image"]), read_only=True) as image:
                    size = image.size()
            except rbd.ImageNotFound:
                raise NotFound(f"volume {volume_id} has a record but no image "
                               f"{image_name(m['image'])} in pool {pool}") from None
            return self._volume(s, pool, int(m["pool"]), record, size=size,
                                publication=self._publication(raw_publication, volume_id))

    def _scan(self, obj: str, prefix: str):
        """(session, pool name, pool id, {key: value}) for the omap entries starting with
        `prefix` of `obj` in every replicated pool of every cluster this plugin has
        credentials for; pools the credentials cannot read are left out."""
        seen = set()
        for cluster_id in self.connections.cluster_ids():
            try:
                with self._session(cluster_id, required=False, secrets={}) as s:
                    fsid = s.rados.get_fsid()
                    if fsid in seen:
                        continue  # the same cluster under another name: listed once
                    seen.add(fsid)
                    for pool, info in sorted(s.pools().items()):
                        if info["kind"] != "replicated":
                            continue
                        try:
                            with _ceph_errors(f"pool {pool}"):
                                entries = self._omap_list(s.ioctx(pool), obj, prefix)
                        except PolyvolError as error:
                            _log.debug("pool left out of a listing", pool=pool, error=str(error))
                            continue
                        if entries:
                            yield s, pool, info["id"], entries
            except PolyvolError as error:
                _log.warning("ceph cluster left out of a listing", cluster_id=cluster_id,
                             error=str(error))

    def lookup_name(self, name: str) -> Volume | None:
        for s, pool, pool_id, entries in self._scan(VOLUMES_OBJECT, f"name.{name}"):
            image_uuid = entries.get(f"name.{name}")
            record = self._volume_record(s.ioctx(pool), image_uuid) if image_uuid else None
            if record and record["state"] == STATE_READY:
                return self._volume(s, pool, pool_id, record)
        return None

    def list_volumes(self) -> list[Volume]:
        volumes = []
        for s, pool, pool_id, entries in self._scan(VOLUMES_OBJECT, "vol."):
            # every publication of the pool in one more omap read, not one read per volume
            with _ceph_errors(f"pool {pool}"):
                published = self._omap_list(s.ioctx(pool), VOLUMES_OBJECT, "pub.")
            for raw in entries.values():
                record = json.loads(raw)
                if record["state"] == STATE_READY:
                    volume = self._volume(s, pool, pool_id, record)
                    volume.publication = self._publication(
                        published.get(f"pub.{record['uuid']}", ""), volume.volume_id)
                    volumes.append(volume)
        return sorted(volumes, key=lambda v: v.volume_id)

    # --- controller: publication (see "Publication" in the module docstring) ---------------

    def publish(self, volume_id: str, node_id: str, readonly: bool) -> dict:
        m = VOLUME_ID.fullmatch(volume_id)
        if m is None:
            raise NotFound(f"volume {volume_id!r} does not exist (not a Ceph volume id)")
        # The request's secrets (the StorageClass's controller-publish secret) when it has
        # them, else the latest connection to the cluster, as for ControllerGetVolume.
        with self._session(m["cluster"], required=False) as s:
            ioctx = s.ioctx(s.pool_name(int(m["pool"])))
            pub_key = f"pub.{m['image']}"
            for _ in range(SWAP_ATTEMPTS):
                record, raw, raw_publication = self._read_volume(ioctx, m["image"], m["cluster"])
                if record is None or record["state"] != STATE_READY:
                    raise NotFound(f"volume {volume_id} does not exist")
                current = self._publication(raw_publication, volume_id)
                if check_publication(volume_id, current, node_id, readonly):
                    return {}
                publication = json.dumps({"schema": PUBLICATION_SCHEMA, "node_id": node_id,
                                          "readonly": readonly, "published_at": time.time()},
                                         sort_keys=True)
                # The record must be the one read (a DeleteVolume in between leaves no
                # publication behind) and the volume still unpublished (another controller).
                if self._omap_swap(ioctx, VOLUMES_OBJECT, {f"vol.{m['image']}": raw, pub_key: ""},
                                   set_={pub_key: publication}):
                    _log.info("volume published", volume_id=volume_id, node_id=node_id,
                              readonly=readonly)
                    return {}
        raise Aborted(f"the records of volume {volume_id} kept changing while it was being "
                      f"published to node {node_id}; retry")

    def unpublish(self, volume_id: str, node_id: str) -> None:
        m = VOLUME_ID.fullmatch(volume_id)
        if m is None:
            return  # not an id polyvol ever made: published nowhere
        with self._session(m["cluster"], required=False) as s:
            try:
                ioctx = s.ioctx(s.pool_name(int(m["pool"])))
            except NotFound:
                return  # the pool is gone, and its volumes with it
            pub_key = f"pub.{m['image']}"
            for _ in range(SWAP_ATTEMPTS):
                record, _, raw_publication = self._read_volume(ioctx, m["image"])
                if record and record.get("cluster", m["cluster"]) != m["cluster"]:
                    return  # an alias id names no volume (see _volume_record)
                current = self._publication(raw_publication, volume_id)
                if current is None:
                    return
                if node_id and current.node_id != node_id:
                    # The CO's view of a node that no longer has the volume: not ours to undo.
                    _log.info("unpublish for another node ignored", volume_id=volume_id,
                              node_id=node_id, published_to=current.node_id)
                    return
                # Touches only the omap, never the image: nothing here waits for the lost
                # node's exclusive lock or watch (the next node's attach fences it).
                if self._omap_swap(ioctx, VOLUMES_OBJECT, {pub_key: raw_publication},
                                   remove=[pub_key]):
                    _log.info("volume unpublished", volume_id=volume_id, node_id=current.node_id)
                    return
        raise Aborted(f"the publication of volume {volume_id} kept changing while it was being "
                      f"unpublished; retry")

    def expand_volume(self, volume_id: str, size_bytes: int) -> int:
        m = VOLUME_ID.fullmatch(volume_id)
        if m is None:
            raise NotFound(f"volume {volume_id!r} does not exist (not a Ceph volume id)")
        _, rbd = _bindings()
        with self._session(m["cluster"], required=True) as s:
            ioctx = s.ioctx(s.pool_name(int(m["pool"])))
            record = self._volume_record(ioctx, m["image"], m["cluster"])
            if record is None or record["state"] != STATE_READY:
                raise NotFound(f"volume {volume_id} does not exist")
            with rbd.Image(ioctx, image_name(m["image"])) as image:
                if image.size() < size_bytes:
                    image.resize(size_bytes)  # online: a lock owner (an attached node) does it
                    _log.info("volume expanded", volume_id=volume_id, size_bytes=size_bytes)
                size = image.size()
            if record["size_bytes"] != size:
                record["size_bytes"] = size
                self._write_volume_record(ioctx, record)
            return size

    def capacity(self, parameters: dict, segment: dict | None) -> int:
        # Every node reaches the cluster: a topology segment does not narrow it.
        target = self._target(parameters)
        cluster_id = target.cluster_id or self.connections.cluster_of(target.monitors)
        if not cluster_id:
            raise FailedPrecondition(f"no request with Ceph credentials for the cluster at "
                                     f"{target.monitors} since the plugin started, and "
                                     f"GetCapacity carries none")
        with self._session(cluster_id, required=False) as s:
            pool = target.data_pool or target.pool
            for entry in s.mon("df").get("pools", []):
                if entry["name"] == pool:
                    return int(entry["stats"]["max_avail"])
            raise NotFound(f"pool {pool} does not exist in Ceph cluster {s.cluster_id}")

    # --- controller: snapshots ---------------------------------------------------------------

    def _snapshot_record(self, ioctx, image_uuid: str, snap_uuid: str,
                         cluster: str | None = None) -> dict | None:
        key = f"snap.{image_uuid}.{snap_uuid}"
        raw = self._omap_get(ioctx, SNAPSHOTS_OBJECT, [key]).get(key)
        record = json.loads(raw) if raw else None
        if record and cluster is not None and record.get("cluster", cluster) != cluster:
            return None  # an alias of another snapshot's id (see _volume_record)
        return record

    def create_snapshot(self, source_volume_id: str, name: str, parameters: dict) -> Snapshot:
        if parameters:
            raise InvalidArgument(f"Ceph snapshots take no parameters, got {sorted(parameters)}")
        m = VOLUME_ID.fullmatch(source_volume_id)
        if m is None:
            raise NotFound(f"volume {source_volume_id!r} does not exist (not a Ceph volume id)")
        _, rbd = _bindings()
        with self._session(m["cluster"], required=True) as s:
            pool_id = int(m["pool"])
            ioctx = s.ioctx(s.pool_name(pool_id))
            volume = self._volume_record(ioctx, m["image"], m["cluster"])
            if volume is None or volume["state"] != STATE_READY:
                raise NotFound(f"volume {source_volume_id} does not exist")
            with self._naming_lock(ioctx, SNAPSHOTS_OBJECT):
                taken = self._omap_get(ioctx, SNAPSHOTS_OBJECT, [f"name.{name}"]).get(f"name.{name}")
                if taken:
                    image_uuid, snap_uuid = taken.split(".")
                    if image_uuid != m["image"]:
                        raise AlreadyExists(f"snapshot name {name!r} is already used for another volume")
                    record = self._snapshot_record(ioctx, image_uuid, snap_uuid)
                else:
                    snap_uuid, record = uuid.uuid4().hex[:16], None
                if record is None:
                    record = {"name": name, "state": STATE_CREATING, "image": m["image"],
                              "cluster": m["cluster"],
                              "snap": snap_uuid, "source_volume_id": source_volume_id,
                              "size_bytes": 0, "created_at": 0}
                    self._omap_write(ioctx, SNAPSHOTS_OBJECT, {
                        f"name.{name}": f"{m['image']}.{snap_uuid}",
                        f"snap.{m['image']}.{snap_uuid}": json.dumps(record, sort_keys=True)})
            if record["state"] != STATE_READY:
                with rbd.Image(ioctx, image_name(m["image"])) as image:
                    if not image.snap_exists(snap_name(snap_uuid)):
                        image.create_snap(snap_name(snap_uuid))  # crash-consistent
                    size = next(x["size"] for x in image.list_snaps() if x["name"] == snap_name(snap_uuid))
                record.update(state=STATE_READY, size_bytes=size, created_at=time.time())
                self._omap_write(ioctx, SNAPSHOTS_OBJECT, {
                    f"snap.{m['image']}.{snap_uuid}": json.dumps(record, sort_keys=True)})
                _log.info("snapshot created", source_volume_id=source_volume_id, name=name,
                          snapshot=snap_name(snap_uuid))
            return self._snapshot(m["cluster"], pool_id, record)

    @staticmethod
    def _snapshot(cluster_id: str, pool_id: int, record: dict) -> Snapshot:
        cluster_id = record.get("cluster", cluster_id)
        return Snapshot(snapshot_id_of(record["image"], record["snap"], pool_id, cluster_id),
                        record["name"], record["source_volume_id"], record["size_bytes"],
                        record["created_at"])

    def delete_snapshot(self, snapshot_id: str) -> None:
        m = SNAPSHOT_ID.fullmatch(snapshot_id)
        if m is None:
            return
        with self._session(m["cluster"], required=True) as s:
            try:
                ioctx = s.ioctx(s.pool_name(int(m["pool"])))
            except NotFound:
                return
            record = self._snapshot_record(ioctx, m["image"], m["snap"])
            if record and record.get("cluster", m["cluster"]) != m["cluster"]:
                _log.warning("delete of an alias id ignored: the snapshot has another id",
                             snapshot_id=snapshot_id, cluster=record["cluster"])
                return
            # with clones left, RBD moves the snapshot to its trash until they let go
            self._remove_snapshot_if_present(ioctx, image_name(m["image"]), snap_name(m["snap"]))
            with self._naming_lock(ioctx, SNAPSHOTS_OBJECT):
                remove = [f"snap.{m['image']}.{m['snap']}"]
                if record:
                    owner = self._omap_get(ioctx, SNAPSHOTS_OBJECT, [f"name.{record['name']}"])
                    if owner.get(f"name.{record['name']}") == f"{m['image']}.{m['snap']}":
                        remove.append(f"name.{record['name']}")
                self._omap_write(ioctx, SNAPSHOTS_OBJECT, remove=remove)
            if record:
                _log.info("snapshot deleted", snapshot_id=snapshot_id)
            self._collect_zombies(s)

    def get_snapshot(self, snapshot_id: str) -> Snapshot:
        m = SNAPSHOT_ID.fullmatch(snapshot_id)
        if m is None:
            raise NotFound(f"snapshot {snapshot_id!r} does not exist (not a Ceph snapshot id)")
        with self._session(m["cluster"], required=False) as s:
            ioctx = s.ioctx(s.pool_name(int(m["pool"])))
            record = self._snapshot_record(ioctx, m["image"], m["snap"], m["cluster"])
            if record is None or record["state"] != STATE_READY:
                raise NotFound(f"snapshot {snapshot_id} does not exist")
            return self._snapshot(s.cluster_id, int(m["pool"]), record)

    def list_snapshots(self) -> list[Snapshot]:
        snapshots = []
        for s, pool, pool_id, entries in self._scan(SNAPSHOTS_OBJECT, "snap."):
            for raw in entries.values():
                record = json.loads(raw)
                if record["state"] == STATE_READY:
                    snapshots.append(self._snapshot(s.cluster_id, pool_id, record))
        return sorted(snapshots, key=lambda x: x.snapshot_id)

    def condition(self, volume_id: str) -> Condition:
        m = VOLUME_ID.fullmatch(volume_id)
        if m is None:
            return Condition(True, f"{volume_id} is not a Ceph volume id")
        _, rbd = _bindings()
        try:
            with self._session(m["cluster"], required=False) as s:
                ioctx = s.ioctx(s.pool_name(int(m["pool"])))
                with rbd.Image(ioctx, image_name(m["image"]), read_only=True) as image:
                    image.size()
        except (Unavailable, PermissionDenied) as error:
            return Condition(True, f"Ceph cluster {m['cluster']} cannot be asked: {error}")
        except NotFound as error:
            return Condition(True, f"the image of this volume is missing: {error}")
        except PolyvolError as error:
            return Condition(True, f"Ceph cluster {m['cluster']}: {error}")
        return HEALTHY

    # --- node side ---------------------------------------------------------------------------

    def _require_attacher(self):
        if self.attacher is None:
            raise FailedPrecondition("this plugin does not serve the node role for the Ceph classes")
        return self.attacher

    def attach(self, volume_id: str, context: dict) -> Attachment:
        m = VOLUME_ID.fullmatch(volume_id)
        if m is None:
            raise NotFound(f"volume {volume_id!r} does not exist (not a Ceph volume id)")
        credentials = credentials_from(request_secrets(), required=True)
        pool = context.get(CTX_POOL, "")
        if not POOL_NAME.fullmatch(pool):
            raise InvalidArgument(f"volume_context lacks {CTX_POOL}; pass the volume_context that "
                                  f"CreateVolume returned")
        data_pool = context.get(CTX_DATA_POOL, "")
        if data_pool and not POOL_NAME.fullmatch(data_pool):
            raise InvalidArgument(f"volume_context {CTX_DATA_POOL} {data_pool!r} is not a pool name")
        try:
            monitors = self.clusters.monitors(m["cluster"])
        except FailedPrecondition:
            # not in this node's --ceph-config: the monitors CreateVolume recorded
            monitors = check_monitors(context.get(CTX_MONITORS, ""))
        from ..attach.rbd import RbdTarget

        target = RbdTarget(pool=pool, image=image_name(m["image"]), monitors=monitors,
                           user=credentials.user, key=credentials.key, data_pool=data_pool)
        return self._require_attacher().attach(volume_id, target)

    def find_attachment(self, volume_id: str) -> Attachment | None:
        if VOLUME_ID.fullmatch(volume_id) is None:
            raise NotFound(f"volume {volume_id!r} does not exist (not a Ceph volume id)")
        return self._require_attacher().find(volume_id)

    def prepare_detach(self, volume_id: str) -> None:
        if VOLUME_ID.fullmatch(volume_id):
            self._require_attacher().prepare_detach(volume_id)

    def detach(self, volume_id: str) -> None:
        if VOLUME_ID.fullmatch(volume_id):
            self._require_attacher().detach(volume_id)

    def node_expand(self, volume_id: str, size_bytes: int) -> None:
        # krbd devices refresh online; the user-space path says it needs a new stage.
        self.find_attachment(volume_id)  # validates the id
        self._require_attacher().grow(volume_id, size_bytes)

    def node_condition(self, volume_id: str) -> Condition:
        return self._require_attacher().condition(volume_id)


def _parse_in_cluster(pattern: re.Pattern, object_id: str, cluster_id: str, what: str) -> re.Match:
    """The parts of a volume or snapshot id that must lie in `cluster_id` (a copy source)."""
    m = pattern.fullmatch(object_id)
    if m is None:
        raise NotFound(f"{what} {object_id!r} does not exist (not a Ceph {what} id)")
    if m["cluster"] != cluster_id:
        raise InvalidArgument(f"{what} {object_id} is in Ceph cluster {m['cluster']}, not "
                              f"{cluster_id}: copies between clusters are not supported")
    return m
