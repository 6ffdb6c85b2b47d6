"""The data plane: one supervised nbdkit serving every volume of the server over NBD.

    nbdkit --foreground --pidfile P --tls=require --tls-psk=FILE file dir=EXPORTS
        (socket-activated: fd 3 is the server's listening socket on HOST:PORT)

- The server opens the listening socket once and keeps it for its whole life; nbdkit gets it
  by socket activation (driver.storage.watchdog). While nbdkit restarts, a reconnecting client
  waits in the socket's backlog instead of being refused: measured, the longest stall of a
  writer fsyncing every 50 ms through a restart went from 1.05 s to 0.12 s.
- `file dir=EXPORTS` serves each regular file in EXPORTS as an export of the same name
  (names with '/' are refused by nbdkit) and sees new and removed files without a restart.
  It opens the file when a client selects the export and keeps it open for the whole
  connection, which is how `open_files` can tell that a node has a volume attached.
- `--tls=require --tls-psk=FILE`: plaintext and unknown or wrong keys are refused at the
  handshake. GnuTLS reads FILE at every handshake, so identities are added and revoked by
  editing the file, without a restart (measured with nbdkit 1.32).
- nbdkit dies with the server by SIGKILL, and `stop` kills it the same way. Not SIGTERM: on
  SIGTERM nbdkit shuts down gracefully and answers requests that arrive meanwhile with
  ESHUTDOWN, which a node's filesystem sees as EIO; after SIGKILL the node's NBD client
  reconnects and resends (tests/test_remote_disk.py: kill -9 of the server under fsync'd
  writes, no error). nbdkit sets its own parent-death signal to SIGTERM, so its parent is a
  watchdog process (driver.storage.watchdog) that outlives the server until it has killed
  nbdkit; with the server as the parent, the SIGTERM raced the SIGKILL and sometimes won.
  Writes nbdkit acknowledged are in the kernel's page cache already, so killing it loses
  nothing.
- `--pidfile` is written once nbdkit accepts connections: that is "ready".
- `restart` kills the running nbdkit by SIGKILL on purpose and the supervisor starts the next
  one at once (no crash backoff): the one way to cut every connection nbdkit has, used to
  fence a node off a volume that moved away from it (server.py, PublishVolume). nbdkit cannot
  drop one client, but after SIGKILL every client of another volume reconnects to its export
  and resends, like after a crash, so the cost is a stall of about a second on the server's
  other attached volumes (QEMU's client retries at +0 s, while nbdkit is still starting, then
  at +1 s).
- No `--filter=fua fuamode=force`. NBD, like a disk with a volatile write cache, promises
  durability only for writes covered by a FLUSH or sent with FUA, and both reach the file
  as fdatasync (the export advertises can_flush and can_fua). Filesystems on the node
  flush at their commit points and the attach paths forward fsync as an NBD flush, so a
  storage-host crash loses only writes nobody was told were durable. Forcing FUA on every
  write would cost, measured here over loopback with fio's nbd engine at iodepth 16:
  4k random writes 25.5k -> 11.1k IOPS, 64k random writes 900 -> 270 MB/s, 1M sequential
  940 -> 665 MB/s, and more on disks whose cache flush is slow.
"""

import collections
import contextlib
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from .. import log
from ..errors import FailedPrecondition, InvalidArgument, Unavailable
from .tls import write_file_atomic

_log = log.get("nbdkit")
FIRST_BACKOFF, MAX_BACKOFF = 0.5, 30.0
# A run this long counts as healthy: the next crash restarts after FIRST_BACKOFF again.
STABLE_SECONDS = 60.0
READY_TIMEOUT = 20.0
STOP_TIMEOUT = 10.0


