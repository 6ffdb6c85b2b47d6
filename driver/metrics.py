"""Prometheus metrics of the plugin and the storage server (`--metrics-address HOST:PORT`).

One registry per process, served at /metrics by prometheus_client's own HTTP server (a
daemon thread); nothing is served unless an address is given. What is exported:

    polyvol_rpc_total{driver, method, code}          CSI calls answered
    polyvol_rpc_seconds{driver, method}              their latency (histogram)
    polyvol_rpc_external_seconds_total{driver, method}  the part spent in external commands
                                                     and waiting in the kernel (driver.command)
    polyvol_storage_*                                the storage server's capacity, volumes
                                                     and nbdkit restarts (storage/server.py)

Labels are bounded: method and code names come from the CSI spec, never a volume id
(per-volume numbers are kubelet's kubelet_volume_stats_*, from NodeGetVolumeStats).
"""

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily

from .errors import InvalidArgument

REGISTRY = CollectorRegistry(auto_describe=True)
# From 1 ms (an idempotent retry) to 2 min (a clone copying a large file).
_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_driver = "polyvol"

RPC_TOTAL = Counter("polyvol_rpc", "CSI calls answered, by method and gRPC code",
                    ["driver", "method", "code"], registry=REGISTRY)
RPC_SECONDS = Histogram("polyvol_rpc_seconds", "CSI call latency in the plugin",
                        ["driver", "method"], buckets=_BUCKETS, registry=REGISTRY)
RPC_EXTERNAL_SECONDS = Counter("polyvol_rpc_external_seconds",
                               "Seconds CSI calls spent in external commands and in-kernel waits",
                               ["driver", "method"], registry=REGISTRY)


def observe_rpc(method: str, code: str, seconds: float, external_seconds: float) -> None:
    RPC_TOTAL.labels(_driver, method, code).inc()
    RPC_SECONDS.labels(_driver, method).observe(seconds)
    RPC_EXTERNAL_SECONDS.labels(_driver, method).inc(external_seconds)


class _Gauges:
    """A collector whose samples come from a function called at scrape time, so the numbers
    are read from the source of truth (the attach records, the store) and never drift."""

    def __init__(self, name: str, documentation: str, labels: list[str], read):
        self.name, self.documentation, self.labels, self.read = name, documentation, labels, read

    def describe(self):
        return [GaugeMetricFamily(self.name, self.documentation, labels=self.labels)]

    def collect(self):
        family = GaugeMetricFamily(self.name, self.documentation, labels=self.labels)
        for label_values, value in self.read():
            family.add_metric(list(label_values), value)
        yield family


def register_gauges(name: str, documentation: str, labels: list[str], read) -> None:
    """`read()` yields (label values, number) pairs; it runs at every scrape."""
    REGISTRY.register(_Gauges(name, documentation, labels, read))


def serve(address: str, driver_name: str) -> None:
    """Serve /metrics on HOST:PORT ("" serves nothing)."""
    global _driver
    _driver = driver_name
    if not address:
        return
    host, separator, port = address.rpartition(":")
    if not separator or not port.isdigit() or not 0 < int(port) < 65536:
        raise InvalidArgument(f"--metrics-address {address!r} must be HOST:PORT, e.g. 0.0.0.0:9760")
    start_http_server(int(port), addr=host.strip("[]") or "0.0.0.0", registry=REGISTRY)
