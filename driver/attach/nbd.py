"""Attach a remote NBD export (a remote-disk volume) as a local block device.

    attacher = NbdAttacher(state_dir, mode="auto")          # "auto" | "kernel" | "userspace"
    target = NbdTarget(host="10.0.0.5", port=10809, export="vol-1",
                       psk_identity="node-a", psk_key_file="/path/keys.psk")
    attachment = attacher.attach("rd-srv1-vol-1", target)   # Attachment(device, method)
    attacher.find("rd-srv1-vol-1")                          # same Attachment, or None
    attacher.condition("rd-srv1-vol-1")                     # Condition(abnormal, message)
    attacher.prepare_detach("rd-srv1-vol-1")                # before unmounting staging
    attacher.detach("rd-srv1-vol-1")                        # nothing left, bounded in time

The data path, on every node (measured correct in docs; see ../shared/design.md):

    storage server: nbdkit --tls=require --tls-psk=... file dir=VOLUMES
          ^  NBD over TLS-PSK (TCP)
    qemu-storage-daemon (qsd): NBD client with TLS-PSK and reconnect-delay=RECONNECT_DELAY,
          re-exported as plain NBD on a unix socket in the volume's state directory
          v
    user space ("nbd-user"):  nbdfuse on that socket -> FUSE file -> loop device (direct I/O)
    kernel     ("nbd-kernel"): /dev/nbdN connected to that socket by nbd-client

qemu-storage-daemon owns TLS and reconnection in both variants: nbdfuse cannot do TLS-PSK
and does not reconnect, kernel NBD has no TLS-PSK. qsd's own FUSE export is NOT used: QEMU
7.2 (Debian 12) corrupts data under parallel writes there.

Server restarts: when the connection drops, qsd holds requests and retries at +0, 1, 3, 7,
15, 31, 47 s (doubling, at most 16 s apart); requests still waiting when reconnect-delay
expires fail with EIO (the filesystem above then aborts its journal). RECONNECT_DELAY=50
sits just above the +47 s retry, so an outage of up to ~45 s heals without the filesystem
seeing an error, while I/O to a server that is gone for good fails after 50 s. (35 would
cover outages up to ~30 s; 15 only ~7 s.)

Processes run in their own session, detached from the plugin, so they outlive a plugin
restart; everything about a volume lives in `<state_dir>/attach/<volume>/` (record, PSK file,
sockets, pid files, logs, FUSE mountpoint), and `find` re-adopts a live attachment from it:
helper processes are recognised by their command line naming that directory. Every function
runs in the caller's network namespace (the plugin's); nothing here enters namespaces.

Helper processes started by a plugin that is PID 1 of a container become its children after
a restart; they are reaped lazily (a zombie counts as dead everywhere here).

Other sources: what is specific to the NBD source (the qsd blockdev, how a start-up failure
reads, how the source is probed and described) sits in a few hook methods (`_qsd_source`,
`_startup_error`, `_other_source`, `_source_problem`, `_source_condition`, `user_method`,
`qsd_role`); driver.attach.rbd overrides them to serve a Ceph RBD image through the same
machinery (qsd with an `rbd` blockdev -> unix socket -> nbdfuse -> loop).
"""

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import threading
import time
from dataclasses import dataclass
from hashlib import sha256
from pathlib import Path
from urllib.parse import quote

from .. import command, fs, log, state
from ..backends.base import Attachment, Condition
from ..errors import (CommandFailed, CommandTimedOut, DeadlineExceeded, FailedPrecondition,
                      InvalidArgument, NotFound, PermissionDenied, PolyvolError, Unavailable)
from . import loop, nbd_kernel

_log = log.get("attach.nbd")

RECONNECT_DELAY = 50          # seconds qsd holds I/O while the server is away (see above)
START_TIMEOUT = 30.0          # qsd must have connected (TLS handshake included) by then
PROBE_TIMEOUT = 2.0           # TCP connect probe of the storage server for condition()
QMP_TIMEOUT = 3.0             # a qsd that does not answer QMP within this is hung
EXIT_WAIT = 10.0              # bounded waits for a helper to exit before SIGKILL
UMOUNT_LIMIT = 120.0          # a filesystem unmount making no progress this long is forced

METHOD_USER = "nbd-user"
METHOD_KERNEL = "nbd-kernel"
MODES = ("auto", "kernel", "userspace")
QSD_EXPORT = "disk"           # export name on the local unix socket
_SOCKET_PATH_MAX = 107        # sun_path is 108 bytes including the NUL
_SAFE_DIR_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_HEX_KEY = re.compile(r"^[0-9a-fA-F]{32,}$")


