"""CSI Node service: attach through the backend, then the shared filesystem layer.

Stage    = backend.attach (a block device) + format on first use + mount at the staging path
Publish  = bind the staging mount (or, for raw block, the device) onto the target path
Each step checks what the kernel already has first, so repeats and retries are harmless,
and a restarted plugin picks up devices and mounts it made before.
"""

import contextlib
import os
from pathlib import Path

from . import fs, log
from .backends import Registry
from .backends.base import CreateRequest
from .backends.local import LocalBackend
from .errors import FailedPrecondition, InvalidArgument, NotFound
from .locks import OperationLocks
from .parameters import CTX_EPHEMERAL, CTX_READONLY, DEFAULT_FS, FS_TYPE, TOPOLOGY_NODE_KEY, TYPE
from .proto import csi_pb2, csi_pb2_grpc
from .rpc import AccessMode, check_capability, check_host_path, is_block, is_readonly_mode, method, require
from .units import parse_size

_log = log.get("node")
Cap = csi_pb2.NodeServiceCapability.RPC.Type
CAPABILITIES = (Cap.STAGE_UNSTAGE_VOLUME, Cap.GET_VOLUME_STATS, Cap.EXPAND_VOLUME,
                Cap.VOLUME_CONDITION, Cap.SINGLE_NODE_MULTI_WRITER)
EPHEMERAL_KEYS = {CTX_EPHEMERAL, "size", FS_TYPE, TYPE}
EPHEMERAL_DEFAULT_SIZE = "1Gi"


