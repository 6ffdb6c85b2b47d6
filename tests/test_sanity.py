"""csi-sanity, the CSI conformance suite of kubernetes-csi/csi-test, against a real plugin.

One csi-sanity run per entry of CASES (a storage class in one access type). A run passes when
csi-sanity exits 0, no spec failed, more than MIN_PASSED specs passed, every skipped spec was
skipped for a reason listed in ALLOWED_SKIPS (an unexplained skip fails the run), the plugin
ran the tools that prove the case exercised what it names (mkfs.xfs for the xfs case, ...),
and nothing was left behind: no volume, no snapshot, no mount, no loop device.

The counts come from csi-sanity's JUnit report, not from its console output.

    python tests/test_sanity.py      # print the skip table (Markdown), as in tests/sanity/skips.md

To add a storage class (remote-disk, replicated, erasure-coded): add Case entries; a class that
needs a service running (a storage server, a Ceph cluster) gives a `services` context manager
that starts it and yields the extra plugin arguments that point the plugin at it (and, as an
optional third element, extra csi-sanity arguments such as `--csi.secrets FILE`). A services
hook that needs pytest fixtures (the session's Ceph cluster) names them in `fixtures`; they are
passed to it as keyword arguments.
"""

import contextlib
import json
import os
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ContextManager

import grpc
import pytest

from ceph_cluster import ceph_cluster  # noqa: F401 - the session fixture, for the Ceph cases
from conftest import REPO, Plugin
from remote_lab import RemoteCluster
from driver.proto import csi_pb2

MiB = 1 << 20
CSI_TEST_MODULE = "github.com/kubernetes-csi/csi-test/v5"
CSI_TEST_VERSION = "v5.6.0"  # ALLOWED_SKIPS was checked against this version's pkg/sanity
SANITY_BINARY = REPO / ".work" / "bin" / "csi-sanity"  # where scripts/setup.sh installs it
SANITY_TIMEOUT = 900  # seconds for one whole csi-sanity run
MIN_PASSED = 60  # csi-sanity v5.6.0 ran 71 specs against local-ephemeral when this was written
SKIP_PREFIX = "skipped - "  # how Ginkgo's JUnit report starts a skip's message
# The JUnit statuses that are not failures; any other (failed, panicked, timedout, ...) is one.
PASSED, SKIPPED, PENDING = "passed", "skipped", "pending"

# Why csi-sanity skips specs for polyvol: its Skip() message -> the reason. Every skip must be
# here; each line was checked against csi-test v5.6.0's pkg/sanity and the CSI v1.12.0 csi.proto.
_NOT_IN_CSI_1_12 = ("csi-test v5.6.0 is built on CSI v1.13; polyvol implements the CSI v1.12.0 "
                    "spec, which has no {}")