@dataclass(frozen=True)
class NbdTarget:
    """Where a volume's data is served, and how to authenticate.

    TLS-PSK is the default and requires `psk_identity` and `psk_key_file`: a file in psktool /
    nbdkit `--tls-psk` format ("identity:hexkey" lines; the line for `psk_identity` is used) or
    holding just the hex key. `tls=False` is the explicit opt-out for a trusted storage network.
    """
    host: str
    port: int
    export: str
    psk_identity: str | None = None
    psk_key_file: str | None = None
    tls: bool = True

    def check(self) -> None:
        if not self.host or not isinstance(self.port, int) or not 0 < self.port < 65536:
            raise InvalidArgument(f"bad NBD server address {self.host!r}:{self.port!r}")
        if not self.export or "/" in self.export or "," in self.export:
            raise InvalidArgument(f"bad NBD export name {self.export!r}")
        if "," in self.host:
            raise InvalidArgument(f"bad NBD server host {self.host!r}")
        if self.tls:
            if not self.psk_identity or not self.psk_key_file:
                raise InvalidArgument("TLS-PSK needs psk_identity and psk_key_file "
                                      "(or tls=False as an explicit opt-out)")
            if not re.match(r"^[A-Za-z0-9._@-]+$", self.psk_identity):
                raise InvalidArgument(f"bad PSK identity {self.psk_identity!r}")

    def endpoint(self) -> str:
        return f"{self.host}:{self.port}"

    def summary(self) -> dict:
        return {"host": self.host, "port": self.port, "export": self.export, "tls": self.tls,
                "psk_identity": self.psk_identity if self.tls else None}


def choose_method(mode: str = "auto") -> str:
    """METHOD_KERNEL or METHOD_USER for a configured mode; raises when "kernel" is impossible."""
    if mode not in MODES:
        raise InvalidArgument(f"NBD attach mode {mode!r}: choose one of {', '.join(MODES)}")
    usable, why = nbd_kernel.available()
    if mode == "kernel" and not usable:
        raise FailedPrecondition(f"NBD attach mode 'kernel' configured, but {why}")
    method = METHOD_KERNEL if mode == "kernel" or (mode == "auto" and usable) else METHOD_USER
    _log.info("nbd attach method", mode=mode, method=method, kernel=why)
    return method


