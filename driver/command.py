"""The one way polyvol runs external programs, and the accounting of time spent outside Python.

Argument lists only (never a shell), a timeout on every call so a hung tool cannot wedge
a volume, and one log line per call with exit code, duration and the tail of stderr.

Time spent on a volume's real work outside the plugin's own code is added up per RPC (see
`accounting`), so the RPC log line and the lifecycle benchmark can tell the driver's own
overhead from the work it asked for. Two kinds, kept apart:

- command time: from starting an external program until it has exited (`run`);
- kernel time: blocks where the plugin waits in the kernel on the volume's work done
  in-process (`kernel`): the loop ioctls (what losetup did), creating a new volume's sparse
  data file and unlinking a deleted one's (what rm did: the kernel frees its blocks). Only
  such system calls go there; the plugin's own bookkeeping (its metadata records and their
  fsyncs, the volume directory, mountinfo and sysfs scans, staging and target directories,
  logging) stays the plugin's time.
"""

import contextlib
import contextvars
import os
import select
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass

from . import log
from .errors import CommandFailed, CommandTimedOut

_log = log.get("command")
DEFAULT_TIMEOUT = 120.0
AFTER_EXIT_WAIT = 1.0  # how long output is still read after the tool exited (see _communicate)
REAP_WAIT = 5.0  # how long a killed tool may take to exit before it is reaped in the background
_COMMAND, _KERNEL = 0, 1
_spent = contextvars.ContextVar("external_seconds", default=None)


@dataclass
class Result:
    argv: list
    returncode: int
    stdout: str
    stderr: str
    seconds: float


def run(argv, *, timeout: float = DEFAULT_TIMEOUT, check: bool = True,
        input: str | None = None, ok_codes=(0,)) -> Result:
    argv = [str(a) for a in argv]
    started = time.monotonic()
    try:
        returncode, stdout, stderr = _run(argv, input, timeout)
    except subprocess.TimeoutExpired:
        _account(time.monotonic() - started, _COMMAND)
        _log.error("command", argv=argv, timeout=timeout, outcome="killed after timeout")
        raise CommandTimedOut(argv, timeout) from None
    except FileNotFoundError:
        raise CommandFailed(argv, 127, f"{argv[0]}: not installed") from None
    seconds = time.monotonic() - started
    _account(seconds, _COMMAND)
    fields = {"argv": argv, "rc": returncode, "ms": round(seconds * 1000, 1)}
    if stderr.strip():
        fields["stderr"] = stderr.strip()[-500:]
    if returncode in ok_codes or not check:
        _log.debug("command", **fields)
    else:
        _log.warning("command", **fields)
        raise CommandFailed(argv, returncode, stderr)
    return Result(argv, returncode, stdout, stderr, seconds)


