"""The replicated and erasure-coded classes against a real single-host Ceph cluster.

One cluster per test session (tests/ceph_cluster.py), one plugin process per module, started
exactly as a user starts it (`polyvol plugin --ceph-config FILE`); cephx credentials travel
only in the CSI request secrets. Covered: parameter validation, idempotent create/delete and
ALREADY_EXISTS, copies read from the pools (3, 1.5, and a size-2 pool), GetCapacity from the
pool's max_avail, missing/malformed/wrong keys (fast, clear, never leaked), a plugin killed
between image creation and its record, half-created volumes deleted completely, online
expansion, snapshots, clones from snapshots and volumes, the flatten policy, deleting a
volume that still has a snapshot, mount and block volumes written and read back, I/O
(fio crc32c verify, iodepth 32, mixed block sizes) continuing while an OSD is down, and
ControllerPublish (one node per volume, recorded in Ceph; a lost node's volume moving to
another node without waiting for the lost node's lock).
"""

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import grpc
import pytest

from ceph_cluster import ceph_cluster  # noqa: F401 - the session fixture
from conftest import MiB, Plugin, capability, clean_up_below
from test_local_helpers import loops_under, mounts_under
from driver.proto import csi_pb2

pytestmark = pytest.mark.root

CLUSTER_ID = "polyvol-test"
CLASSES = ("replicated", "erasure-coded")
VOLUMES_OBJECT = "polyvol.volumes"
SNAPSHOTS_OBJECT = "polyvol.snapshots"


def class_parameters(cluster, class_type: str) -> dict:
    if class_type == "replicated":
        return {"type": "replicated", "clusterID": CLUSTER_ID, "pool": cluster.rep_pool}
    return {"type": "erasure-coded", "clusterID": CLUSTER_ID, "pool": cluster.ec_meta_pool,
            "dataPool": cluster.ec_data_pool}


def write_ceph_config(path: Path, cluster) -> Path:
    # The address vector names both protocols: an unprefixed address on a port other than
    # 3300/6789 is tried with both, and a wrong key then looks like a timeout.
    path.write_text(json.dumps({"clusters": [{"clusterID": CLUSTER_ID,
                                              "monitors": [cluster.mon_host]}]}))
    return path


class Env:
    """The cluster, a plugin pointed at it, and CSI helpers that send the secrets."""

    def __init__(self, cluster, plugin: Plugin, config: Path):
        self.cluster = cluster
        self.plugin = plugin
        self.config = config
        self.secrets = {"userID": cluster.user_id, "userKey": cluster.user_key}

    def create(self, name, class_type="replicated", size=64 * MiB, block=False, source=None,
               parameters=None, secrets=None, plugin=None):
        params = {**class_parameters(self.cluster, class_type), **(parameters or {})}
        return (plugin or self.plugin).controller.CreateVolume(csi_pb2.CreateVolumeRequest(
            name=name, capacity_range=csi_pb2.CapacityRange(required_bytes=size),
            volume_capabilities=[capability(block)], parameters=params,
            volume_content_source=source,
            secrets=self.secrets if secrets is None else secrets), timeout=120).volume

    def delete(self, volume_id, secrets=None):
        self.plugin.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(
            volume_id=volume_id, secrets=self.secrets if secrets is None else secrets), timeout=120)

    def snapshot(self, volume_id, name):
        return self.plugin.controller.CreateSnapshot(csi_pb2.CreateSnapshotRequest(
            source_volume_id=volume_id, name=name, secrets=self.secrets), timeout=120).snapshot

    def delete_snapshot(self, snapshot_id):
        self.plugin.controller.DeleteSnapshot(csi_pb2.DeleteSnapshotRequest(
            snapshot_id=snapshot_id, secrets=self.secrets), timeout=120)

    def stage(self, volume, name, block=False, secrets=None, plugin=None,
              publish_context=None) -> str:
        """Stage and publish; returns the target path (a directory, or the block device file)."""
        plugin = plugin or self.plugin
        staging, target = plugin.path(name, "staging"), plugin.path(name, "target")
        os.makedirs(staging, exist_ok=True)
        cap = capability(block)
        plugin.node.NodeStageVolume(csi_pb2.NodeStageVolumeRequest(
            volume_id=volume.volume_id, staging_target_path=staging, volume_capability=cap,
            volume_context=volume.volume_context, publish_context=publish_context or {},
            secrets=self.secrets if secrets is None else secrets), timeout=120)
        plugin.node.NodePublishVolume(csi_pb2.NodePublishVolumeRequest(
            volume_id=volume.volume_id, staging_target_path=staging, target_path=target,
            volume_capability=cap, volume_context=volume.volume_context,
            publish_context=publish_context or {}), timeout=120)
        return target

    def publish(self, volume, node_id, readonly=False, plugin=None, secrets=None):
        """ControllerPublishVolume, as the csi-attacher sends it (with the controller-publish
        secret); returns the response."""
        return (plugin or self.plugin).controller.ControllerPublishVolume(
            csi_pb2.ControllerPublishVolumeRequest(
                volume_id=volume.volume_id, node_id=node_id, readonly=readonly,
                volume_capability=capability(), volume_context=volume.volume_context,
                secrets=self.secrets if secrets is None else secrets), timeout=60)

    def unpublish(self, volume, node_id, plugin=None, secrets=None):
        (plugin or self.plugin).controller.ControllerUnpublishVolume(
            csi_pb2.ControllerUnpublishVolumeRequest(
                volume_id=volume.volume_id, node_id=node_id,
                secrets=self.secrets if secrets is None else secrets), timeout=60)

    def published_nodes(self, volume, plugin=None) -> tuple[list[str], list[str]]:
        """published_node_ids as ControllerGetVolume and ListVolumes report them."""
        controller = (plugin or self.plugin).controller
        got = controller.ControllerGetVolume(csi_pb2.ControllerGetVolumeRequest(
            volume_id=volume.volume_id), timeout=60)
        listed = [e for e in controller.ListVolumes(csi_pb2.ListVolumesRequest(), timeout=60).entries
                  if e.volume.volume_id == volume.volume_id]
        assert len(listed) == 1, listed
        return list(got.status.published_node_ids), list(listed[0].status.published_node_ids)

    def unstage(self, volume, name):
        self.plugin.unpublish_and_unstage(volume.volume_id, name)

    # --- what Ceph has, seen as client.admin -----------------------------------------------
    def images(self, pool) -> list[str]:
        import rbd
        with self.cluster.ioctx(pool) as ioctx:
            return sorted(rbd.RBD().list(ioctx))

    def image_info(self, pool, image) -> dict:
        return json.loads(self.cluster.rbd("info", "--format", "json", f"{pool}/{image}"))

    def snapshots_of(self, pool, image) -> list[dict]:
        return json.loads(self.cluster.rbd("snap", "ls", "--all", "--format", "json",
                                           f"{pool}/{image}"))

    def omap(self, pool, obj=VOLUMES_OBJECT) -> dict:
        import rados
        with self.cluster.ioctx(pool) as ioctx, rados.ReadOpCtx() as op:
            values, _ = ioctx.get_omap_vals(op, "", "", 10000)
            try:
                ioctx.operate_read_op(op, obj)
            except rados.ObjectNotFound:
                return {}
            return {k: v.decode() for k, v in values}


