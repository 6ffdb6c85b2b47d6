"""`polyvol volume ...` and `polyvol snapshot ...`: a CSI client for people, like csc.

It speaks plain CSI to any endpoint, so it works against polyvol or any other driver,
and prints tables rather than protobuf dumps. Errors show the gRPC code and the
driver's message, and exit non-zero.
"""

import hashlib
import os
import sys
from datetime import datetime, timezone

import grpc

from .proto import csi_pb2, csi_pb2_grpc
from .rpc import content_source
from .units import format_size, parse_size

AccessMode = csi_pb2.VolumeCapability.AccessMode


class ClientError(Exception):
    pass


def add_parsers(commands, default_endpoint: str) -> None:
    common = {"default": default_endpoint,
              "help": f"CSI endpoint (env POLYVOL_ENDPOINT; default {default_endpoint})"}

    volume = commands.add_parser("volume", help="create, inspect, attach and remove volumes")
    verbs = volume.add_subparsers(dest="verb", required=True)

    create = verbs.add_parser("create", help="CreateVolume")
    create.add_argument("name")
    create.add_argument("--size", type=parse_size, default=parse_size("1Gi"), help="e.g. 1Gi")
    create.add_argument("--type", dest="class_type", default="", help="StorageClass type")
    create.add_argument("--fs", default="", help="ext4 or xfs")
    create.add_argument("--block", action="store_true", help="raw block volume")
    create.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                        help="any other StorageClass parameter; repeatable")
    create.add_argument("--from-snapshot", default="", metavar="SNAPSHOT_ID")
    create.add_argument("--from-volume", default="", metavar="VOLUME_ID")
    create.set_defaults(run=_create)

    listing = verbs.add_parser("list", help="ListVolumes")
    listing.set_defaults(run=_list)

    show = verbs.add_parser("show", help="ControllerGetVolume")
    show.add_argument("volume_id")
    show.set_defaults(run=_show)

    expand = verbs.add_parser("expand", help="ControllerExpandVolume (+ NodeExpandVolume with --target)")
    expand.add_argument("volume_id")
    expand.add_argument("--size", type=parse_size, required=True)
    expand.add_argument("--target", default="", help="grow the filesystem published here too")
    expand.set_defaults(run=_expand)

    snap = verbs.add_parser("snapshot", help="CreateSnapshot of a volume")
    snap.add_argument("volume_id")
    snap.add_argument("name")
    snap.set_defaults(run=_snapshot)

    delete = verbs.add_parser("delete", help="DeleteVolume")
    delete.add_argument("volume_id")
    delete.set_defaults(run=_delete)

    publish = verbs.add_parser(
        "publish", help="ControllerPublishVolume (when the plugin has it) + NodeStageVolume + "
                        "NodePublishVolume, on the plugin's own node")
    publish.add_argument("volume_id")
    publish.add_argument("--target", required=True, help="where the volume appears")
    publish.add_argument("--block", action="store_true", help="publish the raw block device")
    publish.add_argument("--readonly", action="store_true")
    publish.add_argument("--fs", default="", help="filesystem when formatting (default: the volume's)")
    publish.set_defaults(run=_publish)

    unpublish = verbs.add_parser(
        "unpublish", help="NodeUnpublishVolume + NodeUnstageVolume + ControllerUnpublishVolume "
                          "(when the plugin has it)")
    unpublish.add_argument("volume_id")
    unpublish.add_argument("--target", required=True)
    unpublish.set_defaults(run=_unpublish)

    snapshots = commands.add_parser("snapshot", help="list and delete snapshots")
    snap_verbs = snapshots.add_subparsers(dest="verb", required=True)
    snap_list = snap_verbs.add_parser("list", help="ListSnapshots")
    snap_list.add_argument("--volume", default="", help="only snapshots of this volume")
    snap_list.set_defaults(run=_snapshot_list)
    snap_delete = snap_verbs.add_parser("delete", help="DeleteSnapshot")
    snap_delete.add_argument("snapshot_id")
    snap_delete.set_defaults(run=_snapshot_delete)

    for parser in (create, listing, show, expand, snap, delete, publish, unpublish,
                   snap_list, snap_delete):
        parser.add_argument("--endpoint", **common)


