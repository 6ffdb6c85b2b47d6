"""Attach a Ceph RBD image as a local block device.

    attacher = RbdAttacher(state_dir, mode="auto")            # "auto" | "krbd" | "userspace"
    target = RbdTarget(pool="polyvol-rep", image="csi-vol-1", monitors="v2:10.0.0.1:3300",
                       user="polyvol", key=secrets["userKey"])   # the key: see "Secrets"
    attachment = attacher.attach("rbd-...-1", target)          # Attachment(device, method)
    attacher.find("rbd-...-1")                                 # same Attachment, or None
    attacher.condition("rbd-...-1")                            # Condition(abnormal, message)
    attacher.prepare_detach("rbd-...-1")                       # before unmounting staging
    attacher.detach("rbd-...-1")                               # nothing left, bounded in time
    attacher.attached()                                        # volume ids with attach state
    attacher.grow("rbd-...-1", new_size)                       # node expansion (see grow)

Two methods, chosen once per attacher (`mode`):

  "rbd-krbd" (mode "krbd", or "auto" when /sys/bus/rbd exists): the kernel RBD client,
      `rbd device map --conf <state>/ceph.conf --id USER -o noudev POOL[/NS]/IMAGE`.
  "rbd-nbd"  (mode "userspace", or "auto" without the module, as on this project's CI
      machines): librbd in user space, with the tail of driver.attach.nbd:

          qemu-storage-daemon --blockdev driver=rbd,pool=..,image=..,conf=<state>/ceph.conf,
              user=USER,cache.direct=on,discard=unmap   (librbd; no client cache, so every
              acknowledged write is in Ceph; discard reaches the image)
          -> NBD on a unix socket in the volume's state directory -> nbdfuse -> loop device
              (direct I/O)

      One attach machinery for remote-disk and Ceph: RbdAttacher is an NbdAttacher whose
      qemu-storage-daemon opens an `rbd` blockdev instead of an `nbd` one; the helper
      processes, their re-adoption after a plugin restart, the condition checks and the
      bounded detach are the same code. qsd's FUSE export is NOT used (QEMU 7.2 corrupts
      parallel writes there); nbdfuse + loop passed fio crc32c verify at iodepth 32.

Secrets: the cephx key is written to `<state>/attach-rbd/<volume>/ceph.key` (mode 0600, in
0700 directories) and named by `keyfile` in a per-volume ceph.conf next to it, which every
Ceph client of the attachment reads (qsd, `rbd device map`, the fencing helper). It never
appears in a command line, a log line, the attachment record or an exception message; the
directory is removed at detach. The per-volume ceph.conf also pins what a client needs and no
more: `mon_host`, `client_mount_timeout` (a client that cannot authenticate gives up after
CONNECT_TIMEOUT seconds instead of 300), no admin socket, no log file.

Monitors: a comma-separated list in ceph.conf `mon_host` syntax, e.g. "10.0.0.1:6789",
"v2:10.0.0.1:3300,v2:10.0.0.2:3300" or "[v2:10.0.0.1:3300,v1:10.0.0.1:6789]". Give a v1:/v2:
prefix when a port is neither 3300 nor 6789: an unprefixed address on another port is tried
with both protocols, and a wrong key then shows as a timeout instead of a permission error.

A dead client's lock (fencing): images have the exclusive-lock feature; the writer holding the
lock hands it over when another client asks, so two live clients never wait on each other.
A client that died (its node was lost, or its process was killed) cannot answer, and its
watch on the image header lingers for osd_client_watch_timeout (30 s); librbd only breaks a
lock whose owner no longer watches, so a new attach would block ~25-30 s. So before it opens
the image, `attach` runs a short-lived helper (`python -m driver.attach.rbd _fence`, a
separate process so that a hung librados call cannot wedge the plugin) that asks for the lock
the ordinary way; a live owner releases it within milliseconds and nothing more happens. If
the owner has not released it after `fence_after` seconds (default FENCE_AFTER), the helper
breaks the lock with librbd's lock_break, which first adds the owner's client instance
(address/nonce) to the OSD blocklist (rbd_blocklist_on_break_lock; the entry expires after
one hour): the Ceph way to fence a client, so that the old node cannot write even if it was
only cut off and comes back. The cephx caps needed are those of `profile rbd` (the mon
profile allows exactly `osd blocklist add` of one client instance). Only the lock owner is
fenced, never a client that merely has the image open (e.g. a controller doing a resize).
The price: a live owner that cannot hand the lock over within `fence_after` seconds (its
cluster path is stuck) is fenced too, and its I/O fails from then on: for a single-node-writer
volume that is being staged elsewhere this is the point. `fence_after=None` disables it
(an attach after a node loss then waits out the watch timeout). A client of ours that was
fenced by another node shows in `condition` ("blocklisted"); I/O on it fails with ESHUTDOWN.

Detach of the user-space path: unmount, loop, nbdfuse as in driver.attach.nbd, then SIGTERM
to qemu-storage-daemon, which closes the image (librbd flushes and releases the exclusive
lock, 1-2 s) and exits on its own; it is only killed after EXIT_WAIT seconds or when the
monitors are unreachable (then the lock stays with a dead client: the next attach fences it).

Expansion: krbd devices grow online; an rbd-nbd device keeps the size it was attached with
(NBD cannot announce a resize), so the node sees a grown image at the next stage (`grow`).

krbd: `rbd device map` and `unmap` are implemented but cannot be exercised on the project's
CI machines (no rbd kernel module); the unit tests check their argument lists.
"""