@pytest.fixture(scope="module")
def env(ceph_cluster, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("ceph")
    config = write_ceph_config(workdir / "ceph-config.json", ceph_cluster)
    # --nodes: ControllerPublish accepts only node ids it knows (the plugin's own, node-test,
    # and these two, which stand for other nodes of a cluster)
    plugin = Plugin(workdir, extra_args=["--ceph-config", str(config), "--nodes", "node-a,node-b"])
    plugin.start()
    try:
        yield Env(ceph_cluster, plugin, config)
    finally:
        plugin.stop()
        clean_up_below(workdir)


def image_of(volume) -> tuple[str, str]:
    return volume.volume_context["polyvol.csi.io/ceph-pool"], \
        volume.volume_context["polyvol.csi.io/ceph-image"]


def code_of(call) -> tuple[grpc.StatusCode, str, float]:
    started = time.monotonic()
    try:
        call()
    except grpc.RpcError as error:
        return error.code(), error.details(), time.monotonic() - started
    return grpc.StatusCode.OK, "", time.monotonic() - started


# --- parameters ---------------------------------------------------------------------------------

def test_storage_class_parameters_are_validated(env):
    c = env.cluster
    rep = class_parameters(c, "replicated")
    ec = class_parameters(c, "erasure-coded")
    bad = [
        ({**rep, "poool": "x"}, grpc.StatusCode.INVALID_ARGUMENT, "unknown parameter"),
        ({k: v for k, v in rep.items() if k != "pool"}, grpc.StatusCode.INVALID_ARGUMENT, "needs pool"),
        ({k: v for k, v in rep.items() if k != "clusterID"}, grpc.StatusCode.INVALID_ARGUMENT, "clusterID"),
        ({**rep, "monitors": c.monitors}, grpc.StatusCode.INVALID_ARGUMENT, "not both"),
        ({**rep, "dataPool": c.ec_data_pool}, grpc.StatusCode.INVALID_ARGUMENT, "dataPool is for"),
        ({k: v for k, v in ec.items() if k != "dataPool"}, grpc.StatusCode.INVALID_ARGUMENT, "needs dataPool"),
        ({**rep, "imageFeatures": "layering,journaling"}, grpc.StatusCode.INVALID_ARGUMENT, "journaling"),
        ({**rep, "imageFeatures": "layering,fast-diff"}, grpc.StatusCode.INVALID_ARGUMENT, "needs object-map"),
        ({**rep, "imageFeatures": "exclusive-lock"}, grpc.StatusCode.INVALID_ARGUMENT, "layering"),
        ({**rep, "clusterID": "elsewhere"}, grpc.StatusCode.FAILED_PRECONDITION, "not known"),
        ({**rep, "pool": "no-such-pool"}, grpc.StatusCode.INVALID_ARGUMENT, "does not exist"),
        ({**rep, "pool": c.ec_data_pool}, grpc.StatusCode.INVALID_ARGUMENT, "erasure-coded"),
        ({**ec, "dataPool": c.rep_pool}, grpc.StatusCode.INVALID_ARGUMENT, "not erasure-coded"),
    ]
    for index, (parameters, code, text) in enumerate(bad):
        got, message, _ = code_of(lambda: env.plugin.controller.CreateVolume(
            csi_pb2.CreateVolumeRequest(
                name=f"bad-parameters-{index}", capacity_range=csi_pb2.CapacityRange(
                    required_bytes=64 * MiB), volume_capabilities=[capability()],
                parameters=parameters, secrets=env.secrets), timeout=60))
        assert got == code and text in message, (parameters, got, message)
    assert env.images(c.rep_pool) == [] and env.images(c.ec_meta_pool) == []


def test_ids_tokens_features_and_keys_are_checked_strictly():
    from driver.backends import ceph
    from driver.errors import InvalidArgument
    token = ceph.monitors_token("v2:10.0.0.11:3300,v2:10.0.0.12:3300,v2:10.0.0.13:3300")
    assert ceph.monitors_from_token(token) == "v2:10.0.0.11:3300,v2:10.0.0.12:3300,v2:10.0.0.13:3300"
    assert ceph.monitors_token("mon-a.example:6789") is None  # host names: the fsid instead
    assert ceph.monitors_from_token("m.zz") is None and ceph.monitors_from_token("main") is None
    longest = ceph.monitors_token(",".join(f"10.0.0.{i}:6789" for i in range(1, 5)))
    assert len(ceph.volume_id_of("a" * 32, 4294967295, longest)) <= 128
    assert len(ceph.snapshot_id_of("a" * 32, "b" * 16, 4294967295, longest)) <= 128
    for bad in ("rbd-../../etc-1-c", "rbd-" + "a" * 32 + "-1-c;rm", "rbd-" + "A" * 32 + "-1-c",
                "rbd-" + "a" * 32 + "-x-c", "rbd-" + "a" * 32 + "-1-" + "c" * 49, "rbd-snap-x"):
        assert ceph.VOLUME_ID.fullmatch(bad) is None and ceph.SNAPSHOT_ID.fullmatch(bad) is None
    assert ceph.check_features("deep-flatten,layering") == "layering,deep-flatten"
    for bad in ("layering,journaling", "layering,striping", "object-map,layering", "fast-diff"):
        with pytest.raises(InvalidArgument):
            ceph.check_features(bad)
    key = "AQBcJQdrAAAAABAAk2Rzv1Kd7Ih5Hf0p2i9ETg=="
    assert ceph.credentials_from({"userID": "client.polyvol", "userKey": key}, True).user == "polyvol"
    assert key not in repr(ceph.credentials_from({"userID": "polyvol", "userKey": key}, True))
    assert ceph.credentials_from({}, False) is None
    for secrets in ({}, {"userID": "u"}, {"userKey": key}, {"userID": "u;x", "userKey": key},
                    {"userID": "u", "userKey": "QUJD"}, {"userID": "u", "userKey": key[:-4]}):
        with pytest.raises(InvalidArgument) as raised:
            ceph.credentials_from(secrets, True)
        assert key not in str(raised.value)


def test_storage_class_with_monitors_instead_of_a_cluster_id(env, tmp_path):
    """IPv4 monitors travel in the ids (any plugin can delete the volume, with no config and
    no state); host names make the fsid the cluster part, learned in the state directory."""
    c = env.cluster
    by_address = {"type": "replicated", "monitors": f"v2:127.0.0.1:{c.mon_v2_port}",
                  "pool": c.rep_pool}
    volume = env.plugin.controller.CreateVolume(csi_pb2.CreateVolumeRequest(
        name="monitors-ipv4", capacity_range=csi_pb2.CapacityRange(required_bytes=64 * MiB),
        volume_capabilities=[capability()], parameters=by_address, secrets=env.secrets),
        timeout=120).volume
    assert volume.volume_id.split("-", 3)[3].startswith("m.")
    assert _read_marker_after_write(env, volume, "monitors-ipv4") == "via monitors"
    stranger = Plugin(tmp_path / "stranger")  # no --ceph-config, its own empty state directory
    stranger.publish_root.mkdir(parents=True, exist_ok=True)
    stranger.start()
    try:
        stranger.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(
            volume_id=volume.volume_id, secrets=env.secrets), timeout=120)
    finally:
        stranger.stop()
    assert image_of(volume)[1] not in env.images(c.rep_pool)

    by_name = {**by_address, "monitors": f"localhost:{c.mon_v2_port}"}
    volume = env.plugin.controller.CreateVolume(csi_pb2.CreateVolumeRequest(
        name="monitors-hostname", capacity_range=csi_pb2.CapacityRange(required_bytes=64 * MiB),
        volume_capabilities=[capability()], parameters=by_name, secrets=env.secrets),
        timeout=120).volume
    assert volume.volume_id.endswith(f"-{c.fsid}")
    learned = json.loads((env.plugin.state_dir / "ceph" / "clusters.json").read_text())
    assert learned["clusters"][c.fsid] == f"localhost:{c.mon_v2_port}"
    capacity = env.plugin.controller.GetCapacity(csi_pb2.GetCapacityRequest(
        parameters=by_name), timeout=60).available_capacity
    assert capacity > 0
    env.delete(volume.volume_id)
    assert env.images(c.rep_pool) == []


