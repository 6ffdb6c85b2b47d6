"""What every CSI method shares: error mapping, the per-RPC log line, request checks."""

import contextlib
import contextvars
import functools
import logging
import os
import time

import grpc

from . import command, log, metrics
from .errors import InvalidArgument, PolyvolError, status_of
from .fs import SUPPORTED_FS
from .proto import csi_pb2

_log = log.get("rpc")
# The CSI secrets of the request being served (never logged). Backends that authenticate to
# their storage with them (Ceph: cephx userID/userKey) read them here, so the Backend
# interface does not have to carry them through every call.
_request_secrets: contextvars.ContextVar[dict] = contextvars.ContextVar("request_secrets", default={})


def request_secrets() -> dict:
    """The secrets of the CSI request this thread is serving ({} outside one, or none sent)."""
    return dict(_request_secrets.get())


@contextlib.contextmanager
def secrets_of_request(secrets: dict):
    """Serve the block as a request carrying `secrets` (for callers outside a CSI method)."""
    token = _request_secrets.set(dict(secrets))
    try:
        yield
    finally:
        _request_secrets.reset(token)


AccessMode = csi_pb2.VolumeCapability.AccessMode.Mode
SINGLE_NODE_MODES = frozenset({
    AccessMode.SINGLE_NODE_WRITER, AccessMode.SINGLE_NODE_READER_ONLY,
    AccessMode.SINGLE_NODE_SINGLE_WRITER, AccessMode.SINGLE_NODE_MULTI_WRITER,
})
# A block device with one filesystem on it can be shared by readers on many nodes, but a
# writer needs the device to itself; polyvol offers the single-node modes everywhere and
# MULTI_NODE_READER_ONLY nowhere yet (no class keeps readers coherent across nodes).
SUPPORTED_MODES = SINGLE_NODE_MODES


def _subject(request) -> str:
    for field in ("volume_id", "source_volume_id", "snapshot_id", "name"):
        value = getattr(request, field, "")
        if isinstance(value, str) and value:
            return value
    return ""


def _detailed() -> bool:
    return logging.getLogger(f"{log.LOGGER_NAME}.rpc").isEnabledFor(logging.DEBUG)


def method(fn):
    """Wrap a servicer method: typed errors become gRPC statuses, unknown ones INTERNAL with a
    logged traceback, and every call leaves one log line: method, volume, code, `ms` (the
    whole call), `command_ms` (inside external commands) and `kernel_ms` (waiting in the
    kernel on the volume's work done in-process: loop ioctls, creating or unlinking its data file;
    see driver/command.py). ms - command_ms - kernel_ms is the plugin's own time. At debug
    level also `cpu_ms` and `runq_ms`: the serving thread's time on a CPU and runnable but
    waiting for one (the benchmark's split of own time under many workers)."""
    name = fn.__name__

    @functools.wraps(fn)
    def wrapper(self, request, context):
        started = time.monotonic()
        code, message, response = grpc.StatusCode.OK, "", None
        secrets_token = _request_secrets.set(dict(getattr(request, "secrets", None) or {}))
        with command.accounting(scheduling=_detailed()) as spent:
            try:
                response = fn(self, request, context)
            except PolyvolError as error:
                code, message = status_of(error), str(error)
            except Exception as error:  # noqa: BLE001 - the one place unknown errors are caught
                code, message = grpc.StatusCode.INTERNAL, f"internal error: {error}"
                _log.error("unexpected error", method=name, exc_info=True)
            finally:
                _request_secrets.reset(secrets_token)
        elapsed = time.monotonic() - started
        metrics.observe_rpc(name, code.name, elapsed, spent.seconds + spent.kernel_seconds)
        fields = {"method": name, "volume": _subject(request), "code": code.name,
                  "ms": round(elapsed * 1000, 1),
                  "command_ms": round(spent.seconds * 1000, 1),
                  "kernel_ms": round(spent.kernel_seconds * 1000, 2)}
        if spent.cpu_seconds is not None:
            fields["cpu_ms"] = round(spent.cpu_seconds * 1000, 1)
            fields["runq_ms"] = round(spent.runq_seconds * 1000, 1)
        if message:
            fields["message"] = message
        _log.info("rpc", **fields)
        if code is not grpc.StatusCode.OK:
            context.abort(code, message)
        return response

    return wrapper