class NodeService(csi_pb2_grpc.NodeServicer):
    def __init__(self, registry: Registry, locks: OperationLocks, node_id: str, state_dir: str,
                 publish_roots: list[str], max_volumes: int):
        self.registry = registry
        self.locks = locks
        self.node_id = node_id
        self.publish_roots = publish_roots
        self.max_volumes = max_volumes
        self.ephemeral_dir = Path(state_dir) / "ephemeral"
        self.ephemeral_dir.mkdir(parents=True, exist_ok=True)

    @method
    def NodeStageVolume(self, request, context):
        require(request.volume_id, "volume_id")
        staging = check_host_path(request.staging_target_path, "staging_target_path", self.publish_roots)
        require(request.HasField("volume_capability"), "volume_capability")
        check_capability(request.volume_capability)
        backend = self.registry.for_id(request.volume_id)
        # What the controller said at publish (the storage's current address) wins over what
        # it said at create.
        attach_context = {**request.volume_context, **request.publish_context}
        with self.locks.hold(request.volume_id, "NodeStageVolume"):
            attached_before = backend.find_attachment(request.volume_id)
            attachment = backend.attach(request.volume_id, attach_context)
            try:
                if not is_block(request.volume_capability):
                    self._mount_filesystem(attachment.device, staging, request.volume_capability,
                                           dict(request.volume_context))
            except BaseException:
                # The kubelet does not unstage after a failed stage, and an attached volume
                # cannot be deleted: undo what this call did (never what an earlier one did).
                if attached_before is None:
                    with contextlib.suppress(Exception):
                        ours = fs.device_number(attachment.device)
                        if any(m.device == ours for m in fs.mounts_at(staging)):
                            fs.ensure_unmounted(staging)
                    with contextlib.suppress(Exception):
                        backend.detach(request.volume_id)
                raise
        _log.info("staged", volume_id=request.volume_id, device=attachment.device,
                  attach=attachment.method)
        return csi_pb2.NodeStageVolumeResponse()

    @staticmethod
    def _mount_filesystem(device: str, path: str, capability, volume_context: dict) -> None:
        fs_type = capability.mount.fs_type or volume_context.get(FS_TYPE) or DEFAULT_FS
        formatted = fs.ensure_formatted(device, fs_type)  # a new filesystem fills its device
        # The device may be larger than the filesystem: expanded while unstaged, or restored
        # from a smaller snapshot. Growing here makes that invisible to the pod; offline
        # while nothing has it mounted, since online ext4 growth needs CAP_SYS_RESOURCE.
        if not formatted and not fs.mounts_of_device(device):
            fs.grow_unmounted(device, fs_type)
        fs.ensure_mounted(device, path, fs_type, capability.mount.mount_flags)
        if fs_type == "xfs" and not formatted:  # XFS grows only while mounted
            fs.grow(device, path, fs_type)

    @method
    def NodeUnstageVolume(self, request, context):
        require(request.volume_id, "volume_id")
        staging = check_host_path(request.staging_target_path, "staging_target_path", self.publish_roots)
        with self.locks.hold(request.volume_id, "NodeUnstageVolume"):
            try:
                backend = self.registry.for_id(request.volume_id)
            except NotFound:
                fs.ensure_unmounted(staging)
                return csi_pb2.NodeUnstageVolumeResponse()
            # With its server dead, a remote volume's unmount would block for the whole
            # reconnect window; the backend first makes sure it cannot.
            backend.prepare_detach(request.volume_id)
            fs.ensure_unmounted(staging)
            backend.detach(request.volume_id)
        return csi_pb2.NodeUnstageVolumeResponse()

    @method
    def NodePublishVolume(self, request, context):
        require(request.volume_id, "volume_id")
        target = check_host_path(request.target_path, "target_path", self.publish_roots)
        require(request.HasField("volume_capability"), "volume_capability")
        check_capability(request.volume_capability)
        readonly = (request.readonly or is_readonly_mode(request.volume_capability)
                    or request.publish_context.get(CTX_READONLY) == "true")
        if request.volume_context.get(CTX_EPHEMERAL) == "true":
            with self.locks.hold(request.volume_id, "NodePublishVolume"):
                self._publish_ephemeral(request, target, readonly)
            return csi_pb2.NodePublishVolumeResponse()
        staging = check_host_path(request.staging_target_path, "staging_target_path", self.publish_roots)
        backend = self.registry.for_id(request.volume_id)
        flags = list(request.volume_capability.mount.mount_flags)
        with self.locks.hold(request.volume_id, "NodePublishVolume"):
            attachment = backend.find_attachment(request.volume_id)
            if attachment is None:
                raise FailedPrecondition(f"volume {request.volume_id} is not staged on node "
                                         f"{self.node_id}; call NodeStageVolume first")
            source = attachment.device if is_block(request.volume_capability) else staging
            if not is_block(request.volume_capability) and not fs.is_mounted(staging):
                raise FailedPrecondition(f"nothing is mounted at the staging path {staging}; "
                                         f"call NodeStageVolume first")
            if request.volume_capability.access_mode.mode == AccessMode.SINGLE_NODE_SINGLE_WRITER:
                elsewhere = [t for t in fs.bind_targets(source) if t not in (target, staging)]
                if elsewhere:
                    raise FailedPrecondition(
                        f"volume {request.volume_id} is SINGLE_NODE_SINGLE_WRITER and already "
                        f"published at {elsewhere[0]}; unpublish it there first")
            fs.ensure_bind(source, target, readonly, flags)
        return csi_pb2.NodePublishVolumeResponse()

    def _publish_ephemeral(self, request, target: str, readonly: bool) -> None:
        """A CSI inline volume: created here, lives as long as this publish, gone at unpublish."""
        if is_block(request.volume_capability):
            raise InvalidArgument("inline ephemeral volumes are filesystems; use a mount capability")
        attributes = dict(request.volume_context)
        unknown = sorted(k for k in attributes
                         if k not in EPHEMERAL_KEYS and not k.startswith("csi.storage.k8s.io/"))
        if unknown:
            raise InvalidArgument(f"unknown volumeAttributes {unknown} for an inline volume; "
                                  f"known: size, fsType, type")
        backend = self._local_backend()
        parameters = backend.check_parameters({
            FS_TYPE: request.volume_capability.mount.fs_type or attributes.get(FS_TYPE, DEFAULT_FS),
            CTX_EPHEMERAL: "true", TYPE: "local-ephemeral"})
        if attributes.get(TYPE, "local-ephemeral") != "local-ephemeral":
            raise InvalidArgument("inline ephemeral volumes are always of type local-ephemeral")
        size = parse_size(attributes.get("size", EPHEMERAL_DEFAULT_SIZE))
        volume = backend.create_volume(CreateRequest(
            name=request.volume_id, size_bytes=max(size, fs.MIN_FS_BYTES[parameters[FS_TYPE]]),
            parameters=parameters))
        mount_path = str(self.ephemeral_dir / volume.volume_id)
        try:
            device = backend.attach(volume.volume_id, {}).device
            self._mount_filesystem(device, mount_path, request.volume_capability, parameters)
            fs.ensure_bind(mount_path, target, readonly, request.volume_capability.mount.mount_flags)
        except BaseException:
            # Nobody unpublishes an inline volume whose publish failed: remove it again,
            # unless a pod already uses it (this call repeated a publish that had worked).
            in_use = fs.is_mounted(mount_path) and any(
                t != mount_path for t in fs.bind_targets(mount_path))
            if not in_use:
                with contextlib.suppress(Exception):
                    self._remove_if_ephemeral(request.volume_id)
            raise

    def _local_backend(self) -> LocalBackend:
        for backend in self.registry.backends:
            if isinstance(backend, LocalBackend):
                return backend
        raise FailedPrecondition("inline ephemeral volumes need the local-ephemeral class, "
                                 "which this plugin does not serve")

    @method
    def NodeUnpublishVolume(self, request, context):
        require(request.volume_id, "volume_id")
        target = check_host_path(request.target_path, "target_path", self.publish_roots)
        with self.locks.hold(request.volume_id, "NodeUnpublishVolume"):
            fs.ensure_unmounted(target)
            fs.ensure_path_absent(target)
            self._remove_if_ephemeral(request.volume_id)
        return csi_pb2.NodeUnpublishVolumeResponse()

    def _remove_if_ephemeral(self, csi_volume_id: str) -> None:
        try:
            backend = self._local_backend()
        except FailedPrecondition:
            return
        volume = backend.lookup_name(csi_volume_id)
        if volume is None or volume.parameters.get(CTX_EPHEMERAL) != "true":
            return
        mount_path = str(self.ephemeral_dir / volume.volume_id)
        fs.ensure_unmounted(mount_path)
        fs.ensure_path_absent(mount_path)
        backend.detach(volume.volume_id)
        backend.delete_volume(volume.volume_id)
        _log.info("inline volume removed", volume_id=volume.volume_id, csi_volume_id=csi_volume_id)

    @method
    def NodeGetVolumeStats(self, request, context):
        require(request.volume_id, "volume_id")
        require(request.volume_path, "volume_path")
        backend, volume_id = self._node_volume(request.volume_id)
        attachment = backend.find_attachment(volume_id)
        if attachment is None:
            raise NotFound(f"volume {request.volume_id} is not attached on node {self.node_id}")
        if not os.path.exists(request.volume_path):
            raise NotFound(f"volume_path {request.volume_path} does not exist on node {self.node_id}")
        check_host_path(request.volume_path, "volume_path", self.publish_roots)
        self._check_holds(request.volume_path, attachment.device, request.volume_id)
        condition = backend.node_condition(volume_id)
        status = csi_pb2.VolumeCondition(abnormal=condition.abnormal, message=condition.message)
        Usage = csi_pb2.VolumeUsage
        if os.path.isdir(request.volume_path):
            if not fs.is_mounted(request.volume_path):
                raise NotFound(f"volume {request.volume_id} is not mounted at {request.volume_path}")
            used = fs.usage(request.volume_path)
            usage = [
                Usage(unit=Usage.BYTES, total=used.total_bytes, used=used.used_bytes,
                      available=used.available_bytes),
                Usage(unit=Usage.INODES, total=used.total_inodes, used=used.used_inodes,
                      available=used.available_inodes)]
        else:
            usage = [Usage(unit=Usage.BYTES, total=fs.block_size_bytes(attachment.device))]
        return csi_pb2.NodeGetVolumeStatsResponse(usage=usage, volume_condition=status)

    def _node_volume(self, csi_volume_id: str):
        """The backend and polyvol volume id behind a CSI volume id (inline volumes included)."""
        try:
            return self.registry.for_id(csi_volume_id), csi_volume_id
        except NotFound:
            local = self._local_backend_or_none()
            inline = local.lookup_name(csi_volume_id) if local else None
            if inline is None:
                raise
            return local, inline.volume_id

    def _local_backend_or_none(self) -> LocalBackend | None:
        try:
            return self._local_backend()
        except FailedPrecondition:
            return None

    @staticmethod
    def _check_holds(volume_path: str, device: str, volume_id: str) -> None:
        """volume_path must show this volume (its filesystem mounted there, or its device bound
        there), so NodeGetVolumeStats and NodeExpandVolume never report or grow another one."""
        if os.path.isdir(volume_path):
            mounted = fs.mounts_at(volume_path)
            if mounted and mounted[-1].device != fs.device_number(device):
                raise FailedPrecondition(f"volume_path {volume_path} holds another filesystem "
                                         f"({mounted[-1].source}), not volume {volume_id}")
        elif volume_path not in fs.bind_targets(device):
            raise FailedPrecondition(f"volume_path {volume_path} is not where block volume "
                                     f"{volume_id} is published")

    @method
    def NodeExpandVolume(self, request, context):
        require(request.volume_id, "volume_id")
        require(request.volume_path, "volume_path")
        if request.HasField("volume_capability"):
            check_capability(request.volume_capability)
        backend, volume_id = self._node_volume(request.volume_id)
        if not os.path.exists(request.volume_path):
            raise NotFound(f"volume_path {request.volume_path} does not exist on node {self.node_id}")
        # Checked after the lookups: csi-sanity wants NOT_FOUND for a path that does not exist.
        check_host_path(request.volume_path, "volume_path", self.publish_roots)
        with self.locks.hold(request.volume_id, "NodeExpandVolume"):
            attachment = backend.find_attachment(volume_id)
            if attachment is None:
                raise FailedPrecondition(f"volume {request.volume_id} is not staged on this node")
            self._check_holds(request.volume_path, attachment.device, request.volume_id)
            backend.node_expand(volume_id, request.capacity_range.required_bytes)
            mounted = fs.mounts_at(request.volume_path) if os.path.isdir(request.volume_path) else []
            if mounted:
                fs.grow(attachment.device, request.volume_path, mounted[-1].fstype)
            size = fs.block_size_bytes(attachment.device)
        return csi_pb2.NodeExpandVolumeResponse(capacity_bytes=size)

    @method
    def NodeGetCapabilities(self, request, context):
        return csi_pb2.NodeGetCapabilitiesResponse(capabilities=[
            csi_pb2.NodeServiceCapability(rpc=csi_pb2.NodeServiceCapability.RPC(type=c))
            for c in CAPABILITIES])

    @method
    def NodeGetInfo(self, request, context):
        return csi_pb2.NodeGetInfoResponse(
            node_id=self.node_id, max_volumes_per_node=self.max_volumes,
            accessible_topology=csi_pb2.Topology(segments={TOPOLOGY_NODE_KEY: self.node_id}))
