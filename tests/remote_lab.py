"""A remote-disk cluster on one machine: storage servers and a worker node, each a host of
tests/netlab.py (its own network namespace and address), with real mutual TLS for the
control API and TLS-PSK for the NBD data plane.

    with RemoteCluster(workdir, servers=3) as cluster:
        plugin = Plugin(workdir, extra_args=cluster.plugin_args, argv_prefix=cluster.node_prefix)
        ...
        cluster.stop_server("srv2"); cluster.start_server("srv2")
        cluster.start_server("srv2", nbd_port=10810)  # its data plane moved: nodes must follow

    with RemoteCluster(workdir, servers=1, extra_nodes=["nodeb"]) as cluster:
        other = Plugin(workdir / "nodeb", extra_args=[*cluster.plugin_args, "--role", "node"],
                       node_id="node-b", argv_prefix=cluster.prefix("nodeb"))

The CSI plugin (controller + node) runs in the "node" namespace (network namespace only:
its mounts and loop devices are the machine's, as on a real node), so every connection to
a storage server comes from inside a namespace. Tests talk to the plugin over its unix
socket, which is a file, not a network address. `extra_nodes` are more worker-node namespaces,
for tests with a second node plugin (a volume moving from one node to another).
"""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import REPO
from netlab import NetLab

CONTROL_PORT = 9740
NBD_PORT = 10809
PSK_IDENTITY = "node"
READY_TIMEOUT = 30.0


def polyvol(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "driver.cli", *args], cwd=REPO, check=True,
                   capture_output=True, text=True, timeout=60)


class RemoteCluster:
    def __init__(self, workdir: Path, servers: int = 3, reconnect_grace: int = 0,
                 insecure_nbd=(), extra_nodes=()):
        self.workdir = Path(workdir)
        # Servers (by name) started with --insecure-nbd: NBD without TLS, the explicit opt-out
        # for a trusted storage network. Their volume context says nbd-tls=false, and the
        # node attaches them in plaintext.
        self.insecure_nbd = set(insecure_nbd)
        # After a (re)start a server refuses deletes and plain copies for this long, since a
        # node may still be reconnecting to a volume; fresh test servers have no such nodes.
        self.reconnect_grace = reconnect_grace
        self.names = [f"srv{i}" for i in range(1, servers + 1)]
        if not self.insecure_nbd <= set(self.names):
            raise ValueError(f"insecure_nbd names unknown servers: {sorted(self.insecure_nbd)}")
        self.extra_nodes = list(extra_nodes)
        # Extra nodes come last, so the servers keep their addresses whatever is added.
        self.lab = NetLab(["node", *self.names, *self.extra_nodes])
        self.tls_dir = self.workdir / "tls"
        self.psk_file = self.workdir / "nbd.psk"
        self.servers_file = self.workdir / "storage-servers.json"
        self.processes: dict[str, subprocess.Popen] = {}

    def __enter__(self):
        try:
            self.lab.start()
            polyvol("storage", "certs", "--dir", str(self.tls_dir))
            polyvol("storage", "psk", "--identity", PSK_IDENTITY, "--out", str(self.psk_file))
            self.servers_file.write_text(json.dumps({"servers": [
                {"name": name, "address": f"{self.lab.address(name)}:{CONTROL_PORT}"}
                for name in self.names]}))
            for name in self.names:
                self.start_server(name)
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc):
        self.close()

    def data_dir(self, name: str) -> Path:
        return self.workdir / "servers" / name

    def log_path(self, name: str) -> Path:
        return self.workdir / f"{name}.log"

    def nbd_address(self, name: str, nbd_port: int = NBD_PORT) -> str:
        return f"{self.lab.address(name)}:{nbd_port}"

    def start_server(self, name: str, nbd_port: int = NBD_PORT) -> None:
        """Start (or restart) a server; another `nbd_port` is a server whose NBD address
        changed since its volumes were created (as a rescheduled pod's IP does)."""
        address = self.lab.address(name)
        rack = f"rack{self.names.index(name) + 1}"
        log = open(self.log_path(name), "a")
        self.processes[name] = self.lab.popen(name, [
            sys.executable, "-m", "driver.cli", "storage-server", "--name", name,
            "--data-dir", str(self.data_dir(name)), "--listen", f"{address}:{CONTROL_PORT}",
            "--nbd-listen", self.nbd_address(name, nbd_port), "--tls-dir", str(self.tls_dir),
            "--nbd-psk-file", str(self.psk_file), "--label", f"rack={rack}",
            "--reconnect-grace", str(self.reconnect_grace),
            *(["--insecure-nbd"] if name in self.insecure_nbd else [])],
            stdout=log, stderr=log, cwd=REPO)
        self._wait_ready(name)

    def _wait_ready(self, name: str) -> None:
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            if self.processes[name].poll() is not None:
                break
            text = self.log_path(name).read_text()
            if '"serving"' in text.rsplit('"stopping"', 1)[-1] and '"nbdkit ready"' in text.rsplit(
                    '"stopping"', 1)[-1]:
                return
            time.sleep(0.1)
        raise RuntimeError(f"storage server {name} did not start:\n"
                           f"{self.log_path(name).read_text()[-3000:]}")

    def stop_server(self, name: str, sig: int = signal.SIGTERM) -> None:
        process = self.processes.pop(name, None)
        if process is not None:
            self.lab.stop(process, sig=sig)

    def close(self) -> None:
        for name in list(self.processes):
            self.stop_server(name)
        self.lab.close()

    @property
    def node_prefix(self) -> list[str]:
        return self.lab.prefix("node")

    def prefix(self, node: str) -> list[str]:
        """The argv prefix that runs a command in a worker node's namespace ("node" or one of
        `extra_nodes`)."""
        if node != "node" and node not in self.extra_nodes:
            raise KeyError(f"no worker node {node!r} in this cluster")
        return self.lab.prefix(node)

    @property
    def plugin_args(self) -> list[str]:
        return ["--storage-servers", str(self.servers_file), "--storage-tls-dir", str(self.tls_dir),
                "--nbd-psk-file", str(self.psk_file), "--nbd-psk-identity", PSK_IDENTITY,
                "--nbd-attach", "userspace"]