class _Stubs:
    def __init__(self, endpoint: str):
        self.channel = grpc.insecure_channel(endpoint)
        self.controller = csi_pb2_grpc.ControllerStub(self.channel)
        self.node = csi_pb2_grpc.NodeStub(self.channel)

    def call(self, stub_method, request):
        try:
            return stub_method(request, timeout=600)
        except grpc.RpcError as error:
            raise ClientError(f"{error.code().name}: {error.details()}") from None


def _run(args, action) -> int:
    stubs = _Stubs(args.endpoint)
    try:
        action(stubs, args)
    except ClientError as error:
        print(f"polyvol: {error}", file=sys.stderr)
        return 1
    finally:
        stubs.channel.close()
    return 0


def _capability(block: bool, fs_type: str = "", readonly: bool = False):
    mode = AccessMode(mode=AccessMode.SINGLE_NODE_READER_ONLY if readonly
                      else AccessMode.SINGLE_NODE_WRITER)
    if block:
        return csi_pb2.VolumeCapability(block=csi_pb2.VolumeCapability.BlockVolume(), access_mode=mode)
    return csi_pb2.VolumeCapability(mount=csi_pb2.VolumeCapability.MountVolume(fs_type=fs_type),
                                    access_mode=mode)


def _table(headers: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows)]
    for row in [headers, *rows]:
        print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip())


def _copies(volume) -> tuple[float, int]:
    """Storage copies of every byte, and the copies the app keeps itself."""
    ctx = volume.volume_context
    return float(ctx.get("polyvol.csi.io/copies", "1")), int(ctx.get("appReplicas", "1"))


def _volume_rows(volumes) -> list[list[str]]:
    rows = []
    for volume, condition in volumes:
        ctx = volume.volume_context
        storage, app = _copies(volume)
        where = ctx.get("polyvol.csi.io/server") or ",".join(
            v for t in volume.accessible_topology for v in t.segments.values()) or "any node"
        rows.append([volume.volume_id, ctx.get("polyvol.csi.io/type", "?"),
                     format_size(volume.capacity_bytes), ctx.get("fsType", ""),
                     f"{storage:g}", f"{app}", f"{storage * app:g}", where,
                     "abnormal: " + condition.message if condition.abnormal else "ok"])
    return rows


VOLUME_HEADERS = ["VOLUME ID", "TYPE", "SIZE", "FS", "COPIES", "APP", "EFFECTIVE", "WHERE",
                  "CONDITION"]


def _accounting(volumes) -> None:
    """Per class: logical bytes, raw bytes the storage keeps, and effective copies
    (app replicas x storage copies): the numbers behind 'Kafka on 3-copy storage = 9 copies'."""
    classes: dict[str, list[float]] = {}
    for volume in volumes:
        storage, app = _copies(volume)
        totals = classes.setdefault(volume.volume_context.get("polyvol.csi.io/type", "?"), [0, 0, 0, 0])
        totals[0] += 1
        totals[1] += volume.capacity_bytes
        totals[2] += volume.capacity_bytes * storage
        totals[3] += volume.capacity_bytes * storage * app
    if not classes:
        return
    print()
    _table(["TYPE", "VOLUMES", "LOGICAL", "RAW (STORAGE)", "RAW/LOGICAL", "EFFECTIVE COPIES"], [
        [name, f"{count:.0f}", format_size(logical), format_size(raw), f"{raw / logical:.2f}",
         f"{effective / logical:.2f}"]
        for name, (count, logical, raw, effective) in sorted(classes.items())])