class NbdAttacher:
    """Attach, find, check and detach remote NBD volumes on this node.

    `state_dir` must be on a local filesystem that survives plugin restarts (the plugin's own
    state directory). Callers serialise operations on one volume (the node service's lock);
    different volumes may be handled concurrently.
    """

    def __init__(self, state_dir, mode: str = "auto", reconnect_delay: int = RECONNECT_DELAY):
        self.root = Path(os.path.realpath(state_dir)) / "attach"
        self.mode = mode
        self.method = choose_method(mode)
        self.reconnect_delay = int(reconnect_delay)

    # --- the interface ---------------------------------------------------------------------

    def _existing_for(self, volume_id: str, target) -> Attachment | None:
        """The live attachment of the volume, if any; refused when it comes from another source."""
        existing = self.find(volume_id)
        if existing is not None:
            other = self._other_source(self._vol(volume_id).record() or {}, target)
            if other:
                raise FailedPrecondition(f"volume {volume_id} is attached from {other}; "
                                         "detach it first")
        return existing

    def attach(self, volume_id: str, target: NbdTarget) -> Attachment:
        """The block device of the volume, attaching it if needed. Idempotent: an attachment
        that is complete and alive is returned as is (re-adopted after a plugin restart); a
        broken or half-made one is cleaned up first and made again."""
        target.check()
        vol = self._vol(volume_id)
        existing = self._existing_for(volume_id, target)
        if existing is not None:
            _log.info("nbd attach: already attached", volume_id=volume_id,
                      device=existing.device, method=existing.method)
            return existing
        left = vol.leftovers()
        if left:
            for dev in _loops_backed_by(vol.fuse_file) + [(vol.record() or {}).get("device")]:
                in_use = fs.mounts_of_device(dev) if dev and os.path.exists(dev) else []
                if in_use:
                    raise FailedPrecondition(
                        f"volume {volume_id} has a broken attachment whose device {dev} is "
                        f"still mounted at {in_use[0].target}; unstage the volume first")
            _log.warning("nbd attach: cleaning up a broken attachment first",
                         volume_id=volume_id, found=left)
            self.detach(volume_id)
        started = time.monotonic()
        method = self.method
        vol.create(volume_id, method, target)
        try:
            self._start_qsd(vol, target)
            if method == self.user_method:
                device = self._attach_user(vol)
            else:
                device = nbd_kernel.connect(str(vol.nbd_socket), QSD_EXPORT,
                                            self.reconnect_delay + 30)
            vol.update(device=device)
        except BaseException as error:
            _log.warning("nbd attach failed, cleaning up", volume_id=volume_id, error=str(error))
            try:
                self.detach(volume_id)
            except Exception:  # noqa: BLE001 - the attach error is the one to report
                _log.error("nbd attach: cleanup after failure failed", volume_id=volume_id,
                           exc_info=True)
            raise
        _log.info("nbd attached", volume_id=volume_id, device=device, method=method,
                  ms=round((time.monotonic() - started) * 1000), **target.summary())
        return Attachment(device, method)

    def find(self, volume_id: str) -> Attachment | None:
        """The attachment of a volume if it is complete and its processes are alive, else None.
        (A server that is unreachable does not make it None: see `condition`.)"""
        vol = self._vol(volume_id)
        recorded = vol.record()
        if not recorded or not recorded.get("device"):
            return None
        helpers = vol.helpers()
        if len(helpers["qsd"]) != 1:
            return None
        if recorded["method"] == self.user_method:
            if len(helpers["nbdfuse"]) != 1 or not fs.is_mounted(str(vol.fuse_dir)):
                return None
            devices = _loops_backed_by(vol.fuse_file)
            if recorded["device"] not in devices:
                return None
        elif not nbd_kernel.connected(recorded["device"]):
            return None
        return Attachment(recorded["device"], recorded["method"])

    def attached(self) -> list[str]:
        """Volume ids with attach state on this node (live or broken), for re-adoption and
        health checks after a plugin restart."""
        ids = []
        if self.root.is_dir():
            for entry in sorted(self.root.iterdir()):
                recorded = _Volume(entry).record()
                if recorded and recorded.get("volume_id"):
                    ids.append(recorded["volume_id"])
        return ids

    def condition(self, volume_id: str) -> Condition:
        """Abnormal (with a message saying what is wrong) when a helper process is gone, the
        device is missing, or the storage server does not accept a TCP connection."""
        vol = self._vol(volume_id)
        recorded = vol.record()
        if not recorded:
            return Condition(True, f"volume {volume_id} is not attached on this node")
        helpers = vol.helpers()
        broken = "; unstage and stage the volume again"
        if not helpers["qsd"]:
            return Condition(True, f"{self.qsd_role} of this volume is not running: I/O fails"
                             + broken)
        if _stopped(helpers["qsd"][0]):
            return Condition(True, f"{self.qsd_role} is stopped: I/O hangs")
        if recorded["method"] == self.user_method:
            if not helpers["nbdfuse"]:
                return Condition(True, "the nbdfuse process of this volume is not running: "
                                 "I/O fails" + broken)
            if _stopped(helpers["nbdfuse"][0]):
                return Condition(True, "the nbdfuse process of this volume is stopped: I/O hangs")
            if not fs.is_mounted(str(vol.fuse_dir)) or not _loops_backed_by(vol.fuse_file):
                return Condition(True, "the FUSE file or loop device of this volume is gone" + broken)
        elif not nbd_kernel.connected(recorded.get("device") or "nbd-none"):
            return Condition(True, f"{recorded.get('device')} is not connected" + broken)
        return self._source_condition(vol, recorded)

    def detach(self, volume_id: str) -> None:
        """Take the volume off this node: unmount every filesystem mounted from its device,
        release the device, stop the helpers, remove its state. Succeeds when nothing is
        attached. Bounded in time also when the server is dead or a helper is dead or hung:
        then qemu-storage-daemon is killed first, so that pending I/O fails at once instead
        of waiting out the reconnect window (writes not yet flushed are lost, as they would be
        anyway). Raises FailedPrecondition if something could not be removed."""
        vol = self._vol(volume_id)
        if not vol.leftovers():
            return
        started = time.monotonic()
        recorded = vol.record() or {}
        method = recorded.get("method", self.user_method)
        device = recorded.get("device")
        forced = self._fail_fast_if_unhealthy(vol, recorded)
        # 1. filesystems on the device (the node service normally unmounts them first)
        devices = _loops_backed_by(vol.fuse_file) if method == self.user_method else \
            ([device] if device else [])
        for dev in devices:
            if os.path.exists(dev):
                self._unmount_all(vol, recorded, dev)
        # 2. the device
        if method == self.user_method:
            _bounded(lambda: _detach_loops(vol.fuse_file), 60,
                     lambda: self._kill_helpers(vol, "losetup -d is stuck"))
            still = _loops_backed_by(vol.fuse_file)
            if still:
                # Someone still has the device open: the kernel only marked it autoclear.
                # Keep the path under it working and let the caller retry.
                raise FailedPrecondition(
                    f"{still[0]} of volume {volume_id} is still open (a process or a lazily "
                    "unmounted filesystem uses it); retry the detach once it is closed")
            self._release_fuse(vol)
        elif device:
            nbd_kernel.disconnect(device)
        # 3. the NBD client
        for pid in vol.helpers()["qsd"]:
            _stop(pid, signal.SIGTERM, "qemu-storage-daemon", volume_id)
        # 4. make sure, then forget
        left = vol.leftovers(state_dir=False)
        if left:
            raise FailedPrecondition(f"detach of {volume_id} left {', '.join(left)} behind; "
                                     "retry (see the plugin log)")
        tail = vol.log_tail()
        shutil.rmtree(vol.path, ignore_errors=True)
        _log.info("nbd detached", volume_id=volume_id, method=method, device=device,
                  forced=forced, ms=round((time.monotonic() - started) * 1000),
                  helper_log=tail or None)

    def prepare_detach(self, volume_id: str) -> str | None:
        """Call right before unmounting the volume's filesystems when a detach follows (the
        node service's NodeUnstage): if the storage server is unreachable or a helper is dead
        or hung, the helpers are killed now so that the unmount fails pending I/O at once
        instead of blocking for the reconnect window. Returns why it forced, or None (healthy:
        nothing done). `detach` alone does the same, and unmounts by itself."""
        vol = self._vol(volume_id)
        if not vol.record():
            return None
        return self._fail_fast_if_unhealthy(vol, vol.record() or {})

    # --- user space: nbdfuse + loop ----------------------------------------------------------

    def _attach_user(self, vol: "_Volume") -> str:
        vol.fuse_dir.mkdir(mode=0o700, exist_ok=True)
        uri = f"nbd+unix:///{QSD_EXPORT}?socket={quote(str(vol.nbd_socket), safe='/')}"
        argv = ["nbdfuse", "-P", str(vol.nbdfuse_pidfile), str(vol.fuse_file), uri]
        child = _spawn(argv, vol.nbdfuse_log, vol.path, "nbdfuse", vol.volume_id)

        def ready():
            return vol.nbdfuse_pidfile.exists() and fs.is_mounted(str(vol.fuse_dir))
        _wait_ready(child, ready, 15.0, "nbdfuse", vol)
        device = loop.ensure_attached(str(vol.fuse_file))
        dio = Path(f"/sys/block/{os.path.basename(device)}/loop/dio")
        if dio.exists() and dio.read_text().strip() != "1":
            _log.warning("loop device without direct I/O: the page cache holds data twice",
                         device=device)
        return device

    def _release_fuse(self, vol: "_Volume") -> None:
        if fs.is_mounted(str(vol.fuse_dir)):
            try:
                command.run(["fusermount3", "-u", str(vol.fuse_dir)], timeout=15)
            except PolyvolError:
                _abort_fuse(vol.fuse_dir)
                command.run(["umount", "-l", str(vol.fuse_dir)], timeout=15, ok_codes=(0, 32))
        for pid in vol.helpers()["nbdfuse"]:
            # nbdfuse exits by itself once unmounted; give it a moment, then make it.
            if not _wait_gone(pid, 5.0):
                _stop(pid, signal.SIGTERM, "nbdfuse", vol.volume_id)

    # --- qemu-storage-daemon -----------------------------------------------------------------

    def _start_qsd(self, vol: "_Volume", target: NbdTarget) -> None:
        if len(str(vol.nbd_socket)) > _SOCKET_PATH_MAX:
            raise FailedPrecondition(f"state directory path too long for a unix socket: "
                                     f"{vol.nbd_socket}")
        argv = ["qemu-storage-daemon", *self._qsd_source(vol, target),
                 "--nbd-server", f"addr.type=unix,addr.path={vol.nbd_socket}",
                 "--export", f"type=nbd,id=exp0,node-name=vol0,name={QSD_EXPORT},writable=on",
                 "--chardev", f"socket,id=qmp0,path={vol.qmp_socket},server=on,wait=off",
                 "--monitor", "chardev=qmp0",
                 "--pidfile", str(vol.qsd_pidfile)]
        child = _spawn(argv, vol.qsd_log, vol.path, "qemu-storage-daemon", vol.volume_id)

        def ready():
            return vol.qsd_pidfile.exists() and vol.nbd_socket.exists()
        _wait_ready(child, ready, START_TIMEOUT, "qemu-storage-daemon", vol, target,
                    self._startup_error)

    # --- what differs between sources (hooks: driver.attach.rbd overrides them) ---------------
    # The NBD source: a remote NBD server, TLS-PSK, reconnect-delay.

    user_method = METHOD_USER                               # the method of the nbdfuse path
    qsd_role = "the NBD client (qemu-storage-daemon)"      # in condition messages

    def _qsd_source(self, vol: "_Volume", target: NbdTarget) -> list[str]:
        """qemu-storage-daemon arguments (objects, then one --blockdev named vol0) that open
        the volume's data."""
        blockdev = (f"driver=nbd,node-name=vol0,server.type=inet,server.host={target.host},"
                    f"server.port={target.port},export={target.export},"
                    f"reconnect-delay={self.reconnect_delay},discard=unmap")
        args = []
        if target.tls:
            vol.write_psk(target)
            args += ["--object", f"tls-creds-psk,id=tls0,endpoint=client,dir={vol.psk_dir},"
                                 f"username={target.psk_identity}"]
            blockdev += ",tls-creds=tls0"
        return args + ["--blockdev", blockdev]

    def _startup_error(self, what: str, code: int, message: str, target) -> PolyvolError:
        return _startup_error(what, code, message, target)

    def _other_source(self, recorded: dict, target: NbdTarget) -> str | None:
        """Where an existing attachment's data comes from when that is not `target`, else None."""
        if {k: recorded.get(k) for k in ("host", "port", "export")} == \
                {"host": target.host, "port": target.port, "export": target.export}:
            return None
        return (f"{recorded.get('host')}:{recorded.get('port')}/{recorded.get('export')}, not "
                f"from {target.host}:{target.port}/{target.export}")

    def _source_problem(self, recorded: dict, timeout: float = PROBE_TIMEOUT) -> str | None:
        """Why the volume's data cannot be reached from here (a phrase), or None."""
        if not recorded.get("host"):
            return None
        problem = probe_nbd(recorded["host"], recorded["port"], timeout)
        if problem:
            return f"storage server {recorded['host']}:{recorded['port']} is unreachable ({problem})"
        return None

    def _source_condition(self, vol: "_Volume", recorded: dict) -> Condition:
        """The condition once the helpers and the device are known to be fine."""
        problem = self._source_problem(recorded)
        if problem:
            return Condition(True, f"{problem}; I/O waits up to {self.reconnect_delay}s for it "
                             "to return, then fails")
        if gone := self._export_problem(vol, recorded):
            return Condition(True, gone)
        return Condition(False, f"attached through {recorded['method']}, storage server "
                         f"{recorded['host']}:{recorded['port']} reachable")

    @staticmethod
    def _export_problem(vol: "_Volume", recorded: dict) -> str | None:
        """Why the server no longer serves this attachment's export, or None. A reachable server
        without the export means the volume moved to another node (the storage server's fence
        renamed it) or was deleted: this node's I/O can only fail. Asked with this volume's own
        PSK, as its NBD client does. Only for the condition: a failed probe must never make a
        detach give up on flushing."""
        host = recorded["host"]
        address = f"[{host}]" if ":" in host and not host.startswith("[") else host
        if recorded.get("tls"):
            identity, key_file = quote(recorded["psk_identity"], safe=""), vol.psk_dir / "keys.psk"
            uri = (f"nbds://{identity}@{address}:{recorded['port']}/{quote(recorded['export'])}"
                   f"?tls-psk-file={quote(str(key_file))}")
        else:
            uri = f"nbd://{address}:{recorded['port']}/{quote(recorded['export'])}"
        try:
            command.run(["nbdinfo", "--size", uri], timeout=PROBE_TIMEOUT * 2)
        except CommandTimedOut:
            return (f"storage server {host}:{recorded['port']} does not answer NBD requests "
                    f"in time; I/O may stall")
        except CommandFailed as error:
            return (f"storage server {host}:{recorded['port']} does not serve this volume's "
                    f"export {recorded['export']} to this node ({error}): the volume was moved "
                    f"to another node or deleted, so I/O here fails")
        return None

    def _fail_fast_if_unhealthy(self, vol: "_Volume", recorded: dict) -> str | None:
        """Kill the helpers (`_kill_helpers`) when waiting for them would block: the server is
        unreachable, or a helper is dead, stopped or does not answer. Returns why, or None."""
        helpers = vol.helpers()
        why = None
        if not helpers["qsd"] and not helpers["nbdfuse"] and not fs.is_mounted(str(vol.fuse_dir)):
            return None  # nothing that could block
        if not helpers["qsd"]:
            why = "qemu-storage-daemon is not running"
        elif _stopped(helpers["qsd"][0]):
            why = "qemu-storage-daemon is stopped"
        elif recorded.get("method", self.user_method) == self.user_method and (
                not helpers["nbdfuse"] or _stopped(helpers["nbdfuse"][0])):
            why = "nbdfuse is not running"
        elif problem := self._source_problem(recorded):
            why = problem
        elif not qmp_ping(vol.qmp_socket):
            why = "qemu-storage-daemon does not answer on its monitor"
        if why:
            self._kill_helpers(vol, why)
        return why

    def _kill_helpers(self, vol: "_Volume", why: str) -> None:
        """SIGKILL qsd and nbdfuse and abort the FUSE connection: every pending and later
        request on the device fails at once, so unmount and losetup -d cannot block."""
        helpers = vol.helpers()
        _log.warning("nbd detach: forcing, pending I/O fails now (unflushed writes are lost)",
                     volume_id=vol.volume_id, why=why, qsd=helpers["qsd"],
                     nbdfuse=helpers["nbdfuse"])
        for pid in helpers["qsd"]:
            _stop(pid, signal.SIGKILL, "qemu-storage-daemon", vol.volume_id)
        for pid in helpers["nbdfuse"]:
            _stop(pid, signal.SIGKILL, "nbdfuse", vol.volume_id)
        _abort_fuse(vol.fuse_dir)

    def _unmount_all(self, vol: "_Volume", recorded: dict, device: str) -> None:
        """Unmount every mount of `device`; if an unmount hangs while the path is unhealthy
        (or for longer than UMOUNT_LIMIT), kill the helpers so it can finish."""
        for mount in reversed(fs.mounts_of_device(device)):
            started = time.monotonic()
            target = mount.target

            def umount():
                command.run(["umount", target], timeout=UMOUNT_LIMIT + 60, ok_codes=(0, 32))
            worker = threading.Thread(target=_quiet(umount), daemon=True)
            worker.start()
            forced_at = None
            while worker.is_alive():
                worker.join(1.0)
                if not worker.is_alive():
                    break
                if forced_at is None:
                    slow = time.monotonic() - started > UMOUNT_LIMIT
                    sick = self._unhealthy(vol, recorded)
                    if slow or sick:
                        self._kill_helpers(vol, sick or "umount made no progress")
                        forced_at = time.monotonic()
                elif time.monotonic() - forced_at > 60:
                    raise DeadlineExceeded(f"umount {target} still blocks after the NBD helpers "
                                           "were killed; see the kernel log")
            if getattr(worker, "error", None):
                _log.warning("nbd detach: umount failed", target=target, error=str(worker.error))
            if any(m.mount_id == mount.mount_id for m in fs.mounts_at(target)):
                command.run(["umount", "-l", target], timeout=30, ok_codes=(0, 32))
            _log.info("nbd detach: unmounted", volume_id=vol.volume_id, target=target,
                      ms=round((time.monotonic() - started) * 1000))

    def _unhealthy(self, vol: "_Volume", recorded: dict) -> str | None:
        helpers = vol.helpers()
        if not helpers["qsd"] or _stopped(helpers["qsd"][0]):
            return "qemu-storage-daemon is gone or stopped"
        if recorded.get("method", self.user_method) == self.user_method and (
                not helpers["nbdfuse"] or _stopped(helpers["nbdfuse"][0])):
            return "nbdfuse is gone or stopped"
        return self._source_problem(recorded, 1.0)

    def _vol(self, volume_id: str) -> "_Volume":
        if not volume_id:
            raise InvalidArgument("volume id is empty")
        name = volume_id if _SAFE_DIR_NAME.match(volume_id) else None
        if name is None or len(str(self.root / name / "qmp.sock")) > _SOCKET_PATH_MAX:
            name = "h-" + sha256(volume_id.encode()).hexdigest()[:24]
        vol = _Volume(self.root / name)
        vol.volume_id = volume_id
        return vol