import contextlib
import json
import os
import re
import shutil
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from .. import command, fs, log
from ..backends.base import Attachment, Condition
from ..errors import (CommandFailed, CommandTimedOut, FailedPrecondition, InvalidArgument,
                      NotFound, PermissionDenied, PolyvolError, Unavailable)
from . import nbd

_log = log.get("attach.rbd")

METHOD_KRBD = "rbd-krbd"
RBD_SYSFS = Path("/sys/bus/rbd/devices")  # one entry per mapped krbd device
METHOD_NBD = "rbd-nbd"
MODES = ("auto", "krbd", "userspace")
FENCE_AFTER = 5.0             # seconds a lock owner gets to hand the lock over before fencing
CONNECT_TIMEOUT = 15          # client_mount_timeout of every client: authentication deadline
MAP_TIMEOUT = 90.0            # rbd device map / unmap
PROBE_TIMEOUT = 2.0           # TCP connect probe of the monitors for condition()
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")          # pool, namespace, image
_USER = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_KEY = re.compile(r"^[A-Za-z0-9+/]{16,}={0,2}$")
_MONITORS = re.compile(r"^[A-Za-z0-9.:\[\],/_-]+$")
_MON_ADDR = re.compile(r"(?:(v[12]):)?(\[[0-9A-Fa-f:]+\]|[A-Za-z0-9._-]+)(?::(\d+))?(?:/\d+)?")


@dataclass(frozen=True)
class RbdTarget:
    """An RBD image and how to reach it. `key` is the cephx secret of client.`user` (base64,
    as in a keyring); it is excluded from repr() and summary(). `data_pool` is informational
    (an image knows its data pool; attach does not need it)."""
    pool: str
    image: str
    monitors: str
    user: str
    key: str = field(repr=False, compare=False)
    namespace: str = ""
    data_pool: str = ""

    def check(self) -> None:
        for what, value in (("pool", self.pool), ("image", self.image)):
            if not isinstance(value, str) or not _NAME.match(value):
                raise InvalidArgument(f"bad RBD {what} name {value!r}")
        if self.namespace and not _NAME.match(self.namespace):
            raise InvalidArgument(f"bad RBD namespace {self.namespace!r}")
        if self.data_pool and not _NAME.match(self.data_pool):
            raise InvalidArgument(f"bad RBD data pool name {self.data_pool!r}")
        if not self.monitors or not _MONITORS.match(self.monitors) \
                or not monitor_endpoints(self.monitors):
            raise InvalidArgument(f"bad Ceph monitor list {self.monitors!r} (expected "
                                  "comma-separated addresses such as v2:10.0.0.1:3300)")
        if not self.user or not _USER.match(self.user) or self.user.startswith("client."):
            raise InvalidArgument(f"bad cephx user id {self.user!r} (the id without 'client.')")
        if not self.key or not isinstance(self.key, str) or not _KEY.match(self.key.strip()):
            raise InvalidArgument(f"the cephx key for client.{self.user} is missing or is not "
                                  "a base64 key as found in a keyring")

    def spec(self) -> str:
        """POOL[/NAMESPACE]/IMAGE, as the rbd command names an image."""
        return "/".join(p for p in (self.pool, self.namespace, self.image) if p)

    def endpoint(self) -> str:
        return f"Ceph monitors {self.monitors}"

    def summary(self) -> dict:
        return {"pool": self.pool, "namespace": self.namespace, "image": self.image,
                "data_pool": self.data_pool, "monitors": self.monitors, "user": self.user}


