"""CSI Controller service: validates requests, picks the backend, shapes the answers."""

import contextlib

from google.protobuf import timestamp_pb2, wrappers_pb2

from . import fs
from .backends import Registry
from .backends.base import CreateRequest, Volume, choose_size
from .errors import Aborted, InvalidArgument, NotFound, Unavailable
from .locks import OperationLocks
from .parameters import APP_REPLICAS, CTX_COPIES, CTX_READONLY, CTX_TYPE, FS_TYPE, TYPE
from .proto import csi_pb2, csi_pb2_grpc
from .rpc import (check_capabilities, check_capability, content_source, is_block, is_readonly_mode,
                  method, page, require)

Cap = csi_pb2.ControllerServiceCapability.RPC.Type
CAPABILITIES = (
    Cap.CREATE_DELETE_VOLUME, Cap.LIST_VOLUMES, Cap.GET_CAPACITY, Cap.CREATE_DELETE_SNAPSHOT,
    Cap.LIST_SNAPSHOTS, Cap.CLONE_VOLUME, Cap.EXPAND_VOLUME, Cap.VOLUME_CONDITION,
    Cap.GET_VOLUME, Cap.SINGLE_NODE_MULTI_WRITER, Cap.GET_SNAPSHOT,
)
# Advertised when a served backend publishes (network classes): then Kubernetes attaches
# each volume to one node through ControllerPublish before the node stages it.
PUBLISH_CAPABILITIES = (Cap.PUBLISH_UNPUBLISH_VOLUME, Cap.PUBLISH_READONLY,
                        Cap.LIST_VOLUMES_PUBLISHED_NODES)
BLOCK_MIN_BYTES = 1 << 20


