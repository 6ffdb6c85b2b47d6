"""Assemble and serve the CSI plugin: backends, services, the gRPC server."""

import os
import signal
import threading
from concurrent import futures
from pathlib import Path

import grpc

from . import DRIVER_NAME, __version__, log
from .backends import Registry
from .backends.local import LocalBackend
from .controller import ControllerService
from .errors import InvalidArgument
from .identity import IdentityService
from .locks import OperationLocks
from .node import NodeService
from .proto import csi_pb2_grpc

_log = log.get("plugin")
ROLES = ("controller", "node", "all")


def socket_path(endpoint: str) -> str:
    if not endpoint.startswith("unix://"):
        raise InvalidArgument(f"endpoint {endpoint!r} must be unix:///path/to/csi.sock")
    return "/" + endpoint.removeprefix("unix://").lstrip("/")


def build_server(*, endpoint: str, node_id: str, state_dir: str, role: str, default_type: str,
                 publish_roots: list[str], max_volumes: int, local_reserve_bytes: int,
                 workers: int = 16) -> grpc.Server:
    state = Path(state_dir)
    state.mkdir(parents=True, exist_ok=True)
    registry = Registry([LocalBackend(state_dir, node_id, local_reserve_bytes)], default_type)
    locks = OperationLocks()

    def readiness():
        writable = os.access(state, os.W_OK)
        return writable, "" if writable else f"{state} is not writable"

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers))
    serves_controller = role in ("controller", "all")
    csi_pb2_grpc.add_IdentityServicer_to_server(IdentityService(serves_controller, readiness), server)
    if serves_controller:
        csi_pb2_grpc.add_ControllerServicer_to_server(ControllerService(registry, locks), server)
    if role in ("node", "all"):
        csi_pb2_grpc.add_NodeServicer_to_server(
            NodeService(registry, locks, node_id, state_dir, publish_roots, max_volumes), server)
    path = socket_path(endpoint)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    if os.path.exists(path):
        os.unlink(path)  # a socket left by a previous run of this plugin
    server.add_insecure_port(f"unix://{path}")
    return server


def serve(**options) -> None:
    server = build_server(**options)
    server.start()
    _log.info("serving", driver=DRIVER_NAME, version=__version__, endpoint=options["endpoint"],
              role=options["role"], node_id=options["node_id"], state_dir=options["state_dir"],
              classes=options["default_type"])
    stopping = threading.Event()

    def stop(signum, frame):
        _log.info("stopping", signal=signal.Signals(signum).name)
        stopping.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    stopping.wait()
    server.stop(grace=10).wait()
