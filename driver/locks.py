"""Per-volume operation locks: a second operation on a busy volume gets ABORTED at once.

CSI sidecars retry ABORTED with backoff, so failing fast is right; waiting would pile up
threads behind a slow operation. Each lock records its owner (the RPC) and start time so
the ABORTED message says what is running and for how long. A lock cannot be held forever:
it lives only as long as the RPC's thread, and every external command that thread runs
has a timeout (driver.command), so a hung tool ends in an error that releases the lock.
"""

import threading
import time
from contextlib import contextmanager

from .errors import Aborted


class OperationLocks:
    def __init__(self):
        self._guard = threading.Lock()
        self._held: dict[str, tuple[str, float]] = {}

    @contextmanager
    def hold(self, key: str, operation: str):
        with self._guard:
            if key in self._held:
                owner, since = self._held[key]
                raise Aborted(f"{owner} on {key} has been running for "
                              f"{time.monotonic() - since:.1f}s; retry when it finishes")
            self._held[key] = (operation, time.monotonic())
        try:
            yield
        finally:
            with self._guard:
                self._held.pop(key, None)

    def busy(self) -> dict[str, str]:
        with self._guard:
            return {key: owner for key, (owner, _) in self._held.items()}