ALLOWED_SKIPS = {
    "ControllerModifyVolume not supported":
        "no polyvol StorageClass type has mutable parameters, so MODIFY_VOLUME is not advertised",
    "Modify volume not supported":
        "creating with a VolumeAttributesClass needs MODIFY_VOLUME; no polyvol type has mutable "
        "parameters",
    "Modify Volume not supported":
        "refusing an invalid VolumeAttributesClass needs MODIFY_VOLUME; no polyvol type has "
        "mutable parameters",
    "GroupControllerService not supported":
        "polyvol does not implement the GroupController service (volume group snapshots)",
    "ControllerGetVolumeHealth not supported":
        _NOT_IN_CSI_1_12.format("ControllerGetVolumeHealth RPC nor GET_VOLUME_HEALTH controller "
                                "capability (polyvol reports health as VOLUME_CONDITION)"),
    "ControllerListVolumeHealth not supported":
        _NOT_IN_CSI_1_12.format("ControllerListVolumeHealth RPC nor LIST_VOLUME_HEALTH controller "
                                "capability"),
    "NodeGetVolumeHealth not supported":
        _NOT_IN_CSI_1_12.format("NodeGetVolumeHealth RPC nor GET_VOLUME_HEALTH node capability "
                                "(polyvol reports VOLUME_CONDITION in NodeGetVolumeStats)"),
    "NodeGetStorageHealth not supported":
        _NOT_IN_CSI_1_12.format("NodeGetStorageHealth RPC nor GET_STORAGE_HEALTH node capability"),
    "SNAPSHOT_ACCESSIBILITY_CONSTRAINTS not supported":
        _NOT_IN_CSI_1_12.format("SNAPSHOT_ACCESSIBILITY_CONSTRAINTS plugin capability"),
}
# Skips of the local-ephemeral cases only: a local volume lives on its node, so the
# local.polyvol.csi.io driver has no attach step (attachRequired: false) and its plugin does
# not advertise PUBLISH_UNPUBLISH_VOLUME. The network classes do, and run these specs.
LOCAL_SKIPS = {
    "ControllerPublishVolume not supported":
        "local volumes live on their node and need no attach step: local.polyvol.csi.io does "
        "not advertise PUBLISH_UNPUBLISH_VOLUME (its CSIDriver says attachRequired: false)",
    "Controller Publish, UnpublishVolume not supported":
        "these lifecycle specs go through ControllerPublishVolume, which the local driver does "
        "not advertise (no attach step for a volume that lives on its node)",
    "ControllerUnpublishVolume not supported":
        "the local driver does not advertise PUBLISH_UNPUBLISH_VOLUME (no attach step)",
}
# As deployed: the local driver's plugin serves only local-ephemeral (see deploy/).
LOCAL_PLUGIN = ("--types", "local-ephemeral")
# Skips of the cases whose plugin advertises PUBLISH_UNPUBLISH_VOLUME: the network classes, and
# a plugin serving every class (the single-machine setup of scripts/run-plugin.sh).
NETWORK_SKIPS = {
    "testnodevolumeattachlimit not enabled":
        "this spec creates MaxVolumesPerNode (256) volumes and runs only with "
        "--csi.testnodevolumeattachlimit; Kubernetes enforces the per-node limit when it "
        "schedules, from the max_volumes_per_node NodeGetInfo reports (CSINode allocatable)",
}
# Specs that csi-test itself disables (XIt), by name -> why; Ginkgo reports them as pending.
ALLOWED_PENDING = {
    "[It] Controller Service [Controller Server] ListVolumes pagination should detect volumes "
    "added between pages and accept tokens when the last volume from a page is deleted":
        "disabled in csi-test v5.6.0 itself (XIt, csi-test issue #223): it runs for no driver",
}


@dataclass(frozen=True)
class Case:
    id: str
    # StorageClass parameters, given to csi-sanity with --csi.testvolumeparameters; None sends
    # none, so the plugin's --default-type (local-ephemeral in tests/conftest.py) applies.
    parameters: dict | None
    size: int  # --csi.testvolumesize
    access_type: str = "mount"  # --csi.testvolumeaccesstype: mount or block
    # Programs the plugin must (not) have run: proof that the case tested what it names.
    must_run: tuple = ()
    must_not_run: tuple = ()
    plugin_args: tuple = ()
    # Skips that only this case may have (message -> reason), on top of ALLOWED_SKIPS.
    extra_allowed_skips: dict = field(default_factory=dict, compare=False)
    # Starts what the class needs (storage servers, a Ceph cluster) in the given directory and
    # yields (extra plugin arguments, argv prefix to start the plugin with, e.g. nsenter into
    # the worker node's network namespace); None when the plugin needs nothing else.
    services: Callable[..., ContextManager[tuple]] | None = field(default=None, compare=False)
    # pytest fixtures the services hook needs (given to it as keyword arguments)
    fixtures: tuple = ()


@contextlib.contextmanager
def remote_disk_cluster(workdir: Path):
    """Three storage servers and the worker node, each in its own network namespace."""
    with RemoteCluster(workdir, servers=3) as cluster:
        yield cluster.plugin_args, cluster.node_prefix