def _read_marker_after_write(env, volume, name) -> str:
    _write_marker(env, volume, name, "via monitors")
    return _read_marker(env, volume, name)


# --- create / delete ------------------------------------------------------------------------------

@pytest.mark.parametrize("class_type", CLASSES)
def test_create_is_idempotent_and_delete_removes_image_and_record(env, class_type):
    c = env.cluster
    name = f"idem-{class_type}"
    volume = env.create(name, class_type, size=80 * MiB)
    again = env.create(name, class_type, size=80 * MiB)
    assert again.volume_id == volume.volume_id and volume.capacity_bytes == 80 * MiB
    code, message, _ = code_of(lambda: env.create(name, class_type, size=96 * MiB))
    assert code == grpc.StatusCode.ALREADY_EXISTS, message

    pool, image = image_of(volume)
    assert volume.volume_id.startswith("rbd-") and volume.volume_id.endswith(f"-{CLUSTER_ID}")
    info = env.image_info(pool, image)
    assert info["size"] == 80 * MiB
    assert set(info["features"]) >= {"layering", "exclusive-lock", "object-map", "fast-diff",
                                     "deep-flatten"}
    if class_type == "erasure-coded":
        assert info["data_pool"] == c.ec_data_pool
    else:
        assert "data_pool" not in info
    records = env.omap(pool)
    uuid_ = image.removeprefix("pv-")
    assert records[f"name.{name}"] == uuid_
    assert json.loads(records[f"vol.{uuid_}"])["state"] == "ready"
    assert c.rbd("image-meta", "get", f"{pool}/{image}", "polyvol.volume_name").strip() == name

    listed = env.plugin.controller.ListVolumes(csi_pb2.ListVolumesRequest(), timeout=60).entries
    assert [e.volume.volume_id for e in listed if e.volume.volume_id == volume.volume_id]
    got = env.plugin.controller.ControllerGetVolume(
        csi_pb2.ControllerGetVolumeRequest(volume_id=volume.volume_id), timeout=60)
    assert got.volume.capacity_bytes == 80 * MiB and not got.status.volume_condition.abnormal

    env.delete(volume.volume_id)
    env.delete(volume.volume_id)  # idempotent
    assert image not in env.images(pool)
    assert not [k for k in env.omap(pool) if uuid_ in k or name in k]
    code, _, _ = code_of(lambda: env.plugin.controller.ControllerGetVolume(
        csi_pb2.ControllerGetVolumeRequest(volume_id=volume.volume_id), timeout=60))
    assert code == grpc.StatusCode.NOT_FOUND


def test_copies_are_read_from_the_pools(env, tmp_path):
    """3 for the size-3 pool, (k+m)/k = 1.5 for the k=2 m=1 data pool, and 2 for a size-2
    pool made here: the numbers come from the cluster, not from the class name."""
    c = env.cluster
    replicated = env.create("copies-rep", "replicated")
    erasure = env.create("copies-ec", "erasure-coded")
    try:
        assert replicated.volume_context["polyvol.csi.io/copies"] == "3"
        assert erasure.volume_context["polyvol.csi.io/copies"] == "1.5"
    finally:
        env.delete(replicated.volume_id)
        env.delete(erasure.volume_id)

    pool, user = "polyvol-rep2", "polyvol-copies"
    c.mon_command("osd pool create", pool=pool, pg_num=8, pgp_num=8, pool_type="replicated")
    try:
        c.mon_command("osd pool set", pool=pool, var="size", val="2")
        c.mon_command("osd pool application enable", pool=pool, app="rbd")
        keyring = c.mon_command("auth get-or-create", entity=f"client.{user}",
                                caps=["mon", "profile rbd", "osd", f"profile rbd pool={pool}"],
                                format="plain")
        key = next(line.split("=", 1)[1].strip() for line in keyring.splitlines()
                   if line.strip().startswith("key"))
        secrets = {"userID": user, "userKey": key}
        volume = env.create("copies-size2", parameters={"pool": pool}, secrets=secrets)
        assert volume.volume_context["polyvol.csi.io/copies"] == "2"
        env.delete(volume.volume_id, secrets=secrets)
        assert env.images(pool) == []
    finally:
        c.mon_command("auth rm", entity=f"client.{user}")
        c.mon_command("osd pool rm", pool=pool, pool2=pool, yes_i_really_really_mean_it=True)