# --- per-volume state ------------------------------------------------------------------------

class _Volume:
    """The state directory of one attached volume and what lives in it."""

    def __init__(self, path: Path):
        self.path = path
        self.volume_id = path.name
        self.record_file = path / "attachment.json"
        self.psk_dir = path / "psk"
        self.nbd_socket = path / "nbd.sock"
        self.qmp_socket = path / "qmp.sock"
        self.qsd_pidfile = path / "qsd.pid"
        self.qsd_log = path / "qsd.log"
        self.nbdfuse_pidfile = path / "nbdfuse.pid"
        self.nbdfuse_log = path / "nbdfuse.log"
        self.fuse_dir = path / "fuse"
        self.fuse_file = self.fuse_dir / "disk"

    def record(self) -> dict | None:
        try:
            return state.read(self.record_file)
        except (ValueError, OSError):
            return None

    def create(self, volume_id: str, method: str, target: NbdTarget) -> None:
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.path.parent, 0o700)  # PSK files live below
        self.path.mkdir(mode=0o700, exist_ok=True)
        state.write_atomic(self.record_file, {"volume_id": volume_id, "method": method,
                                              "device": None, "created": time.time(),
                                              **target.summary()})

    def update(self, **fields) -> None:
        record = self.record() or {}
        record.pop("schema", None)
        record.update(fields)
        state.write_atomic(self.record_file, record)

    def write_psk(self, target: NbdTarget) -> None:
        key = _read_psk(target.psk_key_file, target.psk_identity)
        self.psk_dir.mkdir(mode=0o700, exist_ok=True)
        fd = os.open(self.psk_dir / "keys.psk", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(f"{target.psk_identity}:{key}\n")

    def helpers(self) -> dict[str, list[int]]:
        """Live (non-zombie) helper processes whose command line names this directory."""
        found = {"qsd": [], "nbdfuse": []}
        marker = str(self.path) + "/"
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            name = os.path.basename(argv[0].decode(errors="replace"))
            kind = {"qemu-storage-daemon": "qsd", "nbdfuse": "nbdfuse"}.get(name)
            if kind and any(marker in a.decode(errors="replace") for a in argv[1:]) \
                    and _alive(int(entry)):
                found[kind].append(int(entry))
        return found

    def leftovers(self, state_dir: bool = True) -> list[str]:
        """What of this volume still exists on the node (empty: nothing); the state directory
        itself counts only when `state_dir` and nothing else is left."""
        left = []
        helpers = self.helpers()
        left += [f"qemu-storage-daemon pid {p}" for p in helpers["qsd"]]
        left += [f"nbdfuse pid {p}" for p in helpers["nbdfuse"]]
        if fs.is_mounted(str(self.fuse_dir)):
            left.append(f"FUSE mount {self.fuse_dir}")
        left += [f"loop device {d}" for d in _loops_backed_by(self.fuse_file)]
        recorded = self.record() or {}
        if recorded.get("method") == METHOD_KERNEL and recorded.get("device") \
                and nbd_kernel.connected(recorded["device"]):
            left.append(f"kernel NBD device {recorded['device']}")
        if state_dir and self.path.exists() and not left:
            left.append(f"state directory {self.path}")
        return left

    def log_tail(self) -> str:
        lines = []
        for path in (self.qsd_log, self.nbdfuse_log):
            with contextlib.suppress(OSError):
                lines += [f"{path.stem}: {line}" for line in
                          path.read_text(errors="replace").strip().splitlines()[-5:]]
        return "\n".join(lines)


def _read_psk(path: str, identity: str) -> str:
    try:
        text = Path(path).read_text()
    except OSError as error:
        raise FailedPrecondition(f"cannot read the PSK key file {path}: {error.strerror}") from None
    for line in text.splitlines():
        line = line.strip()
        if line.startswith(identity + ":") and _HEX_KEY.match(line.split(":", 1)[1]):
            return line.split(":", 1)[1]
    if len(text.split()) == 1 and _HEX_KEY.match(text.strip()):
        return text.strip()
    raise FailedPrecondition(f"the PSK key file {path} holds no key for identity {identity!r} "
                             "(expected 'identity:hexkey' lines or one hex key)")


# --- loop devices over the FUSE file --------------------------------------------------------
# Never stat a path inside the FUSE mount from here (driver.attach.loop resolves the backing
# file with realpath): with nbdfuse hung, that stat hangs too. Our paths are already real
# (the state directory is resolved once), so losetup's table is compared as text.

def _loops_backed_by(path: Path) -> list[str]:
    listing = command.run(["losetup", "--list", "--json", "--output", "NAME,BACK-FILE"])
    loops = json.loads(listing.stdout).get("loopdevices", []) if listing.stdout.strip() else []
    return [entry["name"] for entry in loops
            if (entry.get("back-file") or "").removesuffix(" (deleted)") == str(path)]


def _detach_loops(path: Path) -> None:
    for device in _loops_backed_by(path):
        command.run(["losetup", "--detach", device], ok_codes=(0, 1))


# --- processes -------------------------------------------------------------------------------

def _spawn(argv, log_path: Path, cwd: Path, what: str, volume_id: str) -> subprocess.Popen:
    """Start a long-running helper in its own session, output appended to `log_path`."""
    with open(log_path, "ab") as out:
        try:
            child = subprocess.Popen([str(a) for a in argv], stdin=subprocess.DEVNULL,
                                     stdout=out, stderr=subprocess.STDOUT, cwd=cwd,
                                     start_new_session=True, close_fds=True)
        except FileNotFoundError:
            raise FailedPrecondition(f"{argv[0]} is not installed on this node") from None
    _log.info("nbd helper started", what=what, pid=child.pid, volume_id=volume_id)
    return child


def _wait_ready(child: subprocess.Popen, ready, timeout: float, what: str, vol: _Volume,
                target=None, classify=None) -> None:
    """Wait until `ready()`; a helper that exits first raises `classify(what, code, last
    line of its log, target)` (default `_startup_error`)."""
    deadline = time.monotonic() + timeout
    while True:
        code = child.poll()
        if code is not None:
            raise (classify or _startup_error)(what, code, _last_line(vol, what), target)
        if ready():
            return
        if time.monotonic() > deadline:
            _stop(child.pid, signal.SIGKILL, what, vol.volume_id)
            where = f" to {target.endpoint()}" if target else ""
            raise Unavailable(f"{what} did not connect{where} within {timeout:g}s")
        time.sleep(0.01)


def _last_line(vol: _Volume, what: str) -> str:
    path = vol.qsd_log if what.startswith("qemu") else vol.nbdfuse_log
    with contextlib.suppress(OSError):
        lines = path.read_text(errors="replace").strip().splitlines()
        if lines:
            return lines[-1]
    return "no output"


def _startup_error(what: str, code: int, message: str, target: NbdTarget | None) -> PolyvolError:
    # qsd prints "qemu-storage-daemon: --blockdev <options>: <what went wrong>"; the options
    # are ours, what went wrong is the news
    reason = message.split(": ", 2)[-1] if message.startswith("qemu-storage-daemon: --") \
        else message
    where = f"{target.host}:{target.port}/{target.export}" if target else ""
    text = f"{what} could not attach {where}: {reason}".replace(" : ", ": ")
    if "TLS handshake failed" in reason or "TLS" in reason and "fail" in reason:
        return PermissionDenied(text + " (wrong TLS-PSK key or identity for this server?)")
    if "tls-creds" in reason:  # "Did you forget a valid tls-creds?": the server requires TLS
        return PermissionDenied(text + " (the server requires TLS)")
    if "export not available" in reason or "export" in reason and "not found" in reason:
        return NotFound(text)
    if "Failed to connect" in reason or "Connection refused" in reason:
        return Unavailable(text)
    return FailedPrecondition(f"{text} (exit code {code})")


def _proc_state(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rpartition(")")[2].split()[0]


def _alive(pid: int) -> bool:
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)  # reap it if it is our own dead child
    return _proc_state(pid) not in (None, "Z", "X")


def _stopped(pid: int) -> bool:
    return _proc_state(pid) in ("T", "t")


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while _alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def _stop(pid: int, sig: int, what: str, volume_id: str) -> None:
    """Signal a helper, wait (bounded), escalate to SIGKILL. A stopped process only reacts
    to SIGKILL, so it gets that at once."""
    if not _alive(pid):
        return
    if _stopped(pid):
        sig = signal.SIGKILL
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)
    if not _wait_gone(pid, 5.0 if sig == signal.SIGKILL else EXIT_WAIT):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        _wait_gone(pid, 5.0)
    _log.info("nbd helper stopped", what=what, pid=pid, signal=signal.Signals(sig).name,
              volume_id=volume_id, gone=not _alive(pid))


