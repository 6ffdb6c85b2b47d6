"""Storage-server discovery from the Kubernetes API, against a fake CoreV1Api."""

from types import SimpleNamespace as NS

import pytest

from driver.discovery import KubernetesServerDirectory, server_name_for_node


def pod(node, ip, ready=True):
    return NS(spec=NS(node_name=node),
              status=NS(pod_ip=ip, conditions=[NS(type="Ready", status="True" if ready else "False")]))


class FakeCoreApi:
    def __init__(self, pods):
        self.pods = pods
        self.calls = []

    def list_namespaced_pod(self, namespace, label_selector):
        self.calls.append((namespace, label_selector))
        return NS(items=self.pods)


def test_ready_storage_server_pods_become_servers_named_after_their_nodes():
    api = FakeCoreApi([pod("ip-10-0-0-1.ec2.internal", "10.1.0.7"), pod("Store-2", "fd00::5"),
                       pod("store-3", "10.1.0.9", ready=False), pod("store-4", None)])
    directory = KubernetesServerDirectory("polyvol", "app=polyvol-storage", 9740, core_api=api)
    servers = directory.servers()
    assert sorted(servers) == ["ip-10-0-0-1-ec2-internal", "store-2"]
    assert servers["ip-10-0-0-1-ec2-internal"].address == "10.1.0.7:9740"
    assert servers["store-2"].address == "[fd00::5]:9740"
    assert api.calls == [("polyvol", "app=polyvol-storage")]
    directory.servers()
    assert len(api.calls) == 1, "a second look within the refresh interval must use the cache"


@pytest.mark.parametrize("node", ["", "---", "..."])
def test_node_names_that_cannot_become_server_names_are_refused(node):
    with pytest.raises(ValueError):
        server_name_for_node(node)