def test_capacity_is_the_data_pools_max_avail(env, tmp_path):
    c = env.cluster
    # a fresh plugin has no credentials yet, and GetCapacity carries none
    fresh = Plugin(tmp_path, extra_args=["--ceph-config", str(env.config)])
    fresh.start()
    try:
        code, message, _ = code_of(lambda: fresh.controller.GetCapacity(csi_pb2.GetCapacityRequest(
            parameters=class_parameters(c, "replicated")), timeout=60))
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "credentials" in message, message
    finally:
        fresh.stop()

    volume = env.create("capacity-probe")  # gives the plugin credentials for the cluster
    try:
        answers = {}
        for class_type in CLASSES:
            answers[class_type] = env.plugin.controller.GetCapacity(csi_pb2.GetCapacityRequest(
                parameters=class_parameters(c, class_type)), timeout=60).available_capacity
        df = {p["name"]: p["stats"]["max_avail"] for p in c.mon_command("df")["pools"]}
        for class_type, pool in (("replicated", c.rep_pool), ("erasure-coded", c.ec_data_pool)):
            assert abs(answers[class_type] - df[pool]) <= 0.02 * df[pool], (answers, df)
        # 3 copies vs 1.5: the EC class can hold about twice as much
        assert 1.7 < answers["erasure-coded"] / answers["replicated"] < 2.3, answers
    finally:
        env.delete(volume.volume_id)


# --- credentials ----------------------------------------------------------------------------------

def test_missing_malformed_and_wrong_keys_fail_fast_clearly_and_never_leak(env):
    c = env.cluster
    wrong_key = "AQBcJQdrAAAAABAAk2Rzv1Kd7Ih5Hf0p2i9ETg=="  # well-formed, not the user's
    malformed = "this-is-not-a-cephx-key-but-a-secret-123"
    cases = [
        ({}, grpc.StatusCode.INVALID_ARGUMENT, "no Ceph credentials"),
        ({"userID": c.user_id}, grpc.StatusCode.INVALID_ARGUMENT, "no userKey"),
        ({"userID": c.user_id, "userKey": malformed}, grpc.StatusCode.INVALID_ARGUMENT,
         "not a cephx key"),
        ({"userID": c.user_id, "userKey": wrong_key}, grpc.StatusCode.PERMISSION_DENIED, "refused"),
        ({"userID": "nobody", "userKey": c.user_key}, grpc.StatusCode.PERMISSION_DENIED, "refused"),
    ]
    for secrets, expected, text in cases:
        code, message, seconds = code_of(lambda: env.create("key-check", secrets=secrets))
        assert code == expected and text in message, (secrets.keys(), code, message)
        assert seconds < 10, f"{expected} took {seconds:.1f}s"
        assert malformed not in message and wrong_key not in message

    # a CO retrying fast does not turn every retry into a monitor round trip
    started = time.monotonic()
    for _ in range(20):
        code, message, _ = code_of(lambda: env.create(
            "key-check", secrets={"userID": c.user_id, "userKey": wrong_key}))
        assert code == grpc.StatusCode.PERMISSION_DENIED
    assert time.monotonic() - started < 5
    assert "refused again without asking" in message

    volume = env.create("key-check-volume")
    try:
        for secrets, expected in (({}, grpc.StatusCode.INVALID_ARGUMENT),
                                  ({"userID": c.user_id, "userKey": wrong_key},
                                   grpc.StatusCode.PERMISSION_DENIED)):
            code, _, seconds = code_of(lambda: env.delete(volume.volume_id, secrets=secrets))
            assert code == expected and seconds < 10
            code, message, seconds = code_of(lambda: env.stage(volume, "key-check", secrets=secrets))
            assert code == expected and seconds < 10, (code, message, seconds)
    finally:
        env.delete(volume.volume_id)
    assert env.images(c.rep_pool) == []

    # the key is in no log line, no command line, no file others can read
    secrets_ = (c.user_key, malformed, wrong_key)
    log_text = env.plugin.log_path.read_text()
    assert not [s for s in secrets_ if s in log_text]
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().decode(errors="replace")
                assert not [s for s in secrets_ if s in cmdline], entry
    for path in env.plugin.state_dir.rglob("*"):
        if path.is_file() and path.stat().st_mode & 0o077:
            assert c.user_key not in path.read_text(errors="replace"), path


# --- crash safety ---------------------------------------------------------------------------------

def _pool_images(env, pool) -> set:
    return set(env.images(pool))


def test_plugin_killed_between_image_creation_and_record_leaves_one_image(env, tmp_path):
    c = env.cluster
    for class_type in CLASSES:
        pool = class_parameters(c, class_type)["pool"]
        before = _pool_images(env, pool)
        name = f"crash-{class_type}"
        crashing = Plugin(tmp_path / class_type, extra_args=["--ceph-config", str(env.config)],
                          argv_prefix=["env", "POLYVOL_FAILPOINTS=after-image-create"])
        crashing.publish_root.mkdir(parents=True, exist_ok=True)
        crashing.start()
        try:
            code, _, _ = code_of(lambda: env.create(name, class_type, plugin=crashing))
            assert code == grpc.StatusCode.UNAVAILABLE  # the process died mid-call
            crashing.process.wait(timeout=10)
            assert crashing.process.returncode == 86
        finally:
            crashing.stop()
        made = _pool_images(env, pool) - before
        assert len(made) == 1, made
        (image,) = made
        record = json.loads(env.omap(pool)[f"vol.{image.removeprefix('pv-')}"])
        assert record["state"] == "creating"  # exactly the crash state: image made, not finished

        volume = env.create(name, class_type)  # the retry, on the module's healthy plugin
        assert image_of(volume)[1] == image
        assert _pool_images(env, pool) - before == {image}
        assert json.loads(env.omap(pool)[f"vol.{image.removeprefix('pv-')}"])["state"] == "ready"
        assert c.rbd("image-meta", "get", f"{pool}/{image}", "polyvol.volume_name").strip() == name
        env.delete(volume.volume_id)
        assert _pool_images(env, pool) == before

    # a clone of a volume, killed after the clone was made from the source's hidden snapshot
    source = env.create("crash-clone-source")
    src_pool, src_image = image_of(source)
    before = _pool_images(env, src_pool)
    crashing = Plugin(tmp_path / "clone", extra_args=["--ceph-config", str(env.config)],
                      argv_prefix=["env", "POLYVOL_FAILPOINTS=after-image-create"])
    crashing.publish_root.mkdir(parents=True, exist_ok=True)
    crashing.start()
    by_volume = csi_pb2.VolumeContentSource(
        volume=csi_pb2.VolumeContentSource.VolumeSource(volume_id=source.volume_id))
    try:
        code, _, _ = code_of(lambda: env.create("crash-clone", source=by_volume, plugin=crashing))
        assert code == grpc.StatusCode.UNAVAILABLE
    finally:
        crashing.stop()
    assert [s["name"] for s in env.snapshots_of(src_pool, src_image)][0].startswith("pvc-")
    clone = env.create("crash-clone", source=by_volume)
    assert len(_pool_images(env, src_pool) - before) == 1
    assert not [s for s in env.snapshots_of(src_pool, src_image) if s["namespace"]["type"] == "user"]
    env.delete(clone.volume_id)
    assert env.snapshots_of(src_pool, src_image) == []  # the trashed hidden snapshot went with it
    env.delete(source.volume_id)