def _abort_fuse(mountpoint: Path) -> None:
    """Abort the FUSE connection of a mount: its pending and future requests fail at once."""
    for mount in fs.mounts_at(str(mountpoint)):
        minor = mount.device.split(":")[1]
        abort = Path(f"/sys/fs/fuse/connections/{minor}/abort")
        with contextlib.suppress(OSError):
            abort.write_text("1")
            _log.info("fuse connection aborted", mountpoint=str(mountpoint), connection=minor)


def _bounded(fn, timeout: float, on_timeout) -> None:
    """Run fn; if it has not returned after `timeout`, call on_timeout() and wait again."""
    worker = threading.Thread(target=_quiet(fn), daemon=True)
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        on_timeout()
        worker.join(timeout)
        if worker.is_alive():
            raise DeadlineExceeded(f"detach step did not finish within {2 * timeout:g}s")
    if worker.error:
        raise worker.error


def _quiet(fn):
    """Wrap fn for a thread: the exception is kept on the thread object (`.error`)."""
    def run():
        me = threading.current_thread()
        me.error = None
        try:
            fn()
        except BaseException as error:  # noqa: BLE001 - re-raised by the caller
            me.error = error
    return run


# --- probes ----------------------------------------------------------------------------------

def probe(host: str, port: int, timeout: float = PROBE_TIMEOUT) -> str | None:
    """None when `host:port` accepts a TCP connection within `timeout`, else why not."""
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            return None
    except OSError as error:
        return error.strerror or type(error).__name__