def _create(args) -> int:
    def action(stubs, args):
        parameters = dict(p.split("=", 1) for p in args.param if "=" in p)
        bad = [p for p in args.param if "=" not in p]
        if bad:
            raise ClientError(f"--param takes KEY=VALUE, not {bad[0]!r}")
        if args.class_type:
            parameters["type"] = args.class_type
        if args.fs:
            parameters["fsType"] = args.fs
        source = content_source(args.from_snapshot, args.from_volume)
        made = stubs.call(stubs.controller.CreateVolume, csi_pb2.CreateVolumeRequest(
            name=args.name, capacity_range=csi_pb2.CapacityRange(required_bytes=args.size),
            volume_capabilities=[_capability(args.block, args.fs)], parameters=parameters,
            volume_content_source=source))
        _table(VOLUME_HEADERS, _volume_rows([(made.volume, csi_pb2.VolumeCondition())]))
    return _run(args, action)


def _list(args) -> int:
    def action(stubs, args):
        entries, token = [], ""
        for _ in range(10_000):  # pages; bounded so a broken token cannot loop forever
            page = stubs.call(stubs.controller.ListVolumes,
                              csi_pb2.ListVolumesRequest(max_entries=100, starting_token=token))
            entries += page.entries
            token = page.next_token
            if not token:
                break
        _table(VOLUME_HEADERS, _volume_rows((e.volume, e.status.volume_condition) for e in entries))
        _accounting([e.volume for e in entries])
    return _run(args, action)


def _show(args) -> int:
    def action(stubs, args):
        got = stubs.call(stubs.controller.ControllerGetVolume,
                         csi_pb2.ControllerGetVolumeRequest(volume_id=args.volume_id))
        _table(VOLUME_HEADERS, _volume_rows([(got.volume, got.status.volume_condition)]))
        print()
        for key, value in sorted(got.volume.volume_context.items()):
            print(f"{key}: {value}")
        source = got.volume.content_source
        if source.HasField("snapshot"):
            print(f"restored from snapshot: {source.snapshot.snapshot_id}")
        if source.HasField("volume"):
            print(f"cloned from volume: {source.volume.volume_id}")
        if got.status.published_node_ids:
            print(f"published to node: {', '.join(got.status.published_node_ids)}")
    return _run(args, action)


def _expand(args) -> int:
    def action(stubs, args):
        grown = stubs.call(stubs.controller.ControllerExpandVolume, csi_pb2.ControllerExpandVolumeRequest(
            volume_id=args.volume_id, capacity_range=csi_pb2.CapacityRange(required_bytes=args.size)))
        print(f"{args.volume_id}: {format_size(grown.capacity_bytes)}")
        if args.target and grown.node_expansion_required:
            node = stubs.call(stubs.node.NodeExpandVolume, csi_pb2.NodeExpandVolumeRequest(
                volume_id=args.volume_id, volume_path=os.path.abspath(args.target),
                capacity_range=csi_pb2.CapacityRange(required_bytes=args.size)))
            print(f"{args.target}: grown on the node to {format_size(node.capacity_bytes)}")
        elif grown.node_expansion_required:
            print("the node still has to grow it: run again with --target, or republish")
    return _run(args, action)


def _snapshot(args) -> int:
    def action(stubs, args):
        made = stubs.call(stubs.controller.CreateSnapshot, csi_pb2.CreateSnapshotRequest(
            source_volume_id=args.volume_id, name=args.name))
        _snapshot_table([made.snapshot])
    return _run(args, action)


def _snapshot_table(snapshots) -> None:
    _table(["SNAPSHOT ID", "SOURCE VOLUME", "SIZE", "CREATED", "READY"], [
        [s.snapshot_id, s.source_volume_id, format_size(s.size_bytes),
         datetime.fromtimestamp(s.creation_time.seconds, timezone.utc).strftime("%Y-%m-%d %H:%M:%S"),
         "yes" if s.ready_to_use else "no"] for s in snapshots])


def _snapshot_list(args) -> int:
    def action(stubs, args):
        found = stubs.call(stubs.controller.ListSnapshots,
                           csi_pb2.ListSnapshotsRequest(source_volume_id=args.volume))
        _snapshot_table([e.snapshot for e in found.entries])
    return _run(args, action)