def test_half_created_volumes_are_deleted_completely(env, tmp_path):
    """DeleteVolume of what a crash left: a reservation without image, an image without
    metadata, a clone whose source still has the hidden snapshot it was made from."""
    import rbd
    c = env.cluster
    pool = c.rep_pool
    pool_id = c.mon_command("osd pool get", pool=pool, var="size")["pool_id"]
    source = env.create("half-source")
    src_pool, src_image = image_of(source)

    def reserve(name, uuid_, source_volume_id=""):
        record = {"uuid": uuid_, "name": name, "state": "creating", "requested_bytes": 64 * MiB,
                  "cluster": CLUSTER_ID,
                  "size_bytes": 64 * MiB, "source_snapshot_id": "",
                  "source_volume_id": source_volume_id, "data_pool": "",
                  "features": "layering,exclusive-lock,object-map,fast-diff,deep-flatten",
                  "type": "replicated", "parameters": {}, "created_at": time.time()}
        import rados
        with c.ioctx(pool) as ioctx, rados.WriteOpCtx() as op:
            ioctx.set_omap(op, (f"name.{name}", f"vol.{uuid_}"),
                           (uuid_.encode(), json.dumps(record).encode()))
            ioctx.operate_write_op(op, VOLUMES_OBJECT)
        return f"rbd-{uuid_}-{pool_id}-{CLUSTER_ID}"

    # 1. reserved, no image yet
    only_record = reserve("half-1", "1" * 32)
    # 2. reserved and image made, no metadata
    with_image = reserve("half-2", "2" * 32)
    with c.ioctx(pool) as ioctx:
        rbd.RBD().create(ioctx, "pv-" + "2" * 32, 64 * MiB, old_format=False, features=61)
    # 3. a clone from a volume: hidden snapshot made, clone made, snapshot not yet removed
    clone = reserve("half-3", "3" * 32, source_volume_id=source.volume_id)
    with c.ioctx(pool) as ioctx:
        with rbd.Image(ioctx, src_image) as image:
            image.create_snap("pvc-" + "3" * 32)
    c.rbd("clone", "--rbd-default-clone-format", "2", f"{pool}/{src_image}@pvc-{'3' * 32}",
          f"{pool}/pv-{'3' * 32}")

    for volume_id in (only_record, with_image, clone):
        env.delete(volume_id)
    assert env.images(pool) == [src_image]
    assert sorted(env.omap(pool)) == ["name.half-source", f"vol.{src_image.removeprefix('pv-')}"]
    assert env.snapshots_of(src_pool, src_image) == []  # hidden snapshot gone (not even in trash)

    # and a retried CreateVolume of a reservation-only volume finishes it instead
    reserve("half-4", "4" * 32)
    volume = env.create("half-4")
    assert image_of(volume)[1] == "pv-" + "4" * 32 and volume.capacity_bytes == 64 * MiB
    env.delete(volume.volume_id)
    env.delete(source.volume_id)
    assert env.images(pool) == []


# --- expansion ------------------------------------------------------------------------------------

@pytest.mark.parametrize("class_type", CLASSES)
def test_expand_online_and_the_node_grows_the_filesystem_on_restage(env, class_type):
    volume = env.create(f"expand-{class_type}", class_type, size=64 * MiB)
    name = f"expand-{class_type}"
    try:
        target = env.stage(volume, name)
        before = os.statvfs(target).f_blocks * os.statvfs(target).f_frsize
        Path(target, "data").write_bytes(os.urandom(MiB))
        answer = env.plugin.controller.ControllerExpandVolume(csi_pb2.ControllerExpandVolumeRequest(
            volume_id=volume.volume_id, capacity_range=csi_pb2.CapacityRange(
                required_bytes=160 * MiB), secrets=env.secrets), timeout=120)
        assert answer.capacity_bytes == 160 * MiB and answer.node_expansion_required
        assert env.image_info(*image_of(volume))["size"] == 160 * MiB
        code, message, _ = code_of(lambda: env.plugin.node.NodeExpandVolume(
            csi_pb2.NodeExpandVolumeRequest(
                volume_id=volume.volume_id, volume_path=target,
                capacity_range=csi_pb2.CapacityRange(required_bytes=160 * MiB)), timeout=120))
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "staged again" in message, message
        env.unstage(volume, name)
        target = env.stage(volume, name)
        after = os.statvfs(target).f_blocks * os.statvfs(target).f_frsize
        assert after > before + 80 * MiB, (before, after)
        assert len(Path(target, "data").read_bytes()) == MiB
    finally:
        with contextlib.suppress(grpc.RpcError):
            env.unstage(volume, name)
        env.delete(volume.volume_id)


# --- snapshots, clones, flatten ----------------------------------------------------------------------

def _write_marker(env, volume, name, text) -> None:
    target = env.stage(volume, name)
    Path(target, "marker").write_text(text)
    os.sync()
    env.unstage(volume, name)


def _read_marker(env, volume, name) -> str:
    target = env.stage(volume, name)
    try:
        return Path(target, "marker").read_text()
    finally:
        env.unstage(volume, name)