_NBD_GREETING = b"NBDMAGIC" + b"IHAVEOPT"
# The client's answer to the greeting (fixed newstyle, no zeroes), then NBD_OPT_ABORT: a
# clean goodbye the server must accept even before TLS, so a probe leaves no error in its log.
_NBD_GOODBYE = struct.pack(">I", 3) + b"IHAVEOPT" + struct.pack(">II", 2, 0)


def probe_nbd(host: str, port: int, timeout: float = PROBE_TIMEOUT) -> str | None:
    """None when an NBD server at `host:port` greets within `timeout`, else why not. A TCP
    connection alone proves little: the storage server keeps its listening socket while its
    nbdkit is down, and the kernel completes handshakes into the backlog meanwhile."""
    try:
        with socket.create_connection((host, int(port)), timeout=timeout) as sock:
            greeting = b""
            while len(greeting) < len(_NBD_GREETING) + 2:
                chunk = sock.recv(len(_NBD_GREETING) + 2 - len(greeting))
                if not chunk:
                    break
                greeting += chunk
            if not greeting.startswith(_NBD_GREETING):
                return "it accepts connections but its NBD server does not answer"
            with contextlib.suppress(OSError):
                sock.sendall(_NBD_GOODBYE)
                sock.recv(64)
            return None
    except socket.timeout:
        return "it accepts connections but its NBD server does not answer"
    except OSError as error:
        return error.strerror or type(error).__name__