def _run(argv: list[str], input: str | None, timeout: float) -> tuple[int, str, str]:
    """Run `argv` to its end: (exit code, stdout, stderr); TimeoutExpired after `timeout` s.

    subprocess.run(timeout=...) collects the exit by polling waitpid with sleeps of 0.5 ms
    and more, which adds up to a millisecond to every command and counts it as the
    command's; here a pidfd waits in the same poll as the pipes, so the exit is seen when
    it happens."""
    def start():
        # Unbuffered pipes: they are read with os.read, and plain FileIO objects skip the
        # isatty/lseek probes a buffered reader makes on every pipe.
        return subprocess.Popen(argv, executable=_executable(argv[0]), bufsize=0,
                                stdin=subprocess.PIPE if input is not None else None,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        proc = start()
    except FileNotFoundError:  # moved or removed since it was looked up: look again
        _found.pop((argv[0], os.environ.get("PATH")), None)
        proc = start()
    try:
        try:
            pidfd = os.pidfd_open(proc.pid)
        except (AttributeError, OSError):  # Linux < 5.3: subprocess's own loop
            out, err = proc.communicate(None if input is None else input.encode(), timeout)
            return proc.returncode, _text(out), _text(err)
        try:
            out, err = _communicate(proc, pidfd, None if input is None else input.encode(),
                                    time.monotonic() + timeout)
        finally:
            os.close(pidfd)
        return proc.wait(), _text(out), _text(err)
    except BaseException:
        proc.kill()
        raise
    finally:
        for pipe in (proc.stdin, proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()
        _reap(proc)


def _reap(proc: subprocess.Popen) -> None:
    """Collect the child's exit without ever blocking the caller for long: a tool killed in
    uninterruptible sleep (I/O on a dead device) exits only when the kernel lets it, and the
    RPC that ran it must not hold its volume until then."""
    try:
        proc.wait(REAP_WAIT)
    except subprocess.TimeoutExpired:
        _log.warning("command did not exit after it was killed; reaping it in the background",
                     argv=proc.args, pid=proc.pid)
        threading.Thread(target=proc.wait, name=f"reap-{proc.pid}", daemon=True).start()


_found: dict[tuple[str, str | None], str] = {}


def _executable(name: str) -> str:
    """The program to start for argv[0] `name`, looked up in PATH once (argv[0] stays as
    given: mke2fs reads it). Given the bare name, the child would try execve in every PATH
    directory before the right one, on every run."""
    if "/" in name:
        return name
    key = (name, os.environ.get("PATH"))
    path = _found.get(key)
    if path is None:
        path = shutil.which(name)
        if path is None:
            return name  # not installed: Popen says so (FileNotFoundError)
        _found[key] = path
    return path


def _communicate(proc: subprocess.Popen, pidfd: int, data: bytes | None,
                 deadline: float) -> tuple[bytes, bytes]:
    """Feed stdin, read stdout and stderr to their ends, and wait for the exit, all in one poll."""
    poller = select.poll()
    chunks = {proc.stdout.fileno(): [], proc.stderr.fileno(): []}
    for fd in chunks:
        poller.register(fd, select.POLLIN)
    poller.register(pidfd, select.POLLIN)
    waiting = {*chunks, pidfd}
    stdin = proc.stdin.fileno() if proc.stdin is not None else None
    if stdin is not None:
        poller.register(stdin, select.POLLOUT)
        waiting.add(stdin)
        view = memoryview(data)
    while waiting:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            if pidfd not in waiting:
                break  # it exited; a process it left behind holds the pipes: keep what was read
            raise subprocess.TimeoutExpired(proc.args, 0)
        for fd, _ in poller.poll(remaining * 1000 + 1):
            if fd == pidfd:
                poller.unregister(fd)
                waiting.discard(fd)
                deadline = min(deadline, time.monotonic() + AFTER_EXIT_WAIT)
            elif fd == stdin:
                try:
                    view = view[os.write(fd, view[:512]):]
                except BrokenPipeError:
                    view = view[:0]
                if not view:
                    poller.unregister(fd)
                    waiting.discard(fd)
                    proc.stdin.close()
            else:
                block = os.read(fd, 65536)
                if block:
                    chunks[fd].append(block)
                else:
                    poller.unregister(fd)
                    waiting.discard(fd)
    out, err = (b"".join(chunks[fd.fileno()]) for fd in (proc.stdout, proc.stderr))
    return out, err


def _text(raw: bytes) -> str:
    # As subprocess's text mode gives it: universal newlines; a stray byte does not fail the call.
    text = raw.decode(errors="replace")
    return text.replace("\r\n", "\n").replace("\r", "\n") if "\r" in text else text


@contextlib.contextmanager
def kernel(call: str, **fields):
    """Time a block in which the plugin waits in the kernel on a volume's real work done
    in-process (an ioctl that sets up a loop device, creating or unlinking a volume's data
    file): accounted next to command time, as if a tool had done it, and logged at debug like
    a command. Keep the block to those system calls: bookkeeping around them is the
    plugin's own time. The block may add fields to its log line through the dict it gets."""
    started = time.monotonic()
    try:
        yield fields
    finally:
        seconds = time.monotonic() - started
        _account(seconds, _KERNEL)
        _log.debug("kernel", call=call, ms=round(seconds * 1000, 2), **fields)


def _account(seconds: float, kind: int) -> None:
    box = _spent.get()
    if box is not None:
        box[kind] += seconds


class accounting:
    """Context manager adding up, per thread/context, the seconds spent inside it in external
    commands (`seconds`) and in the kernel on in-process volume work (`kernel_seconds`).

    With `scheduling=True` it also reads the thread's scheduler times at both ends
    (/proc/thread-self/schedstat, two small reads): `cpu_seconds` on a CPU and
    `runq_seconds` runnable but waiting for one (None where the kernel keeps no schedstat).
    The rest of the wall time the thread was blocked: in commands, or waiting for the GIL,
    a lock or the disk. This tells CPU starvation from GIL contention under many workers."""

    def __init__(self, scheduling: bool = False):
        self._scheduling = scheduling
        self.cpu_seconds = self.runq_seconds = None

    def __enter__(self):
        self._box = [0.0, 0.0]
        self._token = _spent.set(self._box)
        self._sched = _thread_schedstat() if self._scheduling else None
        return self

    def __exit__(self, *exc):
        _spent.reset(self._token)
        if self._sched is not None:
            now = _thread_schedstat()
            if now is not None:
                self.cpu_seconds = (now[0] - self._sched[0]) / 1e9
                self.runq_seconds = (now[1] - self._sched[1]) / 1e9

    @property
    def seconds(self) -> float:
        return self._box[_COMMAND]

    @property
    def kernel_seconds(self) -> float:
        return self._box[_KERNEL]

    @property
    def external_seconds(self) -> float:
        return self._box[_COMMAND] + self._box[_KERNEL]


_schedstat = threading.local()  # each thread's own /proc/thread-self/schedstat, kept open


def _thread_schedstat() -> tuple[int, int] | None:
    """(ns on a CPU, ns runnable waiting for one) of the calling thread, or None. The file
    stays open per thread (closed when the thread ends): a pread is a microsecond, an open
    ten."""
    try:
        stat = getattr(_schedstat, "file", None)
        if stat is None:
            stat = _schedstat.file = open("/proc/thread-self/schedstat", "rb", buffering=0)
        on_cpu, waiting, _ = os.pread(stat.fileno(), 128, 0).split()
        return int(on_cpu), int(waiting)
    except (OSError, ValueError):
        return None