def test_snapshot_restore_clone_and_flatten_policy(env):
    c = env.cluster
    pool = c.rep_pool
    original = env.create("snap-original", size=64 * MiB)
    _write_marker(env, original, "snap-original", "generation 0")
    made = []
    snapshots = []
    try:
        # a chain: volume -> snapshot -> restored volume -> snapshot -> ...; the 4th link
        # would read through 4 ancestors, more than max_clone_depth (3): it is flattened
        current = original
        for generation in range(1, 5):
            snapshot = env.snapshot(current.volume_id, f"snap-gen-{generation}")
            snapshots.append(snapshot)
            assert snapshot.ready_to_use and snapshot.size_bytes == current.capacity_bytes
            assert snapshot.source_volume_id == current.volume_id
            again = env.snapshot(current.volume_id, f"snap-gen-{generation}")
            assert again.snapshot_id == snapshot.snapshot_id
            restored = env.create(f"snap-gen-{generation}", size=96 * MiB, source=csi_pb2.VolumeContentSource(
                snapshot=csi_pb2.VolumeContentSource.SnapshotSource(snapshot_id=snapshot.snapshot_id)))
            made.append(restored)
            assert restored.content_source.snapshot.snapshot_id == snapshot.snapshot_id
            assert restored.capacity_bytes == 96 * MiB
            info = env.image_info(*image_of(restored))
            if generation <= 3:
                assert info["parent"]["image"] == image_of(current)[1], info
            else:
                assert "parent" not in info, f"generation {generation} was not flattened: {info}"
            assert _read_marker(env, restored, f"snap-gen-{generation}") == f"generation {generation - 1}"
            _write_marker(env, restored, f"snap-gen-{generation}", f"generation {generation}")
            current = restored

        # a snapshot name is unique: the same name for another volume is ALREADY_EXISTS
        code, _, _ = code_of(lambda: env.snapshot(original.volume_id, "snap-gen-2"))
        assert code == grpc.StatusCode.ALREADY_EXISTS
        listed = env.plugin.controller.ListSnapshots(csi_pb2.ListSnapshotsRequest(
            source_volume_id=original.volume_id, secrets=env.secrets), timeout=60).entries
        assert [e.snapshot.snapshot_id for e in listed] == [snapshots[0].snapshot_id]
        got = env.plugin.controller.GetSnapshot(csi_pb2.GetSnapshotRequest(
            snapshot_id=snapshots[1].snapshot_id, secrets=env.secrets), timeout=60).snapshot
        assert got.source_volume_id == made[0].volume_id

        # a clone of a volume (through a hidden snapshot, removed right after)
        clone = env.create("clone-of-original", size=64 * MiB, source=csi_pb2.VolumeContentSource(
            volume=csi_pb2.VolumeContentSource.VolumeSource(volume_id=original.volume_id)))
        made.append(clone)
        assert _read_marker(env, clone, "clone-of-original") == "generation 0"
        user_snaps = [s for s in env.snapshots_of(pool, image_of(original)[1])
                      if s["namespace"]["type"] == "user"]
        assert [s["name"] for s in user_snaps] == ["pvs-" + snapshots[0].snapshot_id.split("-")[3]]
        # cross-class restore: the replicated snapshot into an erasure-coded volume
        into_ec = env.create("snap-into-ec", "erasure-coded", source=csi_pb2.VolumeContentSource(
            snapshot=csi_pb2.VolumeContentSource.SnapshotSource(snapshot_id=snapshots[0].snapshot_id)))
        made.append(into_ec)
        assert env.image_info(*image_of(into_ec))["data_pool"] == c.ec_data_pool
        assert _read_marker(env, into_ec, "snap-into-ec") == "generation 0"
        # too small for its source
        code, _, _ = code_of(lambda: env.create("too-small", size=32 * MiB, source=csi_pb2.VolumeContentSource(
            snapshot=csi_pb2.VolumeContentSource.SnapshotSource(snapshot_id=snapshots[0].snapshot_id))))
        assert code == grpc.StatusCode.OUT_OF_RANGE
    finally:
        # volumes first, in any order: parents with clones or snapshots stay in RBD until freed
        for volume in [original, *made]:
            env.delete(volume.volume_id)
        assert not env.plugin.controller.ListVolumes(csi_pb2.ListVolumesRequest(), timeout=60).entries
        for snapshot in snapshots:
            env.delete_snapshot(snapshot.snapshot_id)
    assert env.images(pool) == [] and env.images(c.ec_meta_pool) == []
    assert env.omap(pool) == {} and env.omap(pool, SNAPSHOTS_OBJECT) == {}


def test_deleting_a_volume_keeps_its_snapshot_usable(env):
    c = env.cluster
    volume = env.create("keep-snap-source", "erasure-coded")
    _write_marker(env, volume, "keep-snap-source", "kept")
    snapshot = env.snapshot(volume.volume_id, "keep-snap")
    env.delete(volume.volume_id)  # RBD cannot remove an image with snapshots: CSI-deleted, kept
    listed = env.plugin.controller.ListVolumes(csi_pb2.ListVolumesRequest(), timeout=60).entries
    assert volume.volume_id not in [e.volume.volume_id for e in listed]
    assert image_of(volume)[1] in env.images(c.ec_meta_pool)
    restored = env.create("keep-snap-restored", "erasure-coded", source=csi_pb2.VolumeContentSource(
        snapshot=csi_pb2.VolumeContentSource.SnapshotSource(snapshot_id=snapshot.snapshot_id)))
    assert _read_marker(env, restored, "keep-snap-restored") == "kept"
    env.delete_snapshot(snapshot.snapshot_id)
    assert image_of(volume)[1] in env.images(c.ec_meta_pool)  # the restored clone still reads it
    env.delete(restored.volume_id)
    assert env.images(c.ec_meta_pool) == []
    assert env.omap(c.ec_meta_pool) == {} and env.omap(c.ec_meta_pool, SNAPSHOTS_OBJECT) == {}


# --- data path ------------------------------------------------------------------------------------

@pytest.mark.parametrize("class_type", CLASSES)
def test_block_volume_written_and_read_back_through_the_plugin(env, class_type):
    volume = env.create(f"block-{class_type}", class_type, size=64 * MiB, block=True)
    name = f"block-{class_type}"
    data = os.urandom(4 * MiB)
    try:
        target = env.stage(volume, name, block=True)
        with open(target, "r+b", buffering=0) as device:
            device.seek(8 * MiB)
            device.write(data)
            os.fsync(device.fileno())
        env.unstage(volume, name)
        target = env.stage(volume, name, block=True)
        with open(target, "rb") as device:
            device.seek(8 * MiB)
            assert hashlib.sha256(device.read(4 * MiB)).digest() == hashlib.sha256(data).digest()
            device.seek(0, os.SEEK_END)
            assert device.tell() == 64 * MiB
    finally:
        with contextlib.suppress(grpc.RpcError):
            env.unstage(volume, name)
        env.delete(volume.volume_id)