class ControllerService(csi_pb2_grpc.ControllerServicer):
    def __init__(self, registry: Registry, locks: OperationLocks, nodes):
        self.registry = registry
        self.locks = locks
        self.nodes = nodes  # nodes.StaticNodes or nodes.KubernetesNodes
        self.publishes = any(b.publishes for b in registry.backends)

    @method
    def CreateVolume(self, request, context):
        require(request.name, "name")
        check_capabilities(request.volume_capabilities)
        backend, class_type = self.registry.for_parameters(dict(request.parameters))
        parameters = backend.check_parameters({**request.parameters, TYPE: class_type})
        parameters[FS_TYPE] = _fs_type(request.volume_capabilities, parameters[FS_TYPE])
        block_only = all(is_block(c) for c in request.volume_capabilities)
        minimum = BLOCK_MIN_BYTES if block_only else fs.MIN_FS_BYTES[parameters[FS_TYPE]]
        size = choose_size(request.capacity_range.required_bytes,
                           request.capacity_range.limit_bytes, minimum)
        source_snapshot, source_volume = _content_source(request, backend, self.registry)
        create = CreateRequest(
            name=request.name, size_bytes=size, parameters=parameters,
            source_snapshot_id=source_snapshot, source_volume_id=source_volume,
            requisite_topology=[dict(t.segments) for t in request.accessibility_requirements.requisite],
            preferred_topology=[dict(t.segments) for t in request.accessibility_requirements.preferred],
            mutable_parameters=dict(request.mutable_parameters), secrets=dict(request.secrets))
        with self.locks.hold(f"name/{request.name}", "CreateVolume"), contextlib.ExitStack() as held:
            if source_snapshot or source_volume:
                # The copy reads the source: deleting it meanwhile must wait (ABORTED).
                held.enter_context(self.locks.hold(source_snapshot or source_volume, "CreateVolume"))
            volume = backend.create_volume(create)
        return csi_pb2.CreateVolumeResponse(volume=_volume_message(volume))

    @method
    def DeleteVolume(self, request, context):
        require(request.volume_id, "volume_id")
        try:
            backend = self.registry.for_id(request.volume_id)
        except NotFound:
            return csi_pb2.DeleteVolumeResponse()
        with self.locks.hold(request.volume_id, "DeleteVolume"):
            backend.delete_volume(request.volume_id)
        return csi_pb2.DeleteVolumeResponse()

    @method
    def ValidateVolumeCapabilities(self, request, context):
        require(request.volume_id, "volume_id")
        require(request.volume_capabilities, "volume_capabilities")
        volume = self.registry.for_id(request.volume_id).get_volume(request.volume_id)
        for index, capability in enumerate(request.volume_capabilities):
            if capability.WhichOneof("access_type") is None:
                raise InvalidArgument(f"volume_capabilities[{index}] needs an access_type")
            if capability.access_mode.mode == csi_pb2.VolumeCapability.AccessMode.UNKNOWN:
                raise InvalidArgument(f"volume_capabilities[{index}] needs an access_mode")
        try:
            check_capabilities(request.volume_capabilities)
            fs_wanted = _fs_type(request.volume_capabilities, volume.parameters.get(FS_TYPE, ""))
            if fs_wanted != volume.parameters.get(FS_TYPE):
                raise InvalidArgument(f"volume holds {volume.parameters.get(FS_TYPE)}, not {fs_wanted}")
        except InvalidArgument as unsupported:
            return csi_pb2.ValidateVolumeCapabilitiesResponse(message=str(unsupported))
        return csi_pb2.ValidateVolumeCapabilitiesResponse(
            confirmed=csi_pb2.ValidateVolumeCapabilitiesResponse.Confirmed(
                volume_context=request.volume_context,
                volume_capabilities=request.volume_capabilities,
                parameters=request.parameters,
                mutable_parameters=request.mutable_parameters))

    @method
    def ListVolumes(self, request, context):
        volumes = sorted((v for b in self.registry.backends for v in b.list_volumes()),
                         key=lambda v: v.volume_id)
        chosen, next_token = page(volumes, request.max_entries, request.starting_token, Aborted)
        entries = []
        for volume in chosen:
            condition = self.registry.for_id(volume.volume_id).condition(volume.volume_id)
            entries.append(csi_pb2.ListVolumesResponse.Entry(
                volume=_volume_message(volume),
                status=csi_pb2.ListVolumesResponse.VolumeStatus(
                    published_node_ids=_published_nodes(volume),
                    volume_condition=_condition_message(condition))))
        return csi_pb2.ListVolumesResponse(entries=entries, next_token=next_token)

    @method
    def GetCapacity(self, request, context):
        for index, capability in enumerate(request.volume_capabilities):
            check_capability(capability, f"volume_capabilities[{index}]")
        backend, class_type = self.registry.for_parameters(dict(request.parameters))
        parameters = backend.check_parameters({**request.parameters, TYPE: class_type})
        segment = dict(request.accessible_topology.segments) or None
        available = backend.capacity(parameters, segment)
        minimum = fs.MIN_FS_BYTES[parameters[FS_TYPE]]
        return csi_pb2.GetCapacityResponse(
            available_capacity=available,
            maximum_volume_size=wrappers_pb2.Int64Value(value=available),
            minimum_volume_size=wrappers_pb2.Int64Value(value=minimum))

    @method
    def ControllerGetCapabilities(self, request, context):
        return csi_pb2.ControllerGetCapabilitiesResponse(capabilities=[
            csi_pb2.ControllerServiceCapability(rpc=csi_pb2.ControllerServiceCapability.RPC(type=c))
            for c in CAPABILITIES + (PUBLISH_CAPABILITIES if self.publishes else ())])

    @method
    def ControllerPublishVolume(self, request, context):
        require(request.volume_id, "volume_id")
        require(request.node_id, "node_id")
        require(request.HasField("volume_capability"), "volume_capability")
        check_capability(request.volume_capability)
        backend = self.registry.for_id(request.volume_id)
        readonly = request.readonly or is_readonly_mode(request.volume_capability)
        self.nodes.check(request.node_id)  # outside the lock: it may ask the Kubernetes API
        with self.locks.hold(request.volume_id, "ControllerPublishVolume"):
            publish_context = backend.publish(request.volume_id, request.node_id, readonly)
        return csi_pb2.ControllerPublishVolumeResponse(
            publish_context={**publish_context, CTX_READONLY: "true" if readonly else "false"})

    @method
    def ControllerUnpublishVolume(self, request, context):
        require(request.volume_id, "volume_id")
        try:
            backend = self.registry.for_id(request.volume_id)
        except NotFound:
            return csi_pb2.ControllerUnpublishVolumeResponse()
        with self.locks.hold(request.volume_id, "ControllerUnpublishVolume"):
            backend.unpublish(request.volume_id, request.node_id)
        return csi_pb2.ControllerUnpublishVolumeResponse()

    @method
    def CreateSnapshot(self, request, context):
        require(request.source_volume_id, "source_volume_id")
        require(request.name, "name")
        backend = self.registry.for_id(request.source_volume_id)
        with self.locks.hold(f"snapshot-name/{request.name}", "CreateSnapshot"), \
                self.locks.hold(request.source_volume_id, "CreateSnapshot"):
            snapshot = backend.create_snapshot(request.source_volume_id, request.name,
                                               snapshot_parameters(request.parameters))
        return csi_pb2.CreateSnapshotResponse(snapshot=_snapshot_message(snapshot))

    @method
    def DeleteSnapshot(self, request, context):
        require(request.snapshot_id, "snapshot_id")
        try:
            backend = self.registry.for_id(request.snapshot_id, "snapshot")
        except NotFound:
            return csi_pb2.DeleteSnapshotResponse()
        with self.locks.hold(request.snapshot_id, "DeleteSnapshot"):
            backend.delete_snapshot(request.snapshot_id)
        return csi_pb2.DeleteSnapshotResponse()

    @method
    def ListSnapshots(self, request, context):
        snapshots = sorted((s for b in self.registry.backends for s in b.list_snapshots()),
                           key=lambda s: s.snapshot_id)
        if request.snapshot_id:
            snapshots = [s for s in snapshots if s.snapshot_id == request.snapshot_id]
        if request.source_volume_id:
            snapshots = [s for s in snapshots if s.source_volume_id == request.source_volume_id]
        chosen, next_token = page(snapshots, request.max_entries, request.starting_token, Aborted)
        return csi_pb2.ListSnapshotsResponse(
            entries=[csi_pb2.ListSnapshotsResponse.Entry(snapshot=_snapshot_message(s)) for s in chosen],
            next_token=next_token)

    @method
    def GetSnapshot(self, request, context):
        require(request.snapshot_id, "snapshot_id")
        backend = self.registry.for_id(request.snapshot_id, "snapshot")
        return csi_pb2.GetSnapshotResponse(
            snapshot=_snapshot_message(backend.get_snapshot(request.snapshot_id)))

    @method
    def ControllerExpandVolume(self, request, context):
        require(request.volume_id, "volume_id")
        require(request.HasField("capacity_range"), "capacity_range")
        if request.HasField("volume_capability"):
            check_capability(request.volume_capability)
        backend = self.registry.for_id(request.volume_id)
        with self.locks.hold(request.volume_id, "ControllerExpandVolume"):
            volume = backend.get_volume(request.volume_id)
            wanted = choose_size(request.capacity_range.required_bytes,
                                 request.capacity_range.limit_bytes, volume.size_bytes)
            size = backend.expand_volume(request.volume_id, wanted)
        return csi_pb2.ControllerExpandVolumeResponse(capacity_bytes=size,
                                                      node_expansion_required=True)

    @method
    def ControllerGetVolume(self, request, context):
        require(request.volume_id, "volume_id")
        backend = self.registry.for_id(request.volume_id)
        Status = csi_pb2.ControllerGetVolumeResponse.VolumeStatus
        try:
            volume = backend.get_volume(request.volume_id)
        except Unavailable as unreachable:
            # The volume's storage cannot be asked about it: that is exactly what the
            # condition is for (Kubernetes shows it as an abnormal volume event).
            return csi_pb2.ControllerGetVolumeResponse(
                volume=csi_pb2.Volume(volume_id=request.volume_id),
                status=Status(volume_condition=csi_pb2.VolumeCondition(
                    abnormal=True, message=str(unreachable))))
        return csi_pb2.ControllerGetVolumeResponse(
            volume=_volume_message(volume),
            status=Status(published_node_ids=_published_nodes(volume),
                          volume_condition=_condition_message(backend.condition(request.volume_id))))