def monitor_endpoints(monitors: str) -> list[tuple[str, int]]:
    """TCP (host, port) pairs worth probing for a mon_host string (an address without a port
    may be either protocol's default port)."""
    found = []
    for match in _MON_ADDR.finditer(monitors.replace("[v", "v").replace("],", ",").rstrip("]")):
        kind, host, port = match.groups()
        host = host.strip("[]")
        if not host or host in ("v1", "v2"):
            continue
        ports = [int(port)] if port else ([6789] if kind == "v1" else
                                          [3300] if kind == "v2" else [3300, 6789])
        found += [(host, p) for p in ports if 0 < p < 65536 and (host, p) not in found]
    return found


def krbd_available() -> tuple[bool, str]:
    if Path("/sys/bus/rbd").is_dir():
        return True, "the rbd kernel module is loaded"
    return False, "the rbd kernel module is not loaded (no /sys/bus/rbd)"


def choose_method(mode: str = "auto") -> str:
    """METHOD_KRBD or METHOD_NBD for a configured mode; raises when "krbd" is impossible."""
    if mode not in MODES:
        raise InvalidArgument(f"RBD attach mode {mode!r}: choose one of {', '.join(MODES)}")
    usable, why = krbd_available()
    if mode == "krbd" and not usable:
        raise FailedPrecondition(f"RBD attach mode 'krbd' configured, but {why}")
    method = METHOD_KRBD if mode == "krbd" or (mode == "auto" and usable) else METHOD_NBD
    _log.info("rbd attach method", mode=mode, method=method, kernel=why)
    return method