def test_io_continues_while_an_osd_is_down(env, tmp_path):
    """fio writes (crc32c-verified, iodepth 32, 4k-1m blocks) to a mounted volume of each
    class; one OSD is stopped a second in; the writes and the verifying reads finish without
    an error while it is down; the OSD comes back and the cluster returns to HEALTH_OK."""
    c = env.cluster
    volumes = {t: env.create(f"osd-down-{t}", t, size=160 * MiB) for t in CLASSES}
    targets = {t: env.stage(v, f"osd-down-{t}") for t, v in volumes.items()}
    results = {}

    def run_fio(class_type):
        argv = ["fio", "--name=osd-down", f"--filename={targets[class_type]}/fio.dat",
                "--size=96M", "--rw=randwrite", "--bsrange=4k-1m", "--ioengine=libaio",
                "--iodepth=32", "--direct=1", "--verify=crc32c", "--verify_fatal=1",
                "--rate=16m", "--output-format=json"]
        results[class_type] = subprocess.run(argv, capture_output=True, text=True, timeout=300)

    osd = c.osd_ids[-1]
    threads = [threading.Thread(target=run_fio, args=(t,)) for t in CLASSES]
    try:
        for thread in threads:
            thread.start()
        time.sleep(1.0)
        down_after = c.stop_osd(osd)
        for thread in threads:
            thread.join(timeout=300)
        assert not [t for t in threads if t.is_alive()]
        assert not c.osd_up(osd), "the OSD came back before fio finished: the test proved nothing"
        for class_type, done in results.items():
            assert done.returncode == 0, f"{class_type}: {done.stdout[-2000:]} {done.stderr[-2000:]}"
            job = json.loads(done.stdout)["jobs"][0]
            assert job["error"] == 0 and job["write"]["io_bytes"] >= 96 * MiB, job
            assert job["read"]["io_bytes"] >= 96 * MiB  # the verify pass read it all back
        print(f"\nosd.{osd} marked down {down_after:.1f}s after the stop; fio: "
              + ", ".join(f"{t} write {json.loads(r.stdout)['jobs'][0]['write']['bw'] / 1024:.1f} MiB/s"
                          for t, r in results.items()))
    finally:
        if c.osd_pid(osd) is None:
            c.start_osd(osd)
        for class_type, volume in volumes.items():
            with contextlib.suppress(grpc.RpcError):
                env.unstage(volume, f"osd-down-{class_type}")
            env.delete(volume.volume_id)
    print(f"HEALTH_OK again {c.wait_healthy(timeout=180):.1f}s after the OSD restarted")


# --- ControllerPublish: one node per volume ----------------------------------------------------------

PUBLISH_CAPABILITY = csi_pb2.ControllerServiceCapability.RPC.PUBLISH_UNPUBLISH_VOLUME


@pytest.mark.parametrize("class_type", CLASSES)
def test_publish_records_one_node_per_volume_in_ceph(env, tmp_path, class_type):
    """A volume is published to one node, read-write or read-only; the publication is a record
    in the pool (it survives a controller restart and is seen by any controller) and shows in
    ControllerGetVolume and ListVolumes; unpublish is idempotent and ignores other nodes."""
    precondition, exists = grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.ALREADY_EXISTS
    capabilities = env.plugin.controller.ControllerGetCapabilities(
        csi_pb2.ControllerGetCapabilitiesRequest(), timeout=60).capabilities
    assert PUBLISH_CAPABILITY in [c.rpc.type for c in capabilities]
    volume = env.create(f"publish-{class_type}", class_type)
    pool, image = image_of(volume)
    key = f"pub.{image.removeprefix('pv-')}"
    controller = Plugin(tmp_path / "controller", extra_args=[
        "--ceph-config", str(env.config), "--role", "controller", "--nodes", "node-a,node-b"])
    try:
        answer = env.publish(volume, "node-a")
        assert dict(answer.publish_context) == {"polyvol.csi.io/readonly": "false"}
        assert env.publish(volume, "node-a") == answer  # idempotent
        record = json.loads(env.omap(pool)[key])
        assert (record["schema"], record["node_id"], record["readonly"]) == (1, "node-a", False)
        code, message, _ = code_of(lambda: env.publish(volume, "node-b"))
        assert code == precondition and "node-a" in message, message
        code, message, _ = code_of(lambda: env.publish(volume, "node-a", readonly=True))
        assert code == exists and "read-write" in message, message
        code, message, _ = code_of(lambda: env.publish(volume, "node-c"))
        assert code == grpc.StatusCode.NOT_FOUND and "node-c" in message, message
        assert env.published_nodes(volume) == (["node-a"], ["node-a"])
        env.unpublish(volume, "node-b")  # published elsewhere: nothing to undo
        assert json.loads(env.omap(pool)[key])["node_id"] == "node-a"

        # Another controller process: it has no credentials until a request brings them (so
        # the StorageClass names a controller-publish secret), then it sees the publication.
        controller.start()
        code, message, _ = code_of(lambda: env.publish(volume, "node-b", plugin=controller,
                                                       secrets={}))
        assert code == precondition and "credentials" in message, message
        assert env.publish(volume, "node-a", plugin=controller) == answer
        controller.restart(kill=True)
        code, message, _ = code_of(lambda: env.publish(volume, "node-b", plugin=controller))
        assert code == precondition and "node-a" in message, message
        assert env.published_nodes(volume, plugin=controller) == (["node-a"], ["node-a"])
        env.unpublish(volume, "node-a", plugin=controller)
        env.unpublish(volume, "node-a", plugin=controller)  # idempotent
        assert key not in env.omap(pool)
        assert env.published_nodes(volume) == ([], [])

        # free again: node-b read-only; "" unpublishes from whichever node has it
        answer = env.publish(volume, "node-b", readonly=True)
        assert dict(answer.publish_context) == {"polyvol.csi.io/readonly": "true"}
        env.publish(volume, "node-b", readonly=True)
        code, message, _ = code_of(lambda: env.publish(volume, "node-b"))
        assert code == exists and "read-only" in message, message
        assert env.published_nodes(volume, plugin=controller) == (["node-b"], ["node-b"])
        env.unpublish(volume, "")
        assert key not in env.omap(pool)
        env.publish(volume, "node-a")
    finally:
        controller.stop()
        # a published volume can be deleted (Kubernetes never does, but a stale publication
        # must not pin a volume): its publication goes with its record
        env.delete(volume.volume_id)
    assert not [k for k in env.omap(pool) if image.removeprefix("pv-") in k]
    for node in ("node-a", "node-b", ""):
        env.unpublish(volume, node)  # the volume is gone: nothing to undo
    code, _, _ = code_of(lambda: env.publish(volume, "node-a"))
    assert code == grpc.StatusCode.NOT_FOUND