def _fs_type(capabilities, class_fs: str) -> str:
    """The filesystem to make: the capability's fs_type (what Kubernetes sends from the
    StorageClass's csi.storage.k8s.io/fstype) wins over the class's fsType parameter."""
    asked = {c.mount.fs_type for c in capabilities if c.WhichOneof("access_type") == "mount"
             and c.mount.fs_type}
    if len(asked) > 1:
        raise InvalidArgument(f"volume_capabilities ask for different filesystems: {sorted(asked)}")
    return asked.pop() if asked else class_fs


def snapshot_parameters(parameters) -> dict:
    """VolumeSnapshotClass parameters without the keys the external-snapshotter adds with
    --extra-create-metadata (the snapshot's name and namespace): those describe, not configure."""
    return {k: v for k, v in parameters.items() if not k.startswith("csi.storage.k8s.io/")}


def _content_source(request, backend, registry: Registry) -> tuple[str, str]:
    source = request.volume_content_source
    kind = source.WhichOneof("type")
    if kind is None:
        return "", ""
    source_id = source.snapshot.snapshot_id if kind == "snapshot" else source.volume.volume_id
    require(source_id, f"volume_content_source.{kind} id")
    if registry.for_id(source_id, kind) is not backend:
        raise InvalidArgument(f"{kind} {source_id} belongs to another storage class type; "
                              f"copy between types is not supported")
    return (source_id, "") if kind == "snapshot" else ("", source_id)


def _volume_message(volume: Volume) -> csi_pb2.Volume:
    context = {CTX_TYPE: volume.storage_class_type, CTX_COPIES: f"{volume.copies:g}",
               FS_TYPE: volume.parameters.get(FS_TYPE, ""), **volume.context}
    if APP_REPLICAS in volume.parameters:
        context[APP_REPLICAS] = volume.parameters[APP_REPLICAS]
    return csi_pb2.Volume(
        volume_id=volume.volume_id, capacity_bytes=volume.size_bytes, volume_context=context,
        content_source=content_source(volume.source_snapshot_id, volume.source_volume_id),
        accessible_topology=[csi_pb2.Topology(segments=s) for s in volume.topology])


def _snapshot_message(snapshot) -> csi_pb2.Snapshot:
    created = timestamp_pb2.Timestamp()
    created.FromNanoseconds(int(snapshot.created_at * 1e9))
    return csi_pb2.Snapshot(size_bytes=snapshot.size_bytes, snapshot_id=snapshot.snapshot_id,
                            source_volume_id=snapshot.source_volume_id, creation_time=created,
                            ready_to_use=snapshot.ready)


def _published_nodes(volume: Volume) -> list[str]:
    return [volume.publication.node_id] if volume.publication else []


def _condition_message(condition) -> csi_pb2.VolumeCondition:
    return csi_pb2.VolumeCondition(abnormal=condition.abnormal, message=condition.message)
