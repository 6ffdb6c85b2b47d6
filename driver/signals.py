"""Shutdown on SIGTERM/SIGINT, shared by the long-running commands (plugin, storage server)."""

import signal
import threading

from . import log

_log = log.get("signals")


def termination_event() -> threading.Event:
    """An event set (and logged) when the process is asked to stop; wait on it, then stop."""
    stopping = threading.Event()

    def stop(signum, frame):
        _log.info("stopping", signal=signal.Signals(signum).name)
        stopping.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    return stopping