def require(value, field: str) -> None:
    if not value:
        raise InvalidArgument(f"{field} is required")


def check_capability(capability, where: str = "volume_capability") -> None:
    """Raise InvalidArgument unless the capability is complete and one polyvol supports."""
    kind = capability.WhichOneof("access_type")
    if kind is None:
        raise InvalidArgument(f"{where} needs an access_type: mount or block")
    if capability.access_mode.mode == AccessMode.UNKNOWN:
        raise InvalidArgument(f"{where} needs an access_mode")
    if capability.access_mode.mode not in SUPPORTED_MODES:
        raise InvalidArgument(
            f"{where}: access mode {AccessMode.Name(capability.access_mode.mode)} is not supported; "
            f"polyvol volumes are attached to one node at a time (use a SINGLE_NODE_* mode)")
    if kind == "mount" and capability.mount.fs_type and capability.mount.fs_type not in SUPPORTED_FS:
        raise InvalidArgument(f"{where}: fs_type {capability.mount.fs_type!r} is not supported; "
                              f"use one of {', '.join(SUPPORTED_FS)}")


def check_capabilities(capabilities) -> None:
    require(capabilities, "volume_capabilities")
    for index, capability in enumerate(capabilities):
        check_capability(capability, f"volume_capabilities[{index}]")


def is_block(capability) -> bool:
    return capability.WhichOneof("access_type") == "block"


def is_readonly_mode(capability) -> bool:
    return capability.access_mode.mode == AccessMode.SINGLE_NODE_READER_ONLY


def page(items: list, max_entries: int, starting_token: str, aborted_error):
    """One page of `items` (already in a stable order) and the token for the next one."""
    if max_entries < 0:
        raise InvalidArgument("max_entries cannot be negative")
    start = 0
    if starting_token:
        # isascii: str.isdigit() also accepts "²", which int() refuses (INTERNAL, not ABORTED).
        if not (starting_token.isascii() and starting_token.isdigit()) \
                or int(starting_token) > len(items):
            raise aborted_error(f"starting_token {starting_token!r} is not valid (any more); "
                                f"list again from the start")
        start = int(starting_token)
    end = len(items) if max_entries == 0 else min(len(items), start + max_entries)
    return items[start:end], (str(end) if end < len(items) else "")


def check_host_path(path: str, field: str, allowed_roots: list[str]) -> str:
    """A path from the CO must be absolute, normalised, free of symlink escapes and below one
    of the directories this plugin may touch (the kubelet's, by default)."""
    require(path, field)
    if "\0" in path or not os.path.isabs(path):
        raise InvalidArgument(f"{field} must be an absolute path, not {path!r}")
    normal = os.path.normpath(path)
    if normal != path.rstrip("/") or "/../" in f"{path}/":
        raise InvalidArgument(f"{field} {path!r} is not a normalised path")
    if os.path.islink(normal):
        raise InvalidArgument(f"{field} {path!r} is a symbolic link; give the real path")
    resolved_parent = os.path.realpath(os.path.dirname(normal))
    for root in allowed_roots:
        root = os.path.realpath(root)
        if os.path.commonpath([resolved_parent, root]) == root and normal != root:
            return normal
    raise InvalidArgument(f"{field} {path!r} is outside the directories this plugin may use "
                          f"({', '.join(allowed_roots)}); see --publish-root")


def content_source(snapshot_id: str = "", volume_id: str = ""):
    """A VolumeContentSource naming a snapshot or a volume, or None for neither."""
    Source = csi_pb2.VolumeContentSource
    if snapshot_id:
        return Source(snapshot=Source.SnapshotSource(snapshot_id=snapshot_id))
    if volume_id:
        return Source(volume=Source.VolumeSource(volume_id=volume_id))
    return None