class RbdAttacher(nbd.NbdAttacher):
    """Attach, find, check and detach RBD images on this node.

    `state_dir` as for NbdAttacher (local, survives plugin restarts); per-volume state lives
    in `<state_dir>/attach-rbd/<volume>/`. Callers serialise operations on one volume;
    different volumes may be handled concurrently. `fence_after`: see the module docstring.
    """

    user_method = METHOD_NBD
    qsd_role = "the Ceph client (qemu-storage-daemon)"

    def __init__(self, state_dir, mode: str = "auto", fence_after: float | None = FENCE_AFTER):
        self.root = Path(os.path.realpath(state_dir)) / "attach-rbd"
        self.mode = mode
        self.method = choose_method(mode)
        self.fence_after = fence_after
        self.reconnect_delay = 0  # librbd reconnects by itself; no NBD reconnect window

    # --- the interface ---------------------------------------------------------------------

    def attach(self, volume_id: str, target: RbdTarget) -> Attachment:
        """The block device of the image, attaching it if needed. Idempotent, re-adopts a live
        attachment after a plugin restart, cleans up a broken one first. Raises
        PermissionDenied (user/key refused), NotFound (pool or image), Unavailable (monitors
        unreachable), FailedPrecondition (anything else, with the reason)."""
        target.check()
        if self.method == METHOD_NBD:
            return super().attach(volume_id, target)
        return self._attach_krbd(volume_id, target)

    def find(self, volume_id: str) -> Attachment | None:
        recorded = self._vol(volume_id).record()
        if recorded and recorded.get("method") == METHOD_KRBD:
            device = recorded.get("device")
            if device and device in _krbd_devices(recorded) and os.path.exists(device):
                return Attachment(device, METHOD_KRBD)
            return None
        return super().find(volume_id)

    def condition(self, volume_id: str) -> Condition:
        recorded = self._vol(volume_id).record()
        if recorded and recorded.get("method") == METHOD_KRBD:
            if self.find(volume_id) is None:
                return Condition(True, f"the krbd device {recorded.get('device')} of this volume "
                                 "is gone; unstage and stage the volume again")
            return self._source_condition(self._vol(volume_id), recorded)
        return super().condition(volume_id)

    def prepare_detach(self, volume_id: str) -> str | None:
        recorded = self._vol(volume_id).record()
        if recorded and recorded.get("method") == METHOD_KRBD:
            return None  # nothing in user space to kill; see _detach_krbd
        return super().prepare_detach(volume_id)

    def detach(self, volume_id: str) -> None:
        """Take the image off this node; succeeds when nothing is attached. Bounded in time
        when the monitors are unreachable or a helper is dead or hung (see NbdAttacher)."""
        recorded = self._vol(volume_id).record()
        if recorded and recorded.get("method") == METHOD_KRBD:
            return self._detach_krbd(volume_id, recorded)
        return super().detach(volume_id)

    def grow(self, volume_id: str, size_bytes: int) -> int:
        """Make the attached device show an image that was resized to `size_bytes` (node
        expansion); returns the device's size. krbd: the kernel learns the size from the image
        header (refreshed here). rbd-nbd: an NBD connection keeps the size it was opened with
        (the protocol cannot announce a resize, and nbdfuse's file and the loop device above
        it follow it), so a larger size raises FailedPrecondition: the node sees it when the
        volume is staged again."""
        found = self.find(volume_id)
        if found is None:
            raise FailedPrecondition(f"volume {volume_id} is not attached on this node")
        size = fs.block_size_bytes(found.device)
        if size >= size_bytes:
            return size
        if found.method == METHOD_KRBD:
            refresh = Path(f"/sys/bus/rbd/devices/{found.device.removeprefix('/dev/rbd')}/refresh")
            deadline = time.monotonic() + 10
            while size < size_bytes and time.monotonic() < deadline:
                with contextlib.suppress(OSError):
                    refresh.write_text("1")
                time.sleep(0.2)
                size = fs.block_size_bytes(found.device)
            if size >= size_bytes:
                return size
        raise FailedPrecondition(
            f"the image of {volume_id} grew to {size_bytes} bytes, but its {found.method} device "
            f"{found.device} still has {size} bytes"
            + ("; a user-space (NBD) attachment keeps the size it had when it was opened: the "
               "node sees the new size when the volume is staged again (restart the pod)"
               if found.method == METHOD_NBD else ""))

    # --- hooks of the shared qemu-storage-daemon machinery ----------------------------------

    def _start_qsd(self, vol, target: RbdTarget) -> None:
        self._prepare_client(vol, target)
        super()._start_qsd(vol, target)

    def _qsd_source(self, vol, target: RbdTarget) -> list[str]:
        blockdev = (f"driver=rbd,node-name=vol0,pool={target.pool},image={target.image},"
                    f"conf={_conf(vol)},user={target.user},cache.direct=on,discard=unmap")
        if target.namespace:
            blockdev += f",namespace={target.namespace}"
        return ["--blockdev", blockdev]

    def _startup_error(self, what: str, code: int, message: str, target) -> PolyvolError:
        return _classify(message.split(": ", 2)[-1] if message.startswith(
            "qemu-storage-daemon: --") else message, target, f"{what} exit code {code}")

    def _other_source(self, recorded: dict, target: RbdTarget) -> str | None:
        have = [recorded.get(k) or "" for k in ("pool", "namespace", "image")]
        if have == [target.pool, target.namespace, target.image]:
            return None
        return f"image {'/'.join(p for p in have if p)}, not {target.spec()}"

    def _source_problem(self, recorded: dict, timeout: float = PROBE_TIMEOUT) -> str | None:
        monitors = recorded.get("monitors")
        if not monitors:
            return None
        problems = []
        for host, port in monitor_endpoints(monitors):
            problem = nbd.probe(host, port, timeout)
            if problem is None:
                return None
            problems.append(f"{host}:{port}: {problem}")
        return f"Ceph monitors {monitors} are unreachable ({'; '.join(problems)})"

    def _source_condition(self, vol, recorded: dict) -> Condition:
        fenced = _fenced_message(vol)
        if fenced:
            return Condition(True, fenced)
        problem = self._source_problem(recorded)
        if problem:
            return Condition(True, f"{problem}; I/O waits until the cluster is back")
        return Condition(False, f"attached through {recorded['method']}, image "
                         f"{_spec(recorded)}, Ceph monitors reachable")

    # --- Ceph client configuration and fencing -----------------------------------------------

    def _prepare_client(self, vol, target: RbdTarget) -> None:
        """Write the volume's ceph.conf and key file, then fence a dead lock owner."""
        key_path = vol.path / "ceph.key"
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(target.key.strip())
        text = (f"# polyvol: Ceph client settings of one attachment ({target.spec()})\n"
                "[global]\n"
                f"mon_host = {target.monitors}\n"
                f"keyfile = {key_path}\n"
                "auth_client_required = cephx\n"
                f"client_mount_timeout = {CONNECT_TIMEOUT}\n"
                "admin_socket =\n"
                "log_file =\n"
                "log_to_stderr = false\n"
                "err_to_stderr = true\n")
        fd = os.open(_conf(vol), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(text)
        if self.fence_after is not None:
            self._fence(vol, target)

    def _fence(self, vol, target: RbdTarget) -> dict:
        """Run the fencing helper (see the module docstring); raise on what makes an attach
        impossible (refused credentials, no such image, monitors unreachable)."""
        argv = [sys.executable, "-m", "driver.attach.rbd", "_fence", "--conf", _conf(vol),
                "--user", target.user, "--pool", target.pool, "--image", target.image,
                "--namespace", target.namespace, "--fence-after", str(self.fence_after)]
        started = time.monotonic()
        try:
            done = command.run(argv, timeout=self.fence_after + CONNECT_TIMEOUT + 45,
                               check=False)
        except CommandTimedOut:
            raise Unavailable(f"checking the lock of {target.spec()} did not finish; is the "
                              f"Ceph cluster at {target.monitors} healthy?") from None
        try:
            answer = json.loads(done.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            answer = {"error": (done.stderr.strip().splitlines() or ["no output"])[-1],
                      "errno": None}
        if answer.get("errno") is not None:
            raise _classify(answer["error"], target, "lock check")
        if answer.get("error"):
            # e.g. the bindings are missing on this node: attach anyway, but say what it costs
            _log.warning("rbd attach: could not check for a dead lock owner; an attach after "
                         "a node loss may wait ~30 s for its lock", volume_id=vol.volume_id,
                         error=answer["error"])
            return answer
        level = _log.warning if answer.get("fenced") else _log.info
        level("rbd lock check", volume_id=vol.volume_id, image=target.spec(),
              ms=round((time.monotonic() - started) * 1000),
              **{k: v for k, v in answer.items() if k != "error"})
        return answer

    # --- krbd ------------------------------------------------------------------------------

    def _attach_krbd(self, volume_id: str, target: RbdTarget) -> Attachment:
        vol = self._vol(volume_id)
        existing = self._existing_for(volume_id, target)
        if existing is not None:
            return existing
        if vol.path.exists():
            self.detach(volume_id)
        started = time.monotonic()
        vol.create(volume_id, METHOD_KRBD, target)
        try:
            self._prepare_client(vol, target)
            try:
                mapped = command.run(krbd_map_argv(_conf(vol), target), timeout=MAP_TIMEOUT)
            except CommandFailed as error:
                raise _classify(str(error), target, "rbd device map") from None
            device = mapped.stdout.strip().splitlines()[-1]
            vol.update(device=device)
        except BaseException:
            with contextlib.suppress(Exception):
                self.detach(volume_id)
            raise
        _log.info("rbd attached", volume_id=volume_id, device=device, method=METHOD_KRBD,
                  ms=round((time.monotonic() - started) * 1000), **target.summary())
        return Attachment(device, METHOD_KRBD)

    def _detach_krbd(self, volume_id: str, recorded: dict) -> None:
        vol = self._vol(volume_id)
        started = time.monotonic()
        for device in _krbd_devices(recorded):
            for mount in reversed(fs.mounts_of_device(device) if os.path.exists(device) else []):
                try:
                    command.run(["umount", mount.target], timeout=nbd.UMOUNT_LIMIT)
                except PolyvolError:
                    command.run(["umount", "-l", mount.target], timeout=30, ok_codes=(0, 32))
            try:
                command.run(krbd_unmap_argv(device), timeout=MAP_TIMEOUT)
            except PolyvolError:
                # still open, or the cluster does not answer: force (fails in-flight I/O)
                command.run(krbd_unmap_argv(device, force=True), timeout=MAP_TIMEOUT)
        left = _krbd_devices(recorded)
        if left:
            raise FailedPrecondition(f"detach of {volume_id} left {', '.join(left)} mapped; retry")
        shutil.rmtree(vol.path, ignore_errors=True)
        _log.info("rbd detached", volume_id=volume_id, method=METHOD_KRBD,
                  device=recorded.get("device"), ms=round((time.monotonic() - started) * 1000))


def krbd_map_argv(conf, target: RbdTarget) -> list[str]:
    return ["rbd", "device", "map", "--conf", str(conf), "--id", target.user,
            "--options", "noudev", target.spec()]


def krbd_unmap_argv(device: str, force: bool = False) -> list[str]:
    return ["rbd", "device", "unmap", "--options", "noudev,force" if force else "noudev", device]


def _krbd_devices(recorded: dict) -> list[str]:
    """/dev/rbdN devices mapping the recorded image (read from sysfs: no cluster call)."""
    devices = []
    root = RBD_SYSFS
    for entry in sorted(root.iterdir()) if root.is_dir() else []:
        def attr(name):
            with contextlib.suppress(OSError):
                return (entry / name).read_text().strip()
            return ""
        if attr("pool") == recorded.get("pool") and attr("name") == recorded.get("image") \
                and (attr("pool_ns") or "") == (recorded.get("namespace") or "") \
                and attr("current_snap") in ("-", ""):
            devices.append(f"/dev/rbd{entry.name}")
    return devices


def _conf(vol) -> Path:
    return vol.path / "ceph.conf"


def _spec(recorded: dict) -> str:
    return "/".join(p for p in (recorded.get(k) for k in ("pool", "namespace", "image")) if p)


def _fenced_message(vol) -> str | None:
    """A message when this attachment's Ceph client was blocklisted (librbd then fails every
    request with ESHUTDOWN, -108, which qemu-storage-daemon logs)."""
    try:
        with open(vol.qsd_log, "rb") as log_file:
            log_file.seek(0, os.SEEK_END)
            log_file.seek(max(0, log_file.tell() - 8192))
            tail = log_file.read().decode(errors="replace")
    except OSError:
        return None
    if "task.ret -108" in tail or "transport endpoint shutdown" in tail:
        return ("this node's Ceph client of the volume was fenced (blocklisted), normally "
                "because the volume was attached on another node: I/O fails; unstage the "
                "volume here")
    return None


def _classify(reason: str, target: RbdTarget | None, what: str) -> PolyvolError:
    """A typed error for a Ceph client failure message (qsd's, rbd's or the fencing helper's)."""
    image = target.spec() if target else "the image"
    user = f"client.{target.user}" if target else "the cephx user"
    low = reason.lower()
    if "permission denied" in low or "operation not permitted" in low:
        return PermissionDenied(f"Ceph refused {user} ({what}: {reason.strip()}): wrong user id "
                                f"or key, or the user's caps do not cover {image}")
    if "error opening pool" in low or ("pool" in low and "no such file" in low):
        return NotFound(f"Ceph pool {target.pool if target else ''} does not exist ({reason.strip()})")
    if "no such file" in low or "not found" in low:
        return NotFound(f"RBD image {image} does not exist ({reason.strip()})")
    if "timed out" in low or "connection refused" in low:
        reachable = target is not None and any(
            nbd.probe(h, p, 1.0) is None for h, p in monitor_endpoints(target.monitors))
        hint = ("the monitors accept connections, so check the user id and key (and write "
                "monitor addresses on ports other than 3300/6789 with a v1:/v2: prefix)"
                if reachable else "the monitors are unreachable")
        return Unavailable(f"could not connect to the Ceph cluster at "
                           f"{target.monitors if target else '?'} as {user} within "
                           f"{CONNECT_TIMEOUT}s ({what}): {hint}")
    return FailedPrecondition(f"attaching {image} failed ({what}): {reason.strip()}")


# --- the fencing helper (runs as its own process: python -m driver.attach.rbd _fence) -------

def _fence_main(conf: str, user: str, pool: str, namespace: str, image: str,
                fence_after: float) -> dict:
    """Ask the exclusive-lock owner of an image to hand the lock over; fence it (blocklist +
    break) if it does not within `fence_after` seconds. Returns what happened; Ceph errors
    as {"error": text, "errno": n}."""
    try:
        import rados
        import rbd
    except ImportError as error:
        return {"error": f"Ceph Python bindings unavailable: {error}", "errno": None}
    started = time.monotonic()
    cluster = rados.Rados(conffile=conf, rados_id=user)
    try:
        cluster.connect(timeout=CONNECT_TIMEOUT)
        with cluster.open_ioctx(pool) as ioctx:
            if namespace:
                ioctx.set_namespace(namespace)
            with rbd.Image(ioctx, image) as img:
                return _hand_over_or_fence(img, rbd, fence_after, started)
    except (rados.Error, rbd.Error) as error:
        return {"error": f"{type(error).__name__}: {error}",
                "errno": getattr(error, "errno", None) or 0}
    finally:
        cluster.shutdown()


def _hand_over_or_fence(img, rbd, fence_after: float, started: float) -> dict:
    owners = [owner["owner"] for owner in img.lock_get_owners()]
    if not owners:
        return {"owners": []}
    outcome: dict = {}
    done = threading.Event()

    def acquire():
        try:
            img.lock_acquire(rbd.RBD_LOCK_MODE_EXCLUSIVE)
        except Exception as error:  # noqa: BLE001 - reported in the answer
            outcome["error"] = f"{type(error).__name__}: {error}"
        done.set()
    threading.Thread(target=acquire, daemon=True).start()
    answer = {"owners": owners}
    if not done.wait(fence_after):
        try:
            for owner in owners:
                img.lock_break(rbd.RBD_LOCK_MODE_EXCLUSIVE, owner)  # blocklists it first
            answer["fenced"] = owners
        except Exception as error:  # noqa: BLE001 - e.g. caps without `osd blocklist add`
            answer["error"] = f"could not fence {owners}: {type(error).__name__}: {error}"
            return answer  # not fatal: librbd breaks the lock itself once the watch expires
        done.wait(30)
    if "error" in outcome:
        answer["error"] = outcome["error"]
    elif done.is_set():
        img.lock_release()  # never leave our own lock behind: the attach would wait on it
    answer["seconds"] = round(time.monotonic() - started, 3)
    return answer


# --- a tiny command line, for tests and for humans on a node ---------------------------------

def main(argv=None) -> int:
    """python -m driver.attach.rbd {attach|find|condition|prepare-detach|detach|list}
    --state-dir D --volume V [--pool P --image I --monitors M --user U --key-file F]

    The key is read from --key-file (never given on the command line). Prints a JSON result;
    errors print {"error": ..., "type": ...} and exit 1."""
    import argparse
    parser = argparse.ArgumentParser(prog="python -m driver.attach.rbd")
    parser.add_argument("action", choices=["attach", "find", "detach", "condition", "list",
                                           "prepare-detach", "_fence"])
    parser.add_argument("--state-dir")
    parser.add_argument("--volume", default="")
    parser.add_argument("--mode", default="auto", choices=MODES)
    parser.add_argument("--pool")
    parser.add_argument("--namespace", default="")
    parser.add_argument("--image")
    parser.add_argument("--monitors")
    parser.add_argument("--user")
    parser.add_argument("--key-file")
    parser.add_argument("--conf")
    parser.add_argument("--fence-after", type=float, default=FENCE_AFTER)
    parser.add_argument("--no-fence", action="store_true")
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args(argv)
    if args.action == "_fence":
        answer = _fence_main(args.conf, args.user, args.pool, args.namespace, args.image,
                             args.fence_after)
        print(json.dumps(answer))
        sys.stdout.flush()
        os._exit(0)  # never wait on a librados thread still blocked on a dead owner
    log.setup(args.log_level)
    if not args.state_dir:
        print(json.dumps({"error": "--state-dir is required", "type": "InvalidArgument"}))
        return 1

    def make_target():
        try:
            key = Path(args.key_file).read_text().strip() if args.key_file else ""
        except OSError as error:
            raise FailedPrecondition(f"cannot read {args.key_file}: {error.strerror}") from None
        return RbdTarget(args.pool, args.image, args.monitors, args.user, key,
                         namespace=args.namespace)

    return nbd.run_cli_action(
        lambda: RbdAttacher(args.state_dir, args.mode, None if args.no_fence else args.fence_after),
        args.action, args.volume, make_target)

if __name__ == "__main__":
    raise SystemExit(main())