def qmp_ping(path: Path, timeout: float = QMP_TIMEOUT) -> bool:
    """Whether qemu-storage-daemon answers a QMP command on its monitor socket."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(str(path))
            reader = sock.makefile("rb")
            if b"QMP" not in reader.readline():
                return False
            for request in (b'{"execute": "qmp_capabilities"}\n', b'{"execute": "query-block-exports"}\n'):
                sock.sendall(request)
                while True:
                    reply = json.loads(reader.readline() or b"{}")
                    if "event" not in reply:
                        break
                if "return" not in reply:
                    return False
            return True
    except (OSError, ValueError):
        return False


# --- a tiny command line, for tests and for humans on a node ---------------------------------

def main(argv=None) -> int:
    """python -m driver.attach.nbd {attach|find|condition|prepare-detach|detach|list}
    --state-dir D --volume V [--host H --port P --export E --psk-identity I --psk-key-file F]

    Prints a JSON result; errors print {"error": ..., "type": ...} and exit 1."""
    import argparse
    parser = argparse.ArgumentParser(prog="python -m driver.attach.nbd")
    parser.add_argument("action", choices=["attach", "find", "detach", "condition", "list",
                                           "prepare-detach"])
    parser.add_argument("--state-dir", required=True)
    parser.add_argument("--volume", default="")
    parser.add_argument("--mode", default="auto", choices=MODES)
    parser.add_argument("--host")
    parser.add_argument("--port", type=int, default=10809)
    parser.add_argument("--export")
    parser.add_argument("--psk-identity")
    parser.add_argument("--psk-key-file")
    parser.add_argument("--no-tls", action="store_true")
    parser.add_argument("--reconnect-delay", type=int, default=RECONNECT_DELAY)
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args(argv)
    log.setup(args.log_level)
    return run_cli_action(
        lambda: NbdAttacher(args.state_dir, args.mode, args.reconnect_delay), args.action,
        args.volume, lambda: NbdTarget(args.host, args.port, args.export, args.psk_identity,
                                       args.psk_key_file, tls=not args.no_tls))


def run_cli_action(make_attacher, action: str, volume: str, make_target) -> int:
    """One verb of an attach CLI (this module's and driver.attach.rbd's), printed as JSON."""
    try:
        attacher = make_attacher()
        if action == "attach":
            found = attacher.attach(volume, make_target())
            result = {"device": found.device, "method": found.method}
        elif action == "find":
            found = attacher.find(volume)
            result = {"device": found.device, "method": found.method} if found else None
        elif action == "detach":
            attacher.detach(volume)
            result = {"detached": volume}
        elif action == "condition":
            cond = attacher.condition(volume)
            result = {"abnormal": cond.abnormal, "message": cond.message}
        elif action == "prepare-detach":
            result = {"forced": attacher.prepare_detach(volume)}
        else:
            result = attacher.attached()
    except PolyvolError as error:
        print(json.dumps({"error": str(error), "type": type(error).__name__}))
        return 1
    print(json.dumps(result), flush=True)
    return 0

if __name__ == "__main__":
    raise SystemExit(main())
