"""The plugin's /metrics (`--metrics-address`): every CSI call counted by method and code,
with its latency and the part spent outside the plugin. The storage server's metrics are
tested in test_storage_server.py."""

import grpc
import pytest

from conftest import Plugin, clean_up_below
from driver.proto import csi_pb2
from test_storage_server import free_port, scrape

pytestmark = pytest.mark.root


def test_plugin_metrics_count_calls_by_method_and_code(workdir):
    port = free_port()
    plugin = Plugin(workdir, extra_args=["--metrics-address", f"127.0.0.1:{port}",
                                         "--driver-name", "local.polyvol.csi.io"])
    plugin.start()
    try:
        volume = plugin.create("metrics-1")
        plugin.create("metrics-1")  # an idempotent retry is a call too
        with pytest.raises(grpc.RpcError):
            plugin.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=""))
        plugin.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=volume.volume_id))
        samples = scrape(port)
    finally:
        plugin.stop()
        clean_up_below(workdir)
    labels = 'driver="local.polyvol.csi.io"'
    assert samples[f'polyvol_rpc_total{{code="OK",{labels},method="CreateVolume"}}'] == 2
    assert samples[f'polyvol_rpc_total{{code="INVALID_ARGUMENT",{labels},method="DeleteVolume"}}'] == 1
    assert samples[f'polyvol_rpc_total{{code="OK",{labels},method="DeleteVolume"}}'] == 1
    assert samples[f'polyvol_rpc_seconds_count{{{labels},method="CreateVolume"}}'] == 2
    assert 0 < samples[f'polyvol_rpc_seconds_sum{{{labels},method="CreateVolume"}}'] < 60
    external = samples[f'polyvol_rpc_external_seconds_total{{{labels},method="CreateVolume"}}']
    assert 0 <= external <= samples[f'polyvol_rpc_seconds_sum{{{labels},method="CreateVolume"}}']


def test_a_bad_metrics_address_is_refused_at_start(workdir):
    plugin = Plugin(workdir, extra_args=["--metrics-address", "nowhere"])
    with pytest.raises(RuntimeError, match="HOST:PORT"):
        plugin.start()
    plugin.stop()