def test_publish_is_a_compare_and_swap_and_refuses_newer_records(env):
    """Two controllers (or a DeleteVolume racing a publish) cannot both win: the record is
    written only if what was read is unchanged. A record of a newer schema is refused, not
    guessed at."""
    import rados
    from driver.backends import ceph
    volume = env.create("publish-swap")
    pool, image = image_of(volume)
    key = f"pub.{image.removeprefix('pv-')}"
    try:
        with env.cluster.ioctx(pool) as ioctx:
            backend = ceph.CephBackend
            assert backend._omap_swap(ioctx, VOLUMES_OBJECT, {key: ""}, set_={key: '{"x": 1}'})
            assert not backend._omap_swap(ioctx, VOLUMES_OBJECT, {key: ""}, set_={key: '{"x": 2}'})
            assert not backend._omap_swap(ioctx, VOLUMES_OBJECT, {key: '{"x": 2}'}, remove=[key])
            assert env.omap(pool)[key] == '{"x": 1}'
            newer = json.dumps({"schema": 2, "node_id": "node-a", "readonly": False})
            assert backend._omap_swap(ioctx, VOLUMES_OBJECT, {key: '{"x": 1}'}, set_={key: newer})
        code, message, _ = code_of(lambda: env.publish(volume, "node-a"))
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "schema 2" in message, message
        with env.cluster.ioctx(pool) as ioctx, rados.WriteOpCtx() as op:
            ioctx.remove_omap_keys(op, (key,))
            ioctx.operate_write_op(op, VOLUMES_OBJECT)
    finally:
        env.delete(volume.volume_id)


def _helper_pids(below: Path, name: str) -> list[int]:
    """Live processes called `name` whose command line names a path below `below`."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                argv = Path(f"/proc/{entry}/cmdline").read_bytes().decode(errors="replace")
                state = Path(f"/proc/{entry}/stat").read_text().rpartition(")")[2].split()[0]
                if state != "Z" and name in argv and str(below) in argv:
                    pids.append(int(entry))
    return pids


def test_a_lost_nodes_volume_moves_to_another_node(env, workdir):
    """Node A stages the volume and writes; then A is lost: its plugin and its Ceph client die,
    and the client's watch and exclusive lock linger (~30 s). Kubernetes' force-detach
    (ControllerUnpublish from A) and the publish to node B answer at once: they never touch
    the image, so nothing waits for A. B's stage fences A (blocklist) and reads A's data."""
    # workdir: short paths (the attach's unix sockets live in the state directory)
    nodes = {node: Plugin(workdir / node, node_id=node,
                          extra_args=["--ceph-config", str(env.config), "--role", "node"])
             for node in ("node-a", "node-b")}
    name = "lost-node"
    volume = env.create(name, size=128 * MiB)
    pool, image = image_of(volume)
    try:
        for plugin in nodes.values():
            plugin.start()
        context = env.publish(volume, "node-a").publish_context
        target = env.stage(volume, name, plugin=nodes["node-a"], publish_context=context)
        Path(target, "marker").write_text("written on node A")
        os.sync()
        [owner] = json.loads(env.cluster.rbd("lock", "ls", f"{pool}/{image}", "--format", "json"))

        nodes["node-a"].stop(kill=True)
        for pid in _helper_pids(workdir / "node-a", "qemu-storage-daemon"):
            os.kill(pid, signal.SIGKILL)  # the Ceph client of node A: its lock stays behind
        code, message, _ = code_of(lambda: env.publish(volume, "node-b"))
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "node-a" in message, message

        started = time.monotonic()
        env.unpublish(volume, "node-a")  # Kubernetes: force-detach of the lost node
        context = env.publish(volume, "node-b").publish_context
        controller_seconds = time.monotonic() - started
        still_locked = json.loads(env.cluster.rbd("lock", "ls", f"{pool}/{image}", "--format", "json"))
        assert [o["address"] for o in still_locked] == [owner["address"]]  # A's lock was there
        started = time.monotonic()
        target = env.stage(volume, name, plugin=nodes["node-b"], publish_context=context)
        stage_seconds = time.monotonic() - started
        print(f"\nunpublish from lost node A + publish to B {controller_seconds:.3f}s; "
              f"stage on B (fencing A) {stage_seconds:.1f}s")
        assert controller_seconds < 2, controller_seconds
        assert Path(target, "marker").read_text() == "written on node A"
        Path(target, "marker").write_text("written on node B")
        os.sync()
        assert owner["address"] in env.cluster.ceph("osd", "blocklist", "ls")
        assert env.published_nodes(volume) == (["node-b"], ["node-b"])

        nodes["node-a"].start()  # A comes back: kubelet unstages what it had there
        started = time.monotonic()
        nodes["node-a"].unpublish_and_unstage(volume.volume_id, name)
        print(f"unstage of the fenced attachment on node A {time.monotonic() - started:.1f}s")
        assert _helper_pids(workdir / "node-a", "nbdfuse") == []
        assert mounts_under(workdir / "node-a") == [] and loops_under(workdir / "node-a") == []
        assert Path(target, "marker").read_text() == "written on node B"  # B is unaffected
    finally:
        for node, plugin in nodes.items():
            if plugin.process is None:
                plugin.start()  # A comes back: kubelet unstages what it had
            with contextlib.suppress(grpc.RpcError):
                plugin.unpublish_and_unstage(volume.volume_id, name)
            plugin.stop()
        env.unpublish(volume, "")
        env.delete(volume.volume_id)
    assert _helper_pids(workdir, "qemu-storage-daemon") == []
    assert _helper_pids(workdir, "nbdfuse") == []
    assert mounts_under(workdir) == [] and loops_under(workdir) == []


def test_nothing_is_left_in_the_pools(env):
    c = env.cluster
    for pool in (c.rep_pool, c.ec_meta_pool):
        assert env.images(pool) == []
        assert env.omap(pool) == {} and env.omap(pool, SNAPSHOTS_OBJECT) == {}
    assert not env.plugin.controller.ListVolumes(csi_pb2.ListVolumesRequest(), timeout=60).entries
