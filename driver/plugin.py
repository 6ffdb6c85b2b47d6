"""Assemble and serve the CSI plugin: backends, services, the gRPC server."""

import os
from concurrent import futures
from pathlib import Path

import grpc

from . import DRIVER_NAME, __version__, log, metrics
from .backends import Registry
from .attach.nbd import RECONNECT_DELAY, NbdAttacher
from .attach.rbd import RbdAttacher
from .backends.ceph import CephBackend, ClusterDirectory
from .backends.local import LocalBackend
from .backends.remote_disk import RemoteDiskBackend, ServerDirectory
from .discovery import KubernetesServerDirectory
from .controller import ControllerService
from .errors import InvalidArgument
from .identity import IdentityService
from .locks import OperationLocks
from .nodes import KUBERNETES, KubernetesNodes, StaticNodes
from .node import NodeService
from .proto import csi_pb2_grpc
from .signals import termination_event

_log = log.get("plugin")
ROLES = ("controller", "node", "all")


def socket_path(endpoint: str) -> str:
    if not endpoint.startswith("unix://"):
        raise InvalidArgument(f"endpoint {endpoint!r} must be unix:///path/to/csi.sock")
    return "/" + endpoint.removeprefix("unix://").lstrip("/")


def _server_directory(storage_servers: str, selector: str, namespace: str, port: int):
    if storage_servers and selector:
        raise InvalidArgument("give --storage-servers or --storage-server-selector, not both")
    if storage_servers:
        return ServerDirectory(storage_servers)
    if selector:
        return KubernetesServerDirectory(namespace, selector, port)
    return None


def _node_registry(nodes: str, driver_name: str, own_node_id: str, serves_node: bool):
    """--nodes: "kubernetes" (CSINode objects) or a comma-separated list of node ids; a
    plugin that is a node itself always knows its own id."""
    if nodes == KUBERNETES:
        return KubernetesNodes(driver_name)
    listed = [n.strip() for n in nodes.split(",") if n.strip()]
    return StaticNodes([*listed, *([own_node_id] if serves_node else [])])


def build_server(*, endpoint: str, node_id: str, state_dir: str, role: str, default_type: str,
                 publish_roots: list[str], max_volumes: int, local_reserve_bytes: int,
                 storage_servers: str = "", storage_server_selector: str = "",
                 storage_server_namespace: str = "", storage_server_port: int = 0,
                 storage_tls_dir: str = "", nbd_psk_file: str = "", nbd_psk_identity: str = "",
                 nbd_attach: str = "auto", nbd_reconnect_delay: int = RECONNECT_DELAY,
                 ceph_config: str = "", rbd_attach: str = "auto",
                 driver_name: str = DRIVER_NAME, types: list[str] | None = None,
                 nodes: str = "", workers: int = 16) -> grpc.Server:
    state = Path(state_dir)
    state.mkdir(parents=True, exist_ok=True)
    serves_node = role in ("node", "all")
    # Only the backends this plugin serves are built: each opens (and tidies) its own state,
    # which another plugin on the same node may own (one per CSI driver name).
    makers = {
        LocalBackend.types: lambda: LocalBackend(state_dir, node_id, local_reserve_bytes),
        RemoteDiskBackend.types: lambda: RemoteDiskBackend(
            _server_directory(storage_servers, storage_server_selector, storage_server_namespace,
                              storage_server_port),
            storage_tls_dir or None,
            attacher=(NbdAttacher(state_dir, mode=nbd_attach, reconnect_delay=nbd_reconnect_delay)
                      if serves_node else None),
            psk_identity=nbd_psk_identity, psk_file=nbd_psk_file),
        CephBackend.types: lambda: CephBackend(
            ClusterDirectory(ceph_config, state_dir),
            attacher=RbdAttacher(state_dir, mode=rbd_attach) if serves_node else None),
    }
    known = {t for served in makers for t in served}
    unknown = sorted(set(types or ()) - known)
    if unknown:
        raise InvalidArgument(f"--types: unknown type(s) {', '.join(unknown)}; known: "
                              f"{', '.join(sorted(known))}")
    backends = [make() for served, make in makers.items() if not types or set(served) & set(types)]
    registry = Registry(backends, default_type)
    locks = OperationLocks()

    def readiness():
        writable = os.access(state, os.W_OK)
        return writable, "" if writable else f"{state} is not writable"

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers))
    serves_controller = role in ("controller", "all")
    csi_pb2_grpc.add_IdentityServicer_to_server(IdentityService(driver_name, serves_controller, readiness), server)
    if serves_controller:
        csi_pb2_grpc.add_ControllerServicer_to_server(
            ControllerService(registry, locks, _node_registry(nodes, driver_name, node_id, serves_node)),
            server)
    if serves_node:
        csi_pb2_grpc.add_NodeServicer_to_server(
            NodeService(registry, locks, node_id, state_dir, publish_roots, max_volumes), server)
    path = socket_path(endpoint)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    if os.path.exists(path):
        os.unlink(path)  # a socket left by a previous run of this plugin
    server.add_insecure_port(f"unix://{path}")
    return server


def serve(*, metrics_address: str = "", **options) -> None:
    metrics.serve(metrics_address, options.get("driver_name", DRIVER_NAME))
    server = build_server(**options)
    server.start()
    _log.info("serving", driver=options.get("driver_name", DRIVER_NAME), version=__version__, endpoint=options["endpoint"],
              role=options["role"], node_id=options["node_id"], state_dir=options["state_dir"],
              classes=options["default_type"])
    termination_event().wait()
    server.stop(grace=10).wait()