def _snapshot_delete(args) -> int:
    def action(stubs, args):
        stubs.call(stubs.controller.DeleteSnapshot,
                   csi_pb2.DeleteSnapshotRequest(snapshot_id=args.snapshot_id))
        print(f"deleted {args.snapshot_id}")
    return _run(args, action)


def _delete(args) -> int:
    def action(stubs, args):
        stubs.call(stubs.controller.DeleteVolume, csi_pb2.DeleteVolumeRequest(volume_id=args.volume_id))
        print(f"deleted {args.volume_id}")
    return _run(args, action)


def _staging_path(target: str, volume_id: str) -> str:
    """Where the client stages a volume: beside the target, so it lies under the same
    --publish-root the plugin allows (kubelet keeps a per-volume globalmount the same way)."""
    digest = hashlib.sha256(volume_id.encode()).hexdigest()[:16]
    return os.path.join(os.path.dirname(os.path.abspath(target)), f".polyvol-staging-{digest}")


def _publishes(stubs) -> bool:
    answer = stubs.call(stubs.controller.ControllerGetCapabilities,
                        csi_pb2.ControllerGetCapabilitiesRequest())
    return any(c.rpc.type == csi_pb2.ControllerServiceCapability.RPC.PUBLISH_UNPUBLISH_VOLUME
               for c in answer.capabilities)


def _node_id(stubs) -> str:
    return stubs.call(stubs.node.NodeGetInfo, csi_pb2.NodeGetInfoRequest()).node_id


def _publish(args) -> int:
    def action(stubs, args):
        target = os.path.abspath(args.target)
        staging = _staging_path(target, args.volume_id)
        os.makedirs(staging, exist_ok=True)
        volume = stubs.call(stubs.controller.ControllerGetVolume,
                            csi_pb2.ControllerGetVolumeRequest(volume_id=args.volume_id)).volume
        capability = _capability(args.block, args.fs, args.readonly)
        publish_context = {}
        if _publishes(stubs):
            # As Kubernetes does: record this node as the volume's one node first, and hand
            # the node what the controller says now (e.g. a storage server's current address).
            publish_context = stubs.call(stubs.controller.ControllerPublishVolume,
                                         csi_pb2.ControllerPublishVolumeRequest(
                                             volume_id=args.volume_id, node_id=_node_id(stubs),
                                             volume_capability=capability,
                                             readonly=args.readonly)).publish_context
        stubs.call(stubs.node.NodeStageVolume, csi_pb2.NodeStageVolumeRequest(
            volume_id=args.volume_id, staging_target_path=staging, volume_capability=capability,
            volume_context=volume.volume_context, publish_context=publish_context))
        stubs.call(stubs.node.NodePublishVolume, csi_pb2.NodePublishVolumeRequest(
            volume_id=args.volume_id, staging_target_path=staging, target_path=target,
            volume_capability=capability, readonly=args.readonly,
            volume_context=volume.volume_context, publish_context=publish_context))
        print(f"{args.volume_id} published at {target}" + (" (raw block)" if args.block else ""))
    return _run(args, action)


def _unpublish(args) -> int:
    def action(stubs, args):
        target = os.path.abspath(args.target)
        staging = _staging_path(target, args.volume_id)
        stubs.call(stubs.node.NodeUnpublishVolume, csi_pb2.NodeUnpublishVolumeRequest(
            volume_id=args.volume_id, target_path=target))
        stubs.call(stubs.node.NodeUnstageVolume, csi_pb2.NodeUnstageVolumeRequest(
            volume_id=args.volume_id, staging_target_path=staging))
        if os.path.isdir(staging):
            os.rmdir(staging)
        if _publishes(stubs):
            stubs.call(stubs.controller.ControllerUnpublishVolume,
                       csi_pb2.ControllerUnpublishVolumeRequest(volume_id=args.volume_id,
                                                                node_id=_node_id(stubs)))
        print(f"{args.volume_id} unpublished from {target}")
    return _run(args, action)