CEPH_CLUSTER_ID = "polyvol-sanity"
# every secret csi-sanity v5.6.0 can send (pkg/sanity CSISecrets) that a Ceph RPC may use
CEPH_SECRET_FIELDS = ("CreateVolumeSecret", "DeleteVolumeSecret", "NodeStageVolumeSecret",
                      "NodePublishVolumeSecret", "CreateSnapshotSecret", "DeleteSnapshotSecret",
                      "ControllerExpandVolumeSecret", "ListSnapshotsSecret", "GetSnapshotSecret",
                      "ControllerValidateVolumeCapabilitiesSecret")


@contextlib.contextmanager
def ceph_services(workdir: Path, ceph_cluster):
    """The session's Ceph cluster: a --ceph-config naming it, and the cephx user's key in a
    0600 csi-sanity secrets file (the only way the key reaches the plugin: request secrets)."""
    config = workdir / "ceph-config.json"
    config.write_text(json.dumps({"clusters": [{"clusterID": CEPH_CLUSTER_ID,
                                                "monitors": [ceph_cluster.mon_host]}]}))
    credentials = {"userID": ceph_cluster.user_id, "userKey": ceph_cluster.user_key}
    secrets = workdir / "sanity-secrets.yaml"
    fd = os.open(secrets, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        json.dump({name: credentials for name in CEPH_SECRET_FIELDS}, out)  # JSON is YAML
    try:
        yield ["--ceph-config", str(config)], [], ["--csi.secrets", str(secrets)]
    finally:
        secrets.unlink(missing_ok=True)


def ceph_parameters(class_type: str) -> dict:
    if class_type == "replicated":
        return {"type": "replicated", "clusterID": CEPH_CLUSTER_ID, "pool": "polyvol-rep"}
    return {"type": "erasure-coded", "clusterID": CEPH_CLUSTER_ID, "pool": "polyvol-ec-meta",
            "dataPool": "polyvol-ec"}


CASES = [
    Case("local-ephemeral-ext4", parameters=None, size=64 * MiB,
         must_run=("LOOP_CONFIGURE", "mkfs.ext4"), must_not_run=("mkfs.xfs",),
         plugin_args=LOCAL_PLUGIN, extra_allowed_skips=LOCAL_SKIPS),
    # mkfs.xfs refuses filesystems under 300 MiB.
    Case("local-ephemeral-xfs", parameters={"type": "local-ephemeral", "fsType": "xfs"},
         size=300 * MiB, must_run=("LOOP_CONFIGURE", "mkfs.xfs"), must_not_run=("mkfs.ext4",),
         plugin_args=LOCAL_PLUGIN, extra_allowed_skips=LOCAL_SKIPS),
    Case("local-ephemeral-block", parameters={"type": "local-ephemeral"}, size=64 * MiB,
         access_type="block", must_run=("LOOP_CONFIGURE",), must_not_run=("mkfs.ext4", "mkfs.xfs"),
         plugin_args=LOCAL_PLUGIN, extra_allowed_skips=LOCAL_SKIPS),
    # One plugin serving every class, as scripts/run-plugin.sh runs it: it advertises
    # publishing for its network classes, so local volumes go through ControllerPublish too.
    Case("local-ephemeral-all-types", parameters=None, size=64 * MiB,
         must_run=("LOOP_CONFIGURE", "mkfs.ext4"), extra_allowed_skips=NETWORK_SKIPS),
    # Through the user-space attach (qemu-storage-daemon TLS-PSK client -> nbdfuse -> loop),
    # the path CI can test: the machine has no nbd kernel module.
    Case("remote-disk-ext4", parameters={"type": "remote-disk", "spreadPolicy": "preferred"},
         size=64 * MiB, must_run=("LOOP_CONFIGURE", "mkfs.ext4", "nbdfuse"), services=remote_disk_cluster,
         extra_allowed_skips=NETWORK_SKIPS),
    Case("remote-disk-block", parameters={"type": "remote-disk", "spreadPolicy": "preferred"},
         size=64 * MiB, access_type="block", must_run=("LOOP_CONFIGURE", "nbdfuse"),
         must_not_run=("mkfs.ext4", "mkfs.xfs"), services=remote_disk_cluster,
         extra_allowed_skips=NETWORK_SKIPS),
    # Ceph RBD through the user-space attach (qemu-storage-daemon with librbd -> NBD on a unix
    # socket -> nbdfuse -> loop): the machine has no rbd kernel module.
    *(Case(f"{class_type}-{access}", parameters=ceph_parameters(class_type), size=64 * MiB,
           access_type=access,
           must_run=("LOOP_CONFIGURE", "nbdfuse", "qemu-storage-daemon")
           + (("mkfs.ext4",) if access == "mount" else ()),
           must_not_run=("mkfs.xfs",) + (("mkfs.ext4",) if access == "block" else ()),
           services=ceph_services, fixtures=("ceph_cluster",), extra_allowed_skips=NETWORK_SKIPS)
      for class_type in ("replicated", "erasure-coded") for access in ("mount", "block")),
]


@dataclass
class SanityReport:
    passed: list = field(default_factory=list)
    failed: list = field(default_factory=list)  # (spec, message)
    skipped: list = field(default_factory=list)  # (spec, message without Ginkgo's prefix)
    pending: list = field(default_factory=list)
    total: int = 0

    def summary(self, allowed_skips: dict) -> str:
        lines = [f"csi-sanity: {len(self.passed)} passed, {len(self.failed)} failed, "
                 f"{len(self.skipped)} skipped, {len(self.pending)} pending, of {self.total} specs"]
        for message, count in sorted(Counter(m for _, m in self.skipped).items()):
            reason = allowed_skips.get(message, "NOT EXPLAINED in ALLOWED_SKIPS")
            lines.append(f"  skipped {count:2d}x {message!r}: {reason}")
        for name in self.pending:
            lines.append(f"  pending {name!r}: {ALLOWED_PENDING.get(name, 'NOT EXPLAINED')}")
        for name, message in self.failed[:20]:
            lines.append(f"  FAILED {name}: {message[:300]}")
        if len(self.failed) > 20:
            lines.append(f"  ... and {len(self.failed) - 20} more failed specs")
        return "\n".join(lines)


def parse_junit(path: Path) -> SanityReport:
    report = SanityReport()
    root = ET.parse(path).getroot()
    for case in root.iter("testcase"):
        report.total += 1
        name = case.get("name", "")
        status = case.get("status", "")
        problem = case.find("failure")
        if problem is None:
            problem = case.find("error")
        skipped = case.find("skipped")
        if problem is not None or status not in (PASSED, SKIPPED, PENDING):
            text = (problem.get("message", "") if problem is not None else "") or status
            report.failed.append((name, text))
        elif status == PASSED:
            report.passed.append(name)
        elif status == PENDING:
            report.pending.append(name)
        else:
            message = skipped.get("message", "") if skipped is not None else ""
            report.skipped.append((name, message.removeprefix(SKIP_PREFIX)))
    # Cross-check with the totals Ginkgo writes on the suite.
    suites = root if root.tag == "testsuites" else None
    if suites is not None and suites.get("tests") is not None:
        assert int(suites.get("tests")) == report.total, "JUnit testcase count disagrees with its total"
        assert int(suites.get("failures", 0)) + int(suites.get("errors", 0)) == len(report.failed), \
            "JUnit failure count disagrees with the failed testcases"
    return report


def find_csi_sanity() -> Path:
    if SANITY_BINARY.exists():
        return SANITY_BINARY
    found = shutil.which("csi-sanity")
    assert found, f"csi-sanity not found at {SANITY_BINARY} nor on PATH: run scripts/setup.sh"
    return Path(found)


def binary_version(binary: Path) -> str | None:
    """The csi-test module version recorded in a Go binary's build information."""
    marker = f"mod\t{CSI_TEST_MODULE}\t".encode()
    data = binary.read_bytes()
    at = data.find(marker)
    if at < 0:
        return None
    return data[at + len(marker):].split(b"\t", 1)[0].decode(errors="replace")


def tail(path: Path, lines: int = 40) -> str:
    if not path.exists():
        return f"({path} does not exist)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def commands_run(plugin: Plugin) -> Counter:
    """Programs the plugin ran: short commands, long-running attach helpers (nbdfuse, ...),
    and the kernel calls it makes in-process instead of a program (LOOP_CONFIGURE, ...)."""
    counted = Counter()
    for entry in plugin.log_lines():
        if entry.get("event") == "command" and entry.get("argv"):
            counted[Path(str(entry["argv"][0])).name] += 1
        elif entry.get("event") == "kernel" and entry.get("call"):
            counted[entry["call"]] += 1
        elif entry.get("event") == "nbd helper started":
            counted[entry.get("what", "")] += 1
    return counted


def leftovers(plugin: Plugin) -> list[str]:
    """What csi-sanity's cleanup should have removed but the plugin still has."""
    try:
        volumes = plugin.controller.ListVolumes(csi_pb2.ListVolumesRequest(), timeout=30).entries
        snapshots = plugin.controller.ListSnapshots(csi_pb2.ListSnapshotsRequest(),
                                                    timeout=30).entries
    except grpc.RpcError as error:
        return [f"could not list volumes and snapshots: {error.code()} {error.details()}"]
    return ([f"volume {e.volume.volume_id} still exists" for e in volumes]
            + [f"snapshot {e.snapshot.snapshot_id} still exists" for e in snapshots])


def host_leftovers(directory: Path) -> list[str]:
    prefix = str(directory) + "/"
    found = [f"mount at {line.split()[4]}" for line in
             Path("/proc/self/mountinfo").read_text().splitlines()
             if line.split()[4].startswith(prefix)]
    listing = subprocess.run(["losetup", "--list", "--json", "-O", "NAME,BACK-FILE"],
                             capture_output=True, text=True, check=True).stdout
    for loop in (json.loads(listing)["loopdevices"] if listing.strip() else []):
        if (loop.get("back-file") or "").startswith(prefix):
            found.append(f"loop device {loop['name']} on {loop['back-file']}")
    return found


def yaml_parameters(parameters: dict) -> str:
    # JSON strings are YAML strings: quoting keeps values like "on" or "1" strings.
    return "".join(f"{json.dumps(k)}: {json.dumps(str(v))}\n" for k, v in parameters.items())


@pytest.mark.root
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_csi_sanity(case: Case, workdir: Path, request):
    binary = find_csi_sanity()
    version = binary_version(binary)
    assert version == CSI_TEST_VERSION, (
        f"{binary} is csi-test {version}, but ALLOWED_SKIPS was checked against "
        f"{CSI_TEST_VERSION}: run scripts/setup.sh (or re-check the table for the new version)")

    junit = workdir / "sanity-junit.xml"
    output = workdir / "sanity-output.txt"
    with contextlib.ExitStack() as stack:
        fixtures = {name: request.getfixturevalue(name) for name in case.fixtures}
        extra, prefix, *more = (stack.enter_context(case.services(workdir, **fixtures))
                                if case.services else ([], []))
        sanity_args = list(more[0]) if more else []
        plugin = Plugin(workdir, extra_args=[*case.plugin_args, *extra], argv_prefix=prefix)
        stack.callback(plugin.stop)
        plugin.start()
        # csi-sanity mkdirs these before each spec and fails if they exist: they must not yet.
        argv = [str(binary), "--csi.endpoint", plugin.endpoint,
                "--csi.mountdir", plugin.path("sanity-target"),
                "--csi.stagingdir", plugin.path("sanity-staging"),
                "--csi.testvolumesize", str(case.size),
                "--csi.testvolumeaccesstype", case.access_type,
                "--ginkgo.junit-report", str(junit), "--ginkgo.no-color", *sanity_args]
        if case.parameters is not None:
            parameters_file = workdir / "sanity-parameters.yaml"
            parameters_file.write_text(yaml_parameters(case.parameters))
            argv += ["--csi.testvolumeparameters", str(parameters_file)]
        with open(output, "w") as out:
            try:
                returncode = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, cwd=workdir,
                                            timeout=SANITY_TIMEOUT).returncode
            except subprocess.TimeoutExpired:
                returncode = None
        left = leftovers(plugin)
        plugin.stop()
        commands = commands_run(plugin)
    left += host_leftovers(workdir)

    def diagnostics() -> str:
        return (f"\n--- csi-sanity output (tail) ---\n{tail(output)}"
                f"\n--- plugin log (tail) ---\n{tail(plugin.log_path)}")

    assert returncode is not None, f"csi-sanity ran longer than {SANITY_TIMEOUT} s{diagnostics()}"
    assert junit.exists(), f"csi-sanity wrote no JUnit report (exit {returncode}){diagnostics()}"
    report = parse_junit(junit)
    allowed_skips = {**ALLOWED_SKIPS, **case.extra_allowed_skips}
    print(f"\n[{case.id}] {report.summary(allowed_skips)}")

    problems = []
    if report.failed:
        problems.append(f"{len(report.failed)} specs failed: {[n for n, _ in report.failed]}")
    if returncode != 0:
        problems.append(f"csi-sanity exited {returncode}")
    if len(report.passed) <= MIN_PASSED:
        problems.append(f"only {len(report.passed)} specs passed (expected more than {MIN_PASSED})")
    unexplained = sorted({m for _, m in report.skipped if m not in allowed_skips})
    if unexplained:
        problems.append(f"skips not explained in ALLOWED_SKIPS: {unexplained}")
    unexplained_pending = [n for n in report.pending if n not in ALLOWED_PENDING]
    if unexplained_pending:
        problems.append(f"pending specs not in ALLOWED_PENDING: {unexplained_pending}")
    missing = [c for c in case.must_run if not commands[c]]
    if missing:
        problems.append(f"the plugin never ran {missing}: the case did not test what it names")
    unexpected = [c for c in case.must_not_run if commands[c]]
    if unexpected:
        problems.append(f"the plugin ran {unexpected}, which this case must not need")
    if left:
        problems.append(f"left behind after csi-sanity's cleanup: {left}")
    assert not problems, "\n".join([report.summary(allowed_skips), *problems]) + diagnostics()