class Nbdkit:
    def __init__(self, exports_dir: Path, pidfile: Path, host: str, port: int, psk_file: str | None):
        """`psk_file` None serves without TLS (the --insecure-nbd opt-out)."""
        self.exports_dir = Path(exports_dir)
        self.pidfile = Path(pidfile)
        self.host, self.port, self.psk_file = host, port, psk_file
        self.restarts = 0
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._first_outcome = threading.Event()
        self._process: subprocess.Popen | None = None  # the watchdog, nbdkit's parent
        self._nbdkit_pid: int | None = None
        self._ready_at: float | None = None
        self._ever_ready = False
        self._stderr_tail = collections.deque(maxlen=20)
        self._restart_reason: str | None = None  # set while a requested restart is under way
        self._listener: socket.socket | None = None
        self._thread = threading.Thread(target=self._supervise, name="nbdkit-supervisor", daemon=True)

    def argv(self) -> list[str]:
        tls = ["--tls=require", f"--tls-psk={self.psk_file}"] if self.psk_file else ["--tls=off"]
        # No -i/-p: nbdkit gets the server's listening socket (see driver.storage.watchdog).
        return ["nbdkit", "--foreground", "--pidfile", str(self.pidfile), *tls,
                "file", f"dir={self.exports_dir}"]

    def start(self) -> None:
        """Start supervising; return once nbdkit is ready, or raise if its first run fails."""
        self._stop_stale()
        try:
            self._listener = _listen(self.host, self.port)
        except OSError as error:
            raise FailedPrecondition(f"cannot listen for NBD on {self.host}:{self.port}: "
                                     f"{error.strerror or error}") from None
        self._thread.start()
        self._first_outcome.wait(READY_TIMEOUT)
        if not self._ever_ready:
            self.stop()
            raise FailedPrecondition(f"nbdkit did not start on {self.host}:{self.port}: "
                                     f"{' / '.join(self._stderr_tail) or 'no message'}")

    def _stop_stale(self) -> None:
        """Kill an nbdkit left by a server that was killed: nbdkit's --exit-with-parent only
        sends it SIGTERM, which it does not act on while a node keeps a connection open, so
        it would keep the port (and serve) without a supervisor."""
        try:
            pid = int(self.pidfile.read_text().strip())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except (FileNotFoundError, ValueError, ProcessLookupError):
            return
        if f"dir={self.exports_dir}".encode() in cmdline:
            _log.warning("killing an nbdkit left by a previous run", pid=pid)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            for _ in range(100):
                if not Path(f"/proc/{pid}").exists():
                    break
                time.sleep(0.05)

    def stop(self) -> None:
        with self._lock:
            self._stopping.set()
            process, nbdkit_pid = self._process, self._nbdkit_pid
        if process is not None:
            process.terminate()  # the watchdog then SIGKILLs nbdkit: see the module docstring
            try:
                process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                _log.error("nbdkit's watchdog did not stop; killing both", pid=process.pid)
                if nbdkit_pid is not None:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(nbdkit_pid, signal.SIGKILL)
                process.kill()
                process.wait(STOP_TIMEOUT)
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(STOP_TIMEOUT)
        if self._listener is not None:
            self._listener.close()

    def ready_for(self) -> float | None:
        """Seconds since the running nbdkit became ready; None while none is ready."""
        with self._lock:
            return None if self._ready_at is None else time.monotonic() - self._ready_at

    def pid(self) -> int | None:
        with self._lock:
            return self._nbdkit_pid if self._ready_at is not None else None

    def open_files(self) -> set[tuple[int, int]]:
        """(device, inode) of every file nbdkit has open. Compared by inode, not by name,
        because an export is a hard link and its name may be gone already."""
        pid = self.pid()
        if pid is None:
            raise Unavailable("the NBD data plane (nbdkit) is restarting; retry in a few seconds")
        return _open_files_of(pid)

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> bool:
        """Wait until an nbdkit is ready; False if none is within `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while self.pid() is None:
            if time.monotonic() > deadline or self._stopping.is_set():
                return False
            time.sleep(0.01)
        return True

    def restart(self, reason: str, pid: int | None = None,
                timeout: float = READY_TIMEOUT) -> float | None:
        """Cut every NBD connection: SIGKILL the running nbdkit (only if it is still `pid`,
        when given) and wait until the supervisor's next one is ready, which it starts at once.
        Returns the seconds from the kill to the new nbdkit being ready (`timeout` when it was
        not ready by then: the supervisor goes on as after a crash); None when there was
        nothing to kill (that nbdkit is gone already, and its connections with it)."""
        with self._lock:
            running = self._nbdkit_pid
            if running is None or (pid is not None and running != pid):
                return None
            self._restart_reason = reason
            killed_at = time.monotonic()
            with contextlib.suppress(ProcessLookupError):
                os.kill(running, signal.SIGKILL)
        deadline = killed_at + timeout
        while True:
            now = self.pid()
            if now is not None and now != running:
                return time.monotonic() - killed_at
            if time.monotonic() > deadline or self._stopping.is_set():
                _log.error("nbdkit not ready again after a restart", timeout_s=timeout,
                           reason=reason)
                return time.monotonic() - killed_at
            time.sleep(0.005)

    def restart_if_open(self, file_id: tuple[int, int], reason: str) -> float | None:
        """`restart` if nbdkit has the file (device, inode) open, i.e. some client is connected
        to an export of it; returns what `restart` did, None when nothing was open.

        The caller has removed every name the file was exported under, so no client can open
        it from now on; what is left to cut are connections opened before. An open that raced
        with the removal (nbdkit resolved the name just before, and its descriptor appears just
        after the first look) is caught by the second look."""
        if not self.wait_ready():
            # No nbdkit was ready for READY_TIMEOUT: the one that served before the names were
            # removed is dead (the supervisor kills one that is not ready in that time), and
            # its connections with it; a new one cannot open the removed names.
            _log.warning("nbdkit is not running: no connection to cut", reason=reason)
            return None
        for look in range(2):
            pid = self.pid()
            if pid is None:
                return None  # exited meanwhile: the connections went with it
            try:
                open_now = _open_files_of(pid)
            except Unavailable:
                return None
            if file_id in open_now:
                return self.restart(reason, pid)
            if look == 0:
                time.sleep(0.02)
        return None

    # --- the supervisor thread ---
    def _supervise(self) -> None:
        backoff = FIRST_BACKOFF
        while True:
            with self._lock:
                if self._stopping.is_set():
                    return
                self.pidfile.unlink(missing_ok=True)
                self._stderr_tail.clear()
                process, watchdog_pipe = _start_under_watchdog(self.argv(), self._listener.fileno())
                self._process, self._nbdkit_pid = process, None
            started = time.monotonic()
            drain = threading.Thread(target=self._drain, args=(process,), name="nbdkit-stderr",
                                     daemon=True)
            drain.start()
            if self._await_ready(process):
                _log.info("nbdkit ready", pid=self._nbdkit_pid, address=f"{self.host}:{self.port}",
                          tls=bool(self.psk_file), restarts=self.restarts)
            self._first_outcome.set()
            returncode = process.wait()
            os.close(watchdog_pipe)
            drain.join(1.0)  # so the exit is logged with nbdkit's last words
            ran = time.monotonic() - started
            with self._lock:
                nbdkit_pid = self._nbdkit_pid
                self._process, self._nbdkit_pid, self._ready_at = None, None, None
                requested, self._restart_reason = self._restart_reason, None
                if self._stopping.is_set():
                    _log.info("nbdkit stopped", pid=nbdkit_pid, rc=returncode)
                    return
            self.restarts += 1
            if requested is not None:
                # Killed on purpose (`restart`): the next one starts at once, and this run
                # does not count as a crash for the backoff.
                _log.info("nbdkit killed to cut every connection; restarting now",
                          pid=nbdkit_pid, reason=requested, restarts=self.restarts)
                continue
            if ran >= STABLE_SECONDS:
                backoff = FIRST_BACKOFF
            _log.warning("nbdkit exited; restarting", pid=nbdkit_pid, rc=returncode,
                         ran_s=round(ran, 1), restart_in_s=backoff, restarts=self.restarts,
                         stderr=" / ".join(self._stderr_tail))
            if self._stopping.wait(backoff):
                return
            backoff = min(backoff * 2, MAX_BACKOFF)

    def _await_ready(self, process: subprocess.Popen) -> bool:
        deadline = time.monotonic() + READY_TIMEOUT
        while process.poll() is None and not self._stopping.is_set():
            nbdkit_pid = _child_pid_in(self.pidfile, process.pid)
            if nbdkit_pid is not None:
                with self._lock:
                    self._nbdkit_pid = nbdkit_pid
                    self._ready_at = time.monotonic()
                    self._ever_ready = True
                return True
            if time.monotonic() > deadline:
                _log.error("nbdkit not ready in time; killing it", timeout_s=READY_TIMEOUT)
                process.terminate()
                return False
            time.sleep(0.01)
        return False

    def _drain(self, process: subprocess.Popen) -> None:
        """nbdkit writes only errors to stderr: each line goes to the log, the last few
        are kept for the message when it fails to start."""
        for line in process.stderr:
            line = line.rstrip()
            if line:
                self._stderr_tail.append(line)
                _log.warning("nbdkit says", line=line)


# --- the PSK file (nbdkit's format: one `identity:hexkey` line per client) ---
PSK_IDENTITY = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
PSK_LINE = re.compile(rf"(?P<identity>{PSK_IDENTITY.pattern}):(?P<key>(?:[0-9a-fA-F]{{2}})+)")


def read_psk_identities(path: Path) -> list[str]:
    """The identities in a PSK file; raise unless every line is `identity:hexkey`."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        raise FailedPrecondition(f"PSK file {path} does not exist; make one with "
                                 f"`polyvol storage psk --identity NAME --out {path}`") from None
    identities = []
    for number, line in enumerate(text.splitlines(), 1):
        match = PSK_LINE.fullmatch(line.strip())
        if not match:
            raise FailedPrecondition(f"{path} line {number} is not `identity:hexkey`")
        identities.append(match["identity"])
    if not identities:
        raise FailedPrecondition(f"PSK file {path} holds no key; add one with `polyvol storage psk`")
    return identities


