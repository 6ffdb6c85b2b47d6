"""The controller's client for one storage server's control API (mutual TLS).

Every method returns the reply's proto message (lists for the List calls) and raises
driver.errors typed errors, so a storage server's NOT_FOUND or FAILED_PRECONDITION reaches
the CSI caller with its code and message. A server that cannot be reached (UNAVAILABLE,
DEADLINE_EXCEEDED) raises errors.Unavailable naming its address: the controller can tell
"this server is down" from "this request is wrong". A server too old for a call (UNIMPLEMENTED)
raises FailedPrecondition saying to upgrade it.
"""

from pathlib import Path

import grpc

from ..errors import FailedPrecondition, Unavailable, error_for_status
from ..proto import storage_pb2, storage_pb2_grpc
from . import tls


class StorageClient:
    def __init__(self, address: str, tls_dir: str, timeout: float = 10.0):
        """`address` is HOST:PORT; `tls_dir` holds ca.crt, client.crt and client.key."""
        self.address = address
        self.timeout = timeout
        self._channel = grpc.secure_channel(address, tls.channel_credentials(Path(tls_dir)),
                                            options=tls.CHANNEL_OPTIONS)
        self._stub = storage_pb2_grpc.StorageServerStub(self._channel)

    def _call(self, name: str, request):
        try:
            return getattr(self._stub, name)(request, timeout=self.timeout)
        except grpc.RpcError as error:
            code, details = error.code(), error.details() or ""
            if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise Unavailable(f"storage server {self.address}: {name} failed "
                                  f"({code.name}): {details}") from None
            if code == grpc.StatusCode.UNIMPLEMENTED:
                # Not the CSI caller's fault and not fixed by retrying: the server predates
                # the call (e.g. PublishVolume, API version 2).
                raise FailedPrecondition(f"storage server {self.address} does not implement "
                                         f"{name}: upgrade polyvol on that server") from None
            raise error_for_status(code, details) from None

    def get_info(self) -> storage_pb2.ServerInfo:
        return self._call("GetInfo", storage_pb2.GetInfoRequest())

    def get_capacity(self) -> storage_pb2.GetCapacityResponse:
        return self._call("GetCapacity", storage_pb2.GetCapacityRequest())

    def create_volume(self, volume_id: str, name: str, size_bytes: int, parameters: dict,
                      source_snapshot_id: str = "", source_volume_id: str = "",
                      spread_group: str = "") -> storage_pb2.StoredVolume:
        return self._call("CreateVolume", storage_pb2.CreateVolumeRequest(
            volume_id=volume_id, name=name, size_bytes=size_bytes, parameters=parameters,
            source_snapshot_id=source_snapshot_id, source_volume_id=source_volume_id,
            spread_group=spread_group))

    def delete_volume(self, volume_id: str) -> storage_pb2.DeleteVolumeResponse:
        return self._call("DeleteVolume", storage_pb2.DeleteVolumeRequest(volume_id=volume_id))

    def get_volume(self, volume_id: str) -> storage_pb2.StoredVolume:
        return self._call("GetVolume", storage_pb2.GetVolumeRequest(volume_id=volume_id))

    def list_volumes(self, spread_group: str = "") -> list[storage_pb2.StoredVolume]:
        return list(self._call("ListVolumes",
                               storage_pb2.ListVolumesRequest(spread_group=spread_group)).volumes)

    def expand_volume(self, volume_id: str, size_bytes: int) -> storage_pb2.StoredVolume:
        return self._call("ExpandVolume",
                          storage_pb2.ExpandVolumeRequest(volume_id=volume_id, size_bytes=size_bytes))

    def create_snapshot(self, snapshot_id: str, name: str,
                        source_volume_id: str) -> storage_pb2.StoredSnapshot:
        return self._call("CreateSnapshot", storage_pb2.CreateSnapshotRequest(
            snapshot_id=snapshot_id, name=name, source_volume_id=source_volume_id))

    def delete_snapshot(self, snapshot_id: str) -> storage_pb2.DeleteSnapshotResponse:
        return self._call("DeleteSnapshot", storage_pb2.DeleteSnapshotRequest(snapshot_id=snapshot_id))

    def list_snapshots(self) -> list[storage_pb2.StoredSnapshot]:
        return list(self._call("ListSnapshots", storage_pb2.ListSnapshotsRequest()).snapshots)

    def publish_volume(self, volume_id: str, node_id: str,
                       readonly: bool) -> storage_pb2.StoredVolume:
        return self._call("PublishVolume", storage_pb2.PublishVolumeRequest(
            volume_id=volume_id, node_id=node_id, readonly=readonly))

    def unpublish_volume(self, volume_id: str, node_id: str) -> storage_pb2.UnpublishVolumeResponse:
        return self._call("UnpublishVolume",
                          storage_pb2.UnpublishVolumeRequest(volume_id=volume_id, node_id=node_id))

    def close(self) -> None:
        self._channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