def skip_table_markdown() -> str:
    lines = [f"# Specs csi-sanity {CSI_TEST_VERSION} skips for polyvol, and why",
             "",
             "Generated by `python tests/test_sanity.py` from ALLOWED_SKIPS and ALLOWED_PENDING; "
             "tests/test_sanity.py fails on any skip not listed here and keeps this file current.",
             "",
             "| csi-sanity skip message | why |",
             "|---|---|"]
    lines += [f"| {message} | {reason} |" for message, reason in ALLOWED_SKIPS.items()]
    for extra in (LOCAL_SKIPS, NETWORK_SKIPS):
        ids = ", ".join(f"`{c.id}`" for c in CASES if c.extra_allowed_skips is extra)
        lines += ["", f"Only for {ids}:", "", "| csi-sanity skip message | why |", "|---|---|"]
        lines += [f"| {m} | {r} |" for m, r in extra.items()]
    lines += ["", "| pending spec | why |", "|---|---|"]
    lines += [f"| {name} | {reason} |" for name, reason in ALLOWED_PENDING.items()]
    return "\n".join(lines) + "\n"


SKIP_TABLE_FILE = Path(__file__).resolve().parent / "sanity" / "skips.md"


def test_skip_table_document_is_current():
    assert SKIP_TABLE_FILE.exists() and SKIP_TABLE_FILE.read_text() == skip_table_markdown(), (
        f"{SKIP_TABLE_FILE} differs from ALLOWED_SKIPS: "
        f"run python tests/test_sanity.py > {SKIP_TABLE_FILE.relative_to(REPO)}")


if __name__ == "__main__":
    sys.stdout.write(skip_table_markdown())
