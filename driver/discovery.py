"""Finding storage servers in a Kubernetes cluster.

The storage-server DaemonSet runs one server per storage node, named after its node
(`server_name_for_node`). The controller lists those pods through the Kubernetes API
(label selector, ready pods only) and talks to each at podIP:port. Outside a cluster, the
JSON file of backends.remote_disk.ServerDirectory does the same job.
"""

import re
import threading
import time

from . import log
from .backends.remote_disk import SERVER_NAME, ServerEntry

_log = log.get("discovery")
REFRESH_SECONDS = 15.0


def server_name_for_node(node_name: str) -> str:
    """A DNS label for a node name (which may be a dotted DNS subdomain)."""
    name = re.sub(r"[^a-z0-9-]+", "-", node_name.lower()).strip("-")[:63].strip("-")
    if not SERVER_NAME.fullmatch(name):
        raise ValueError(f"cannot make a storage server name from node name {node_name!r}")
    return name


class KubernetesServerDirectory:
    """Storage servers = ready pods matching `selector` in `namespace`; cached for a few seconds."""

    def __init__(self, namespace: str, selector: str, port: int, core_api=None):
        self.namespace = namespace
        self.selector = selector
        self.port = port
        self.path = f"pods {selector} in namespace {namespace}"  # named in error messages
        self._api = core_api
        self._cached: dict[str, ServerEntry] = {}
        self._fetched_at = float("-inf")
        self._lock = threading.Lock()

    def _core_api(self):
        if self._api is None:
            from kubernetes import client, config  # only needed inside a cluster

            config.load_incluster_config()
            self._api = client.CoreV1Api()
        return self._api

    def servers(self) -> dict[str, ServerEntry]:
        with self._lock:
            if time.monotonic() - self._fetched_at > REFRESH_SECONDS:
                self._cached = self._list()
                self._fetched_at = time.monotonic()
            return dict(self._cached)

    def _list(self) -> dict[str, ServerEntry]:
        pods = self._core_api().list_namespaced_pod(self.namespace, label_selector=self.selector)
        found = {}
        for pod in pods.items:
            ready = any(c.type == "Ready" and c.status == "True"
                        for c in (pod.status.conditions or []))
            if not ready or not pod.status.pod_ip or not pod.spec.node_name:
                continue
            name = server_name_for_node(pod.spec.node_name)
            host = f"[{pod.status.pod_ip}]" if ":" in pod.status.pod_ip else pod.status.pod_ip
            found[name] = ServerEntry(name, f"{host}:{self.port}")
        _log.debug("storage servers discovered", servers=sorted(found))
        return found
