"""Which node ids exist, for ControllerPublishVolume (an unknown node is NOT_FOUND).

A controller learns node ids from one of two places:
- `KubernetesNodes`: the CSINode objects kubelet writes when the node plugin registers; a
  node exists when its CSINode lists this driver with that node id. Asked once per node id
  and then remembered for a minute, so a publish storm costs one API call per node.
- `StaticNodes`: a fixed list (`--nodes a,b,c`), and always the plugin's own node id when
  it serves the Node service too (`--role all`: the single-machine setup and the tests).
"""

import threading
import time

from . import log
from .errors import NotFound, Unavailable

_log = log.get("nodes")
REMEMBER_SECONDS = 60.0
API_TIMEOUT = (3, 10)  # seconds to connect, to read
KUBERNETES = "kubernetes"


class StaticNodes:
    def __init__(self, node_ids):
        self.node_ids = frozenset(node_ids)

    def check(self, node_id: str) -> None:
        if node_id not in self.node_ids:
            raise NotFound(f"node {node_id} is unknown to this controller (it knows "
                           f"{', '.join(sorted(self.node_ids)) or 'no node'}; list nodes with --nodes)")


class KubernetesNodes:
    def __init__(self, driver_name: str, storage_api=None):
        self.driver_name = driver_name
        self._api = storage_api
        self._seen: dict[str, float] = {}  # node id -> when its CSINode last confirmed it
        self._lock = threading.Lock()

    def _storage_api(self):
        if self._api is None:
            from kubernetes import client, config  # only needed inside a cluster

            config.load_incluster_config()
            self._api = client.StorageV1Api()
        return self._api

    def check(self, node_id: str) -> None:
        with self._lock:
            if time.monotonic() - self._seen.get(node_id, float("-inf")) < REMEMBER_SECONDS:
                return
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import HTTPError

        try:
            # polyvol's node id is the Kubernetes node name (the DaemonSet passes spec.nodeName).
            # Bounded: the client waits forever by default, and a publish waiting on a stalled
            # API server would keep its volume answering ABORTED.
            csinode = self._storage_api().read_csi_node(node_id, _request_timeout=API_TIMEOUT)
        except ApiException as error:
            if error.status == 404:
                raise NotFound(f"node {node_id} has no CSINode object: no polyvol node plugin "
                               f"registered there") from None
            raise Unavailable(f"cannot read CSINode {node_id} from the Kubernetes API: "
                              f"{error.status} {error.reason}") from None
        except (HTTPError, OSError) as error:
            raise Unavailable(f"cannot reach the Kubernetes API to read CSINode {node_id}: "
                              f"{error}") from None
        registered = {d.name: d.node_id for d in (csinode.spec.drivers or [])}
        if registered.get(self.driver_name) != node_id:
            raise NotFound(f"node {node_id} has no {self.driver_name} node plugin registered "
                           f"(its CSINode lists {', '.join(sorted(registered)) or 'no driver'})")
        with self._lock:
            self._seen[node_id] = time.monotonic()
