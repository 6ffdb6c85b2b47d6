"""The one way polyvol runs external programs.

Argument lists only (never a shell), a timeout on every call so a hung tool cannot wedge
a volume, and one log line per call with exit code, duration and the tail of stderr.
The time spent in commands is added up per RPC (see `accounting`), so the RPC log line
and the lifecycle benchmark can tell the driver's own overhead from the tools'.
"""

import contextvars
import subprocess
import time
from dataclasses import dataclass

from . import log
from .errors import CommandFailed, CommandTimedOut

_log = log.get("command")
DEFAULT_TIMEOUT = 120.0
_spent = contextvars.ContextVar("command_seconds", default=None)


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
        done = subprocess.run(argv, input=input, capture_output=True, text=True,
                              timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        _account(time.monotonic() - started)
        _log.error("command", argv=argv, timeout=timeout, outcome="killed after timeout")
        raise CommandTimedOut(argv, timeout) from None
    except FileNotFoundError:
        raise CommandFailed(argv, 127, f"{argv[0]}: not installed") from None
    seconds = time.monotonic() - started
    _account(seconds)
    fields = {"argv": argv, "rc": done.returncode, "ms": round(seconds * 1000, 1)}
    if done.stderr.strip():
        fields["stderr"] = done.stderr.strip()[-500:]
    if done.returncode in ok_codes or not check:
        _log.debug("command", **fields)
    else:
        _log.warning("command", **fields)
        raise CommandFailed(argv, done.returncode, done.stderr)
    return Result(argv, done.returncode, done.stdout, done.stderr, seconds)


def _account(seconds: float) -> None:
    box = _spent.get()
    if box is not None:
        box[0] += seconds


class accounting:
    """Context manager adding up the seconds spent in commands inside it (per thread/context)."""

    def __enter__(self):
        self._box = [0.0]
        self._token = _spent.set(self._box)
        return self

    def __exit__(self, *exc):
        _spent.reset(self._token)

    @property
    def seconds(self) -> float:
        return self._box[0]