def add_psk_identity(path: Path, identity: str) -> None:
    """Give `identity` a new random 256-bit key in the PSK file, creating the file (mode 0600)
    or replacing that identity's old key and keeping the others'."""
    if not PSK_IDENTITY.fullmatch(identity):
        raise InvalidArgument(f"PSK identity {identity!r} must be 1-64 characters of A-Z, a-z, "
                              f"0-9, '.', '_', '-', starting with a letter or digit")
    path = Path(path)
    kept = []
    if path.exists():
        read_psk_identities(path)  # refuse to rewrite a file we do not understand
        kept = [line for line in path.read_text().splitlines()
                if line.strip() and PSK_LINE.fullmatch(line.strip())["identity"] != identity]
    body = "".join(f"{line}\n" for line in [*kept, f"{identity}:{secrets.token_hex(32)}"])
    # Replaced atomically: a running nbdkit reads the file at every handshake.
    write_file_atomic(path, body.encode(), 0o600)



def _listen(host: str, port: int) -> socket.socket:
    """The NBD listening socket, owned by the server for its whole life (nbdkit restarts
    without closing it: see driver.storage.watchdog)."""
    family, kind, proto, _, address = socket.getaddrinfo(
        host.strip("[]"), port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    listener = socket.socket(family, kind, proto)
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(address)
        listener.listen(socket.SOMAXCONN)
    except OSError:
        listener.close()
        raise
    return listener


def _start_under_watchdog(argv: list[str], listen_fd: int) -> tuple[subprocess.Popen, int]:
    """Start nbdkit as the child of a watchdog that SIGKILLs it when this process dies, serving
    on the listening socket `listen_fd`; return the watchdog and the pipe end to keep open
    until the watchdog has exited."""
    read_end, write_end = os.pipe()  # not inheritable: no other child holds the write end
    try:
        # In its own session: a Ctrl-C or a signal to the server's process group reaches
        # the server, which then stops nbdkit itself, in order.
        watchdog = subprocess.Popen([sys.executable, "-m", "driver.storage.watchdog",
                                     str(listen_fd), *argv], pass_fds=(listen_fd,),
                                    stdin=read_end, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.PIPE, text=True, errors="replace",
                                    start_new_session=True)
    finally:
        os.close(read_end)
    return watchdog, write_end


def _open_files_of(pid: int) -> set[tuple[int, int]]:
    """(device, inode) of every file process `pid` has open."""
    found = set()
    fd_dir = f"/proc/{pid}/fd"
    try:
        names = os.listdir(fd_dir)
    except FileNotFoundError:
        raise Unavailable("the NBD data plane (nbdkit) just exited; retry in a few seconds") from None
    for name in names:
        try:
            st = os.stat(f"{fd_dir}/{name}")
        except FileNotFoundError:
            continue  # closed while we looked
        found.add((st.st_dev, st.st_ino))
    return found


def _child_pid_in(pidfile: Path, parent: int) -> int | None:
    """The pid written in `pidfile` if that process is a child of `parent`, else None."""
    try:
        pid = int(pidfile.read_text().strip())
        status = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ValueError):
        return None
    return pid if f"\nPPid:\t{parent}\n" in status else None
