"""The remote-disk storage server end to end: `polyvol storage-server` as a subprocess with
real nbdkit, real mutual TLS and TLS-PSK, on 127.0.0.1, driven through StorageClient and
checked from the outside with nbdinfo/nbdcopy (libnbd) as a node would see it.

Every server is stopped after its test, and teardown fails the test if any nbdkit started
for its data directory is still running.
"""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
import pytest

from conftest import json_lines
from driver import errors
from driver.proto import storage_pb2, storage_pb2_grpc
from driver.storage import snapshot_id, volume_id
from driver.storage.client import StorageClient

REPO = Path(__file__).resolve().parent.parent
MiB = 1 << 20
IDENTITY = "node-a"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def polyvol(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "driver.cli", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=60)


def nbdkit_pids(below: Path) -> list[int]:
    """nbdkit processes whose command line names a path below `below`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and argv[0].endswith(b"nbdkit") and any(str(below).encode() in a for a in argv):
            found.append(int(entry.name))
    return found


def parent_of(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(status.split("\nPPid:\t", 1)[1].split("\n", 1)[0])


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


@pytest.fixture(scope="module")
def keys():
    """A certificate bundle and a PSK file, made with the CLI as an operator would."""
    directory = Path(tempfile.mkdtemp(prefix="polyvol-storage-keys-"))
    try:
        made = polyvol("storage", "certs", "--dir", str(directory / "tls"))
        assert made.returncode == 0, made.stderr
        made = polyvol("storage", "psk", "--identity", IDENTITY, "--out", str(directory / "psk"))
        assert made.returncode == 0, made.stderr
        yield directory
    finally:
        shutil.rmtree(directory)


class StorageServer:
    def __init__(self, workdir: Path, keys: Path, name: str = "s1"):
        self.workdir, self.keys, self.name = workdir, keys, name
        self.data_dir = workdir / "data"
        self.port, self.nbd_port = free_port(), free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.tls_dir, self.psk = keys / "tls", keys / "psk"
        self.log_path = workdir / "server.log"
        self.process = None

    def start(self, *extra: str) -> None:
        seen = len(self.log_lines())  # earlier runs' lines, when restarted
        argv = [sys.executable, "-m", "driver.cli", "storage-server", "--name", self.name,
                "--data-dir", str(self.data_dir), "--listen", self.address,
                "--nbd-listen", f"127.0.0.1:{self.nbd_port}", "--tls-dir", str(self.tls_dir),
                "--nbd-psk-file", str(self.psk), "--label", "rack=r1", "--log-level", "debug", *extra]
        with open(self.log_path, "a") as log:
            self.process = subprocess.Popen(argv, stdout=log, stderr=log, cwd=REPO)
        wait_for(lambda: self.process.poll() is not None or any(
            line.get("event") == "serving" for line in self.log_lines()[seen:]), 20, "the server")
        assert self.process.poll() is None, self.log_path.read_text()[-3000:]

    def stop(self, sig=signal.SIGTERM) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(sig)
            self.process.wait(timeout=30)
        self.process = None

    def log_lines(self) -> list[dict]:
        return json_lines(self.log_path)

    def client(self, tls_dir: Path | None = None) -> StorageClient:
        return StorageClient(self.address, str(tls_dir or self.tls_dir), timeout=10)

    def uri(self, export: str = "", psk: Path | None = None, identity: str = IDENTITY) -> str:
        return (f"nbds://{identity}@127.0.0.1:{self.nbd_port}/{export}"
                f"?tls-psk-file={psk or self.psk}")

    def exports(self) -> list[str]:
        listing = subprocess.run(["nbdinfo", "--list", "--json", self.uri()], capture_output=True,
                                 text=True, timeout=30, check=True).stdout
        return sorted(e["export-name"] for e in json.loads(listing)["exports"])

    def hold_open(self, export: str) -> subprocess.Popen:
        """A node holding the export open: an nbdkit NBD proxy on a unix socket whose one
        shared upstream connection (TLS-PSK) is made at start and kept."""
        sock = self.workdir / f"{export[:12]}.sock"
        holder = subprocess.Popen(
            ["nbdkit", "--foreground", "--exit-with-parent", "-U", str(sock), "nbd",
             "hostname=127.0.0.1", f"port={self.nbd_port}", f"export={export}", "tls=require",
             f"tls-psk={self.psk}", f"tls-username={IDENTITY}", "shared=true"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        holder.uri = f"nbd+unix:///?socket={sock}"  # writes through the attachment
        return holder


def nbdinfo(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["nbdinfo", *args], capture_output=True, text=True, timeout=30)


def make_server(keys: Path, *extra: str, workdir: Path | None = None):
    workdir = workdir or Path(tempfile.mkdtemp(prefix="polyvol-storage-"))
    server = StorageServer(workdir, keys)
    try:
        server.start(*extra)
        yield server
    finally:
        server.stop()
        leftover = nbdkit_pids(workdir)
        for pid in leftover:
            os.kill(pid, signal.SIGKILL)
        subprocess.run(["rm", "-rf", "--one-file-system", str(workdir)], check=False)
        assert not leftover, f"nbdkit left running after the server stopped: {leftover}"


@pytest.fixture(scope="module")
def server(keys):
    yield from make_server(keys, "--reconnect-grace", "0")


@pytest.fixture
def client(server):
    with server.client() as connected:
        yield connected


def vid(n: int, server_name: str = "s1") -> str:
    return volume_id(f"{n:032x}", server_name)


def sid(n: int, server_name: str = "s1") -> str:
    return snapshot_id(f"{n:032x}", server_name)


def write_pattern(server: StorageServer, export: str, workdir: Path, seed: int) -> bytes:
    pattern = bytes((seed + i) % 251 for i in range(MiB))
    source = workdir / f"pattern-{seed}"
    source.write_bytes(pattern)
    subprocess.run(["nbdcopy", str(source), server.uri(export)], check=True, timeout=60)
    return pattern


def read_head(server: StorageServer, export: str, workdir: Path, length: int = MiB) -> bytes:
    target = workdir / f"read-{export}"
    subprocess.run(["nbdcopy", server.uri(export), str(target)], check=True, timeout=60)
    return target.read_bytes()[:length]


# --- the control API ---

def test_volume_lifecycle_through_the_client(server, client):
    info = client.get_info()
    assert (info.name, dict(info.labels), info.nbd_address, info.nbd_tls, info.api_version) == \
        ("s1", {"rack": "r1"}, f"127.0.0.1:{server.nbd_port}", True, 3)
    assert info.version
    before = client.get_capacity()
    assert 0 < before.available_bytes <= before.total_bytes

    volume = client.create_volume(vid(1), "pvc-a", 16 * MiB, {"fsType": "xfs"}, spread_group="kafka")
    assert (volume.size_bytes, dict(volume.parameters), volume.spread_group, volume.in_use) == \
        (16 * MiB, {"fsType": "xfs"}, "kafka", False)
    again = client.create_volume(vid(1), "pvc-a", 16 * MiB, {"fsType": "xfs"}, spread_group="kafka")
    assert again.created_at == volume.created_at
    with pytest.raises(errors.AlreadyExists):
        client.create_volume(vid(1), "pvc-a", 32 * MiB, {"fsType": "xfs"}, spread_group="kafka")
    with pytest.raises(errors.AlreadyExists):
        client.create_volume(vid(1), "pvc-a", 16 * MiB, {"fsType": "xfs"}, spread_group="other")
    client.create_volume(vid(2), "pvc-b", 16 * MiB, {}, spread_group="elastic")
    assert [v.volume_id for v in client.list_volumes("kafka")] == [vid(1)]
    assert {v.volume_id for v in client.list_volumes()} >= {vid(1), vid(2)}
    assert client.get_capacity().volumes >= 2
    assert client.get_volume(vid(1)).name == "pvc-a"
    assert {vid(1), vid(2)} <= set(server.exports())

    assert client.expand_volume(vid(1), 24 * MiB).size_bytes == 24 * MiB
    assert client.expand_volume(vid(1), 8 * MiB).size_bytes == 24 * MiB  # never shrinks
    size = nbdinfo("--size", server.uri(vid(1)))
    assert size.stdout.strip() == str(24 * MiB), size.stderr

    pattern = write_pattern(server, vid(1), server.workdir, seed=7)
    assert client.get_volume(vid(1)).allocated_bytes >= MiB
    snap = client.create_snapshot(sid(1), "snap-a", vid(1))
    assert (snap.source_volume_id, snap.size_bytes) == (vid(1), 24 * MiB)
    assert client.create_snapshot(sid(1), "snap-a", vid(1)).created_at == snap.created_at
    write_pattern(server, vid(1), server.workdir, seed=99)  # the snapshot must not change
    assert [s.snapshot_id for s in client.list_snapshots()] == [sid(1)]

    clone = client.create_volume(vid(3), "pvc-c", 32 * MiB, {}, source_snapshot_id=sid(1))
    assert (clone.source_snapshot_id, clone.size_bytes) == (sid(1), 32 * MiB)
    assert read_head(server, vid(3), server.workdir) == pattern
    with pytest.raises(errors.OutOfRange):
        client.create_volume(vid(4), "pvc-d", 8 * MiB, {}, source_snapshot_id=sid(1))
    copy = client.create_volume(vid(5), "pvc-e", 24 * MiB, {}, source_volume_id=vid(1))
    assert copy.source_volume_id == vid(1)
    assert read_head(server, vid(5), server.workdir) == read_head(server, vid(1), server.workdir)

    for volume_id_ in (vid(3), vid(5), vid(2)):
        client.delete_volume(volume_id_)
        client.delete_volume(volume_id_)  # already gone: still OK
    client.delete_snapshot(sid(1))
    client.delete_snapshot(sid(1))
    with pytest.raises(errors.NotFound):
        client.get_volume(vid(3))
    with pytest.raises(errors.NotFound):
        client.create_volume(vid(6), "pvc-f", 16 * MiB, {}, source_snapshot_id=sid(1))
    assert client.list_snapshots() == []
    exports = server.exports()
    assert vid(1) in exports and not {vid(2), vid(3), vid(5), vid(6)} & set(exports)
    client.delete_volume(vid(1))
    assert vid(1) not in server.exports()
    assert not (server.data_dir / "exports" / vid(1)).exists()
    calls = [line for line in server.log_lines() if line.get("event") == "rpc"]
    assert {"method": "DeleteVolume", "volume": vid(1), "code": "OK"}.items() <= calls[-1].items()


def test_requests_are_validated_first(client):
    cases = [
        (lambda: client.create_volume("", "n", MiB, {}), "volume_id is required"),
        (lambda: client.create_volume(vid(10), "", MiB, {}), "name is required"),
        (lambda: client.create_volume(vid(10), "n", 0, {}), "positive multiple of 512"),
        (lambda: client.create_volume(vid(10), "n", 1000, {}), "positive multiple of 512"),
        (lambda: client.create_volume(vid(10), "n", MiB, {}, source_snapshot_id=sid(1),
                                      source_volume_id=vid(1)), "not both"),
        (lambda: client.create_volume(vid(10), "n", MiB, {}, source_volume_id=vid(10)), "cannot be"),
        (lambda: client.create_volume(vid(10), "n", MiB, {}, source_snapshot_id=vid(1)), "rd-snap-"),
        (lambda: client.expand_volume(vid(10), -512), "positive multiple of 512"),
        (lambda: client.create_snapshot(sid(10), "s", ""), "source_volume_id is required"),
        (lambda: client.create_snapshot(vid(10), "s", vid(1)), "rd-snap-<32 lowercase hex>-s1"),
        (lambda: client.publish_volume("", "node-a", False), "volume_id is required"),
        (lambda: client.publish_volume(vid(10), "", False), "node_id is required: the CSI node id"),
        (lambda: client.publish_volume(vid(10), "n" * 257, False), "longer than 256 bytes"),
        (lambda: client.publish_volume(vid(10, "s2"), "node-a", False), "belongs to storage server 's2'"),
        (lambda: client.unpublish_volume("", "node-a"), "volume_id is required"),
        (lambda: client.unpublish_volume(vid(10), "n" * 257), "longer than 256 bytes"),
    ]
    for call, message in cases:
        with pytest.raises(errors.InvalidArgument, match=message):
            call()
    assert vid(10) not in {v.volume_id for v in client.list_volumes()}


def tree(directory: Path) -> dict:
    """Every path below `directory` with its mtime, but the server's log."""
    return {str(p.relative_to(directory)): p.stat().st_mtime_ns
            for p in directory.rglob("*") if p.name != "server.log"}


def test_ids_of_other_servers_or_paths_are_refused_and_touch_nothing(server, client):
    client.create_volume(vid(20), "victim", 4 * MiB, {})
    hex32 = "0" * 30 + "ab"
    crafted = [vid(20, "s2"), f"rd-{hex32}-s1/../../x", f"../rd-{hex32}-s1", f"rd-{hex32}-s1/..",
               "..", "/etc/passwd", f"rd-{hex32}-S1", f"rd-{hex32}-s1\0", f"rd-{hex32.upper()}-s1",
               f"rd-snap-{hex32}-s1"]
    before = tree(server.workdir)
    for bad in crafted:
        for call in (lambda: client.create_volume(bad, "x", MiB, {}),
                     lambda: client.delete_volume(bad), lambda: client.get_volume(bad),
                     lambda: client.expand_volume(bad, 2 * MiB),
                     lambda: client.create_snapshot(sid(20), "x", bad),
                     lambda: client.create_volume(vid(21), "x", MiB, {}, source_volume_id=bad)):
            with pytest.raises((errors.InvalidArgument, errors.NotFound)):
                call()
    with pytest.raises(errors.InvalidArgument, match="belongs to storage server 's2'"):
        client.delete_volume(vid(20, "s2"))
    for bad in crafted:
        with pytest.raises((errors.InvalidArgument, errors.NotFound)):
            client.publish_volume(bad, "node-a", False)
        with pytest.raises((errors.InvalidArgument, errors.NotFound)):
            client.unpublish_volume(bad, "node-a")
    assert tree(server.workdir) == before
    assert client.get_volume(vid(20)).size_bytes == 4 * MiB
    client.delete_volume(vid(20))


# --- publication: one node per volume ---

def published(client, volume_id_) -> tuple[str, bool]:
    stored = client.get_volume(volume_id_)
    return stored.published_node, stored.published_readonly


def test_a_volume_is_published_to_one_node_at_a_time(server, client):
    client.create_volume(vid(90), "shared", 4 * MiB, {})
    assert published(client, vid(90)) == ("", False)
    first = client.publish_volume(vid(90), "node-a", False)
    assert (first.published_node, first.published_readonly) == ("node-a", False)
    client.publish_volume(vid(90), "node-a", False)  # a retry: the same answer, nothing changes
    assert published(client, vid(90)) == ("node-a", False)
    assert [(v.published_node, v.published_readonly) for v in client.list_volumes()
            if v.volume_id == vid(90)] == [("node-a", False)]

    with pytest.raises(errors.FailedPrecondition, match="published to node node-a"):
        client.publish_volume(vid(90), "node-b", False)
    with pytest.raises(errors.AlreadyExists, match="read-write already"):
        client.publish_volume(vid(90), "node-a", True)
    # A published volume is not deleted (its node may attach it any moment), and the refusal
    # leaves it exported.
    with pytest.raises(errors.FailedPrecondition, match="published to node node-a: unpublish"):
        client.delete_volume(vid(90))
    assert vid(90) in server.exports()

    client.unpublish_volume(vid(90), "node-b")  # not node-b's: a no-op that succeeds
    assert published(client, vid(90)) == ("node-a", False)
    client.unpublish_volume(vid(90), "node-a")
    assert published(client, vid(90)) == ("", False)
    client.unpublish_volume(vid(90), "node-a")  # already unpublished: still OK
    record = json.loads((server.data_dir / "volumes" / vid(90) / "meta.json").read_text())
    assert "publication" not in record  # as a record written before publication existed

    client.publish_volume(vid(90), "node-b", True)  # free again, for anyone
    assert published(client, vid(90)) == ("node-b", True)
    client.unpublish_volume(vid(90), "")  # "" = whichever node has it
    assert published(client, vid(90)) == ("", False)
    client.delete_volume(vid(90))

    # Gone: publishing it is NOT_FOUND, unpublishing it succeeds (there is nothing to undo).
    with pytest.raises(errors.NotFound):
        client.publish_volume(vid(90), "node-a", False)
    client.unpublish_volume(vid(90), "node-a")
    client.unpublish_volume(vid(91), "")
    calls = {(line["method"], line["code"]) for line in server.log_lines() if line.get("event") == "rpc"
             and line.get("volume") == vid(90)}
    assert {("PublishVolume", "FAILED_PRECONDITION"), ("PublishVolume", "ALREADY_EXISTS"),
            ("DeleteVolume", "FAILED_PRECONDITION"), ("UnpublishVolume", "OK")} <= calls


def test_publications_survive_a_server_restart_and_old_records_read_as_unpublished(keys):
    for server in make_server(keys, "--reconnect-grace", "0"):
        with server.client() as client:
            client.create_volume(vid(92), "kept", 4 * MiB, {})
            client.create_volume(vid(93), "old", 4 * MiB, {})
            client.publish_volume(vid(92), "node-a", True)
        # vid(93)'s record as a version-1 server wrote it: no publication key at all.
        old = server.data_dir / "volumes" / vid(93) / "meta.json"
        record = json.loads(old.read_text())
        record.pop("publication", None)
        old.write_text(json.dumps(record))
        server.stop(signal.SIGKILL)
        server.start("--reconnect-grace", "0")
        with server.client() as client:
            assert published(client, vid(92)) == ("node-a", True)
            assert published(client, vid(93)) == ("", False)
            with pytest.raises(errors.FailedPrecondition, match="node-a"):
                client.publish_volume(vid(92), "node-b", True)
            client.publish_volume(vid(93), "node-b", False)
            assert published(client, vid(93)) == ("node-b", False)
            assert client.expand_volume(vid(93), 8 * MiB).published_node == "node-b"
            for volume_id_ in (vid(92), vid(93)):
                client.unpublish_volume(volume_id_, "")
                client.delete_volume(volume_id_)


# --- the fence: a volume that moves to another node gets a new export name ---

def record_of(server: StorageServer, volume_id_: str) -> dict:
    return json.loads((server.data_dir / "volumes" / volume_id_ / "meta.json").read_text())


def rewrite_record(server: StorageServer, volume_id_: str, **fields) -> None:
    """Edit a volume's record on disk as an older server (or a crash) left it; a field given
    as None is removed."""
    record = record_of(server, volume_id_)
    for key, value in fields.items():
        if value is None:
            record.pop(key, None)
        else:
            record[key] = value
    (server.data_dir / "volumes" / volume_id_ / "meta.json").write_text(json.dumps(record))


def moved_name(volume_id_: str) -> re.Pattern:
    return re.compile(re.escape(volume_id_) + r"\.[0-9a-f]{8}")


def events(server: StorageServer, event: str) -> list[dict]:
    return [line for line in server.log_lines() if line.get("event", "").startswith(event)]


def test_a_volume_published_to_another_node_gets_a_new_export_name(keys):
    for server in make_server(keys, "--reconnect-grace", "0"):
        with server.client() as client:
            client.create_volume(vid(100), "moving", 4 * MiB, {})
            assert client.get_volume(vid(100)).export_name == vid(100)
            pattern = write_pattern(server, vid(100), server.workdir, seed=5)
            # The first publication ever, and the same node again, keep the plain name.
            assert client.publish_volume(vid(100), "node-a", False).export_name == vid(100)
            client.unpublish_volume(vid(100), "node-a")
            assert client.publish_volume(vid(100), "node-a", False).export_name == vid(100)
            assert server.exports() == [vid(100)]
            client.unpublish_volume(vid(100), "node-a")
            assert client.get_volume(vid(100)).export_name == vid(100)

            moved = client.publish_volume(vid(100), "node-b", False).export_name
            assert moved_name(vid(100)).fullmatch(moved), moved
            assert server.exports() == [moved]  # the old name is gone, for listing and opening
            assert os.listdir(server.data_dir / "exports") == [moved]
            assert nbdinfo("--size", server.uri(vid(100))).returncode != 0
            assert read_head(server, moved, server.workdir) == pattern  # the same file
            record = record_of(server, vid(100))
            assert (record["export"], record["last_node"]) == (moved, "node-b")
            # A retry, the same node after an unpublish, and being unpublished keep it.
            assert client.publish_volume(vid(100), "node-b", False).export_name == moved
            client.unpublish_volume(vid(100), "node-b")
            assert client.get_volume(vid(100)).export_name == moved
            assert [v.export_name for v in client.list_volumes() if v.volume_id == vid(100)] == [moved]
            assert client.publish_volume(vid(100), "node-b", False).export_name == moved
            assert client.expand_volume(vid(100), 8 * MiB).export_name == moved
            [renamed] = events(server, "volume moved to another node")
            assert (renamed["level"], renamed["from_node"], renamed["to_node"], renamed["export"],
                    renamed["old_exports"]) == ("info", "node-a", "node-b", moved, [vid(100)])
            assert not events(server, "nbdkit killed")  # nobody had it open: nothing cut

        server.stop(signal.SIGKILL)
        server.start("--reconnect-grace", "0")
        with server.client() as client:
            assert client.get_volume(vid(100)).export_name == moved
            assert server.exports() == [moved]
            client.unpublish_volume(vid(100), "node-b")
            # Back to node-a: a new name again (node-a must not reach it under its old one).
            again = client.publish_volume(vid(100), "node-a", False).export_name
            assert moved_name(vid(100)).fullmatch(again) and again != moved
            assert server.exports() == [again]
            client.unpublish_volume(vid(100), "")
            client.delete_volume(vid(100))
            assert server.exports() == []
            assert os.listdir(server.data_dir / "exports") == []


def test_records_from_before_export_names_and_a_crash_in_the_middle_of_a_move(keys):
    for server in make_server(keys, "--reconnect-grace", "0"):
        with server.client() as client:
            for n in (101, 102, 103):
                client.create_volume(vid(n), f"old-{n}", 4 * MiB, {})
            client.publish_volume(vid(101), "node-a", False)
            client.publish_volume(vid(103), "node-a", False)
        # As a version-2 server wrote them: vid(101) published to node-a, vid(102) never
        # published, neither with an export name or a last node.
        rewrite_record(server, vid(101), export=None, last_node=None)
        rewrite_record(server, vid(102), export=None, last_node=None)
        # vid(103): the server crashed in the middle of moving it to node-b, after the record
        # (the truth) and before the links: exports/ still has the old name.
        crashed = f"{vid(103)}.0123abcd"
        rewrite_record(server, vid(103), export=crashed, last_node="node-b",
                       publication={"node_id": "node-b", "readonly": False})
        (server.data_dir / "exports" / f"{vid(102)}.deadbeef").write_bytes(b"stale")
        server.stop(signal.SIGKILL)
        server.start("--reconnect-grace", "0")
        with server.client() as client:
            assert server.exports() == sorted([vid(101), vid(102), crashed])
            assert [client.get_volume(vid(n)).export_name for n in (101, 102, 103)] == \
                [vid(101), vid(102), crashed]
            # vid(101): its last node is the one it is published to.
            assert client.publish_volume(vid(101), "node-a", False).export_name == vid(101)
            client.unpublish_volume(vid(101), "node-a")
            assert moved_name(vid(101)).fullmatch(
                client.publish_volume(vid(101), "node-b", False).export_name)
            # vid(102): never published as far as anyone knows, so its first publication
            # keeps the plain name.
            assert client.publish_volume(vid(102), "node-b", False).export_name == vid(102)
            # vid(103): the retried publish finds it done.
            assert client.publish_volume(vid(103), "node-b", False).export_name == crashed
            assert nbdinfo("--size", server.uri(vid(103))).returncode != 0
            assert nbdinfo("--size", server.uri(crashed)).returncode == 0
            for n in (101, 102, 103):
                client.unpublish_volume(vid(n), "")
                client.delete_volume(vid(n))
            assert os.listdir(server.data_dir / "exports") == []


def served_by(server: StorageServer) -> list[int]:
    """The server's own nbdkit (not the holders of `hold_open`, which run below its workdir)."""
    return [pid for pid in nbdkit_pids(server.workdir)
            if f"dir={server.data_dir / 'exports'}".encode()
            in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")]


def test_moving_a_volume_a_node_still_has_open_cuts_its_connection(keys):
    """Node A lost the volume (unpublished) but is still connected: publishing it to node B
    renames the export and restarts nbdkit, so A's connection is gone and its name too."""
    for server in make_server(keys, "--reconnect-grace", "0"):
        with server.client() as client:
            client.create_volume(vid(110), "moved", 4 * MiB, {})
            client.create_volume(vid(111), "bystander", 4 * MiB, {})
            before = write_pattern(server, vid(110), server.workdir, seed=21)
            client.publish_volume(vid(110), "node-a", False)
            node_a = server.hold_open(vid(110))
            try:
                wait_for(lambda: client.get_volume(vid(110)).in_use, 10, "node A's connection")
                [first] = served_by(server)
                client.unpublish_volume(vid(110), "node-a")
                # Unpublished but still open: nothing is cut until the volume moves.
                assert served_by(server) == [first]
                started = time.monotonic()
                moved = client.publish_volume(vid(110), "node-b", False).export_name
                took = time.monotonic() - started
                assert moved_name(vid(110)).fullmatch(moved)
                assert served_by(server) not in ([], [first])
                assert not client.get_volume(vid(110)).in_use
                # Node A's writes through its (cut) attachment fail, and reach nothing.
                (server.workdir / "late").write_bytes(b"A" * MiB)
                late = subprocess.run(["nbdcopy", str(server.workdir / "late"), node_a.uri],
                                      capture_output=True, timeout=60)
                assert late.returncode != 0
            finally:
                node_a.terminate()
                node_a.wait(10)
            assert nbdinfo("--size", server.uri(vid(110))).returncode != 0  # no way back in
            assert read_head(server, moved, server.workdir) == before
            assert nbdinfo("--size", server.uri(vid(111))).returncode == 0  # others still served
            [fence] = events(server, "volume moved to another node while a node still had it open")
            assert (fence["level"], fence["from_node"], fence["to_node"], fence["export"]) == \
                ("warning", "node-a", "node-b", moved)
            assert 0 < fence["restart_ms"] < 5000 and took < 10
            [killed] = events(server, "nbdkit killed to cut every connection")
            assert killed["pid"] == first and vid(110) in killed["reason"]
            assert not events(server, "nbdkit exited")  # not a crash: no backoff
            for n in (110, 111):
                client.unpublish_volume(vid(n), "")
                client.delete_volume(vid(n))


def test_a_server_too_old_to_publish_says_to_upgrade_it(keys):
    """A version-1 server has no PublishVolume: the controller gets FAILED_PRECONDITION saying
    what to do, not UNIMPLEMENTED (which would read as "polyvol cannot do this")."""
    from concurrent import futures

    from driver.storage import tls

    old = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    storage_pb2_grpc.add_StorageServerServicer_to_server(storage_pb2_grpc.StorageServerServicer(), old)
    port = old.add_secure_port("127.0.0.1:0", tls.server_credentials(keys / "tls"))
    old.start()
    try:
        with StorageClient(f"127.0.0.1:{port}", str(keys / "tls"), timeout=10) as client:
            with pytest.raises(errors.FailedPrecondition, match="does not implement PublishVolume: "
                                                                "upgrade polyvol on that server"):
                client.publish_volume(vid(94), "node-a", False)
    finally:
        old.stop(grace=None)


def test_a_version_2_server_publishes_under_the_volume_id_and_nodes_check_export_names(keys, tmp_path):
    """A server older than the fence (API 2) says no export name: its export is the volume id,
    which is what the publish_context then carries, with a warning that the volume is not
    fenced. A node refuses an export name that is not one of the volume's."""
    import logging
    from concurrent import futures

    from driver.backends.remote_disk import CTX_NBD_EXPORT, RemoteDiskBackend, ServerDirectory
    from driver.storage import tls

    class Version2(storage_pb2_grpc.StorageServerServicer):
        def GetInfo(self, request, context):
            return storage_pb2.ServerInfo(name="s1", nbd_address="127.0.0.1:1", nbd_tls=True,
                                          api_version=2)

        def PublishVolume(self, request, context):
            return storage_pb2.StoredVolume(volume_id=request.volume_id,
                                            published_node=request.node_id)

    old = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    storage_pb2_grpc.add_StorageServerServicer_to_server(Version2(), old)
    port = old.add_secure_port("127.0.0.1:0", tls.server_credentials(keys / "tls"))
    old.start()
    servers = tmp_path / "servers.json"
    servers.write_text(json.dumps({"servers": [{"name": "s1", "address": f"127.0.0.1:{port}"}]}))
    seen = []
    handler = logging.Handler()
    handler.emit = seen.append
    logger = logging.getLogger("polyvol.remote-disk")
    logger.addHandler(handler)
    try:
        backend = RemoteDiskBackend(ServerDirectory(str(servers)), str(keys / "tls"))
        assert backend.publish(vid(95), "node-a", False) == {
            "polyvol.csi.io/nbd-address": "127.0.0.1:1", "polyvol.csi.io/nbd-tls": "true",
            CTX_NBD_EXPORT: vid(95)}
        assert [r.getMessage() for r in seen if r.levelno == logging.WARNING] == [
            "storage server predates the fence of moved volumes: a node this volume was "
            "published to before may still write to it; upgrade polyvol on that server"]
    finally:
        logger.removeHandler(handler)
        old.stop(grace=None)

    node = RemoteDiskBackend(None, None, attacher=None, psk_identity="n", psk_file="/dev/null")
    context = {"polyvol.csi.io/nbd-address": "127.0.0.1:1", "polyvol.csi.io/nbd-tls": "false"}
    for export in (vid(96), f"{vid(95)}.0123abc", f"{vid(95)}.0123ABCD", f"{vid(95)}/x", "../x"):
        with pytest.raises(errors.InvalidArgument, match="is not an export name of"):
            node.attach(vid(95), {**context, CTX_NBD_EXPORT: export})
    for export in ("", vid(95), f"{vid(95)}.0123abcd"):  # accepted: on to the (missing) attacher
        with pytest.raises(errors.FailedPrecondition, match="does not serve the node role"):
            node.attach(vid(95), {**context, CTX_NBD_EXPORT: export})


# --- authentication ---

def test_control_api_refuses_clients_without_a_certificate_from_the_ca(server, keys, tmp_path):
    ca = (keys / "tls" / "ca.crt").read_bytes()
    for channel in (grpc.secure_channel(server.address, grpc.ssl_channel_credentials(root_certificates=ca),
                                        options=(("grpc.ssl_target_name_override", "polyvol-storage"),)),
                    grpc.insecure_channel(server.address)):
        with channel:
            with pytest.raises(grpc.RpcError) as refused:
                storage_pb2_grpc.StorageServerStub(channel).ListVolumes(
                    storage_pb2.ListVolumesRequest(), timeout=5)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE

    # A client certificate from another CA, presented to a server it trusts.
    made = polyvol("storage", "certs", "--dir", str(tmp_path / "other"))
    assert made.returncode == 0, made.stderr
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    shutil.copy(keys / "tls" / "ca.crt", mixed / "ca.crt")
    for name in ("client.crt", "client.key"):
        shutil.copy(tmp_path / "other" / name, mixed / name)
    with server.client(mixed) as impostor:
        with pytest.raises(errors.Unavailable, match=server.address):
            impostor.list_volumes()
    # A storage server's own key is no client key: client certificates need clientAuth.
    server_as_client = tmp_path / "server-as-client"
    server_as_client.mkdir()
    shutil.copy(keys / "tls" / "ca.crt", server_as_client / "ca.crt")
    shutil.copy(keys / "tls" / "server.crt", server_as_client / "client.crt")
    shutil.copy(keys / "tls" / "server.key", server_as_client / "client.key")
    with server.client(server_as_client) as impostor:
        with pytest.raises(errors.Unavailable):
            impostor.delete_volume(vid(1))
    # ...and a server presenting another CA's certificate is not trusted by the client.
    with server.client(tmp_path / "other") as wrong_ca:
        with pytest.raises(errors.Unavailable):
            wrong_ca.get_info()
    with server.client() as genuine:
        assert genuine.get_info().name == "s1"


def test_nbd_needs_the_psk(server, client, tmp_path):
    client.create_volume(vid(30), "nbd", 4 * MiB, {})
    ok = nbdinfo("--size", server.uri(vid(30)))
    assert ok.returncode == 0 and ok.stdout.strip() == str(4 * MiB), ok.stderr
    # Durability is the client's to ask for: flush and FUA must reach the file.
    for feature in ("flush", "fua"):
        assert nbdinfo("--can", feature, server.uri(vid(30))).returncode == 0

    plain = nbdinfo("--size", f"nbd://127.0.0.1:{server.nbd_port}/{vid(30)}")
    assert plain.returncode != 0
    assert nbdinfo("--list", f"nbd://127.0.0.1:{server.nbd_port}/").returncode != 0
    wrong = tmp_path / "wrong.psk"
    assert polyvol("storage", "psk", "--identity", IDENTITY, "--out", str(wrong)).returncode == 0
    assert nbdinfo("--size", server.uri(vid(30), psk=wrong)).returncode != 0
    stranger = tmp_path / "stranger.psk"
    assert polyvol("storage", "psk", "--identity", "stranger", "--out", str(stranger)).returncode == 0
    assert nbdinfo("--size", server.uri(vid(30), psk=stranger, identity="stranger")).returncode != 0
    client.delete_volume(vid(30))


# --- attached volumes ---

def test_attached_volume_cannot_be_deleted(server, client):
    client.create_volume(vid(40), "busy", 4 * MiB, {})
    reflink = [line for line in server.log_lines() if line.get("event") == "serving"][-1]["reflink"]
    holder = server.hold_open(vid(40))
    try:
        wait_for(lambda: client.get_volume(vid(40)).in_use, 10, "the server to see the attach")
        assert [v.in_use for v in client.list_volumes() if v.volume_id == vid(40)] == [True]
        with pytest.raises(errors.FailedPrecondition, match="attached"):
            client.delete_volume(vid(40))
        if reflink:
            client.create_snapshot(sid(40), "busy-snap", vid(40))
            client.delete_snapshot(sid(40))
        else:
            with pytest.raises(errors.FailedPrecondition, match="reflink"):
                client.create_snapshot(sid(40), "busy-snap", vid(40))
            with pytest.raises(errors.FailedPrecondition, match="torn"):
                client.create_volume(vid(41), "busy-clone", 4 * MiB, {}, source_volume_id=vid(40))
            assert not (server.data_dir / "snapshots" / sid(40)).exists()
            assert not (server.data_dir / "volumes" / vid(41)).exists()
        assert vid(40) in server.exports()  # a refused delete leaves the export in place
    finally:
        holder.terminate()
        holder.wait(10)
    wait_for(lambda: not client.get_volume(vid(40)).in_use, 10, "the detach to be seen")
    client.create_snapshot(sid(40), "idle-snap", vid(40))  # not in use: a plain copy is fine
    client.delete_snapshot(sid(40))
    client.delete_volume(vid(40))
    assert vid(40) not in server.exports()


def test_killed_nbdkit_is_restarted(keys):
    for server in make_server(keys, "--reconnect-grace", "3"):
        with server.client() as client:
            client.create_volume(vid(50), "survivor", 4 * MiB, {})
            [first] = nbdkit_pids(server.workdir)
            os.kill(first, signal.SIGKILL)
            wait_for(lambda: nbdinfo("--size", server.uri(vid(50))).returncode == 0, 10,
                     "the export to come back")
            assert nbdkit_pids(server.workdir) not in ([], [first])
            wait_for(lambda: any(line["event"] == "nbdkit ready" and line["restarts"] == 1
                                 for line in server.log_lines()), 5, "the server to see it")
            # Nodes may still be reconnecting: no delete until the grace is over.
            with pytest.raises(errors.Unavailable, match="reconnecting"):
                client.delete_volume(vid(50))
            assert vid(50) in server.exports()
            wait_for(lambda: _deleted(client, vid(50)), 10, "the delete after the grace")
        restarts = [line for line in server.log_lines() if line["event"] == "nbdkit exited; restarting"]
        assert len(restarts) == 1 and restarts[0]["pid"] == first


def _deleted(client, volume_id_) -> bool:
    try:
        client.delete_volume(volume_id_)
        return True
    except errors.Unavailable:
        return False


def test_killed_server_takes_nbdkit_along_and_a_restart_serves_its_volumes(keys):
    for server in make_server(keys, "--reconnect-grace", "0"):
        with server.client() as client:
            client.create_volume(vid(60), "persistent", 4 * MiB, {})
        pattern = write_pattern(server, vid(60), server.workdir, seed=3)
        (server.data_dir / "exports" / vid(60)).unlink()  # as if a crash came mid-delete
        (server.data_dir / "exports" / "stale").write_bytes(b"x")
        # nbdkit's parent must outlive the server: nbdkit asks for SIGTERM when its parent
        # dies, and a SIGTERM'd nbdkit fails requests with ESHUTDOWN (EIO on the node).
        [nbdkit] = nbdkit_pids(server.workdir)
        watchdog = parent_of(nbdkit)
        assert watchdog != server.process.pid and parent_of(watchdog) == server.process.pid
        server.stop(signal.SIGKILL)
        wait_for(lambda: not nbdkit_pids(server.workdir), 5, "nbdkit to exit with its parent")

        server.start("--insecure-nbd", "--reconnect-grace", "0")
        assert any(line["level"] == "warning" and "WITHOUT TLS" in line["event"]
                   for line in server.log_lines())
        with server.client() as client:
            assert client.get_info().nbd_tls is False
            assert client.get_volume(vid(60)).size_bytes == 4 * MiB
        plain = f"nbd://127.0.0.1:{server.nbd_port}/"
        listing = json.loads(nbdinfo("--list", "--json", plain).stdout)
        assert [e["export-name"] for e in listing["exports"]] == [vid(60)]
        target = server.workdir / "plain-read"
        subprocess.run(["nbdcopy", plain + vid(60), str(target)], check=True, timeout=60)
        assert target.read_bytes()[:MiB] == pattern


@pytest.mark.root
def test_reflink_data_dir_snapshots_attached_volumes(keys):
    """On xfs (reflink) a snapshot of an attached volume is an atomic clone: allowed, and a
    point in time that later writes through the attachment do not change."""
    workdir = Path(tempfile.mkdtemp(prefix="polyvol-storage-xfs-"))
    image = Path(tempfile.mkdtemp(prefix="polyvol-storage-img-")) / "xfs.img"
    data = workdir / "data"
    data.mkdir()
    subprocess.run(["truncate", "-s", "512M", str(image)], check=True)
    subprocess.run(["mkfs.xfs", "-q", str(image)], check=True, timeout=60)
    subprocess.run(["mount", "-o", "loop", str(image), str(data)], check=True, timeout=60)
    try:
        for server in make_server(keys, "--reconnect-grace", "0", workdir=workdir):
            assert [line for line in server.log_lines() if line["event"] == "serving"][-1]["reflink"]
            with server.client() as client:
                client.create_volume(vid(80), "reflinked", 4 * MiB, {})
                before = write_pattern(server, vid(80), workdir, seed=11)
                holder = server.hold_open(vid(80))
                try:
                    wait_for(lambda: client.get_volume(vid(80)).in_use, 10, "the attach")
                    client.create_snapshot(sid(80), "while-attached", vid(80))
                    after = bytes(reversed(before))
                    (workdir / "after").write_bytes(after)
                    subprocess.run(["nbdcopy", str(workdir / "after"), holder.uri],
                                   check=True, timeout=60)
                finally:
                    holder.terminate()
                    holder.wait(10)
                client.create_volume(vid(81), "from-snap", 4 * MiB, {}, source_snapshot_id=sid(80))
                assert read_head(server, vid(81), workdir) == before
                assert read_head(server, vid(80), workdir) == after
    finally:
        subprocess.run(["umount", str(data)], check=False, timeout=60)
        shutil.rmtree(workdir, ignore_errors=True)
        shutil.rmtree(image.parent, ignore_errors=True)


# --- the command line ---

def test_storage_cli(server, client, keys, tmp_path):
    client.create_volume(vid(70), "shown", 4 * MiB, {}, spread_group="g")
    shown = polyvol("storage", "show", "--address", server.address, "--tls-dir", str(keys / "tls"))
    assert shown.returncode == 0, shown.stderr
    report = json.loads(shown.stdout)
    assert report["info"]["name"] == "s1"
    assert {"volumeId": vid(70), "spreadGroup": "g"}.items() <= \
        [v for v in report["volumes"] if v["volumeId"] == vid(70)][0].items()
    client.delete_volume(vid(70))

    again = polyvol("storage", "certs", "--dir", str(keys / "tls"))
    assert again.returncode != 0 and "--force" in again.stderr

    psk = tmp_path / "keys.psk"
    for identity in ("node-a", "node-b", "node-a"):
        assert polyvol("storage", "psk", "--identity", identity, "--out", str(psk)).returncode == 0
    lines = psk.read_text().splitlines()
    assert sorted(line.split(":")[0] for line in lines) == ["node-a", "node-b"]
    assert all(len(line.split(":")[1]) == 64 for line in lines)
    assert psk.stat().st_mode & 0o777 == 0o600
    assert polyvol("storage", "psk", "--identity", "bad:name", "--out", str(psk)).returncode != 0

    bad = polyvol("storage-server", "--name", "Not_A_Label", "--data-dir", str(tmp_path / "d"),
                  "--listen", "127.0.0.1:1", "--nbd-listen", "127.0.0.1:2",
                  "--tls-dir", str(keys / "tls"), "--nbd-psk-file", str(psk))
    assert bad.returncode != 0 and "DNS label" in bad.stderr
    assert not (tmp_path / "d").exists()

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        nbd_address = f"127.0.0.1:{taken.getsockname()[1]}"
        busy = polyvol("storage-server", "--name", "s9", "--data-dir", str(tmp_path / "d"),
                       "--listen", f"127.0.0.1:{free_port()}", "--nbd-listen", nbd_address,
                       "--tls-dir", str(keys / "tls"), "--nbd-psk-file", str(psk))
    assert busy.returncode != 0, busy.stderr[-2000:]
    assert f"cannot listen for NBD on {nbd_address}: Address already in use" in busy.stderr, \
        busy.stderr[-2000:]
    assert not nbdkit_pids(tmp_path)


def scrape(port: int) -> dict[str, float]:
    """/metrics as {'name{labels}': value}."""
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
        text = answer.read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            samples[key] = float(value)
    return samples


def test_metrics_count_volumes_space_rpcs_and_the_data_plane(keys):
    metrics_port = free_port()
    for server in make_server(keys, "--reconnect-grace", "0",
                              "--metrics-address", f"127.0.0.1:{metrics_port}"):
        with server.client() as client:
            client.create_volume(vid(70), "m1", 4 * MiB, {})
            client.create_volume(vid(71), "m2", 8 * MiB, {})
            client.publish_volume(vid(71), "node-a", False)
            with pytest.raises(errors.NotFound):
                client.get_volume(vid(72))
        write_pattern(server, vid(70), server.workdir, seed=1)  # 1 MiB of data
        samples = scrape(metrics_port)
        assert samples['polyvol_storage_volumes{state="all"}'] == 2
        assert samples['polyvol_storage_volumes{state="published"}'] == 1
        assert samples['polyvol_storage_volumes{state="attached"}'] == 0
        assert samples['polyvol_storage_bytes{kind="allocated"}'] >= MiB
        assert 0 < samples['polyvol_storage_bytes{kind="available"}'] <= samples['polyvol_storage_bytes{kind="total"}']
        assert samples['polyvol_storage_nbdkit{what="up"}'] == 1
        assert samples['polyvol_storage_nbdkit{what="restarts"}'] == 0
        ok = 'polyvol_rpc_total{code="OK",driver="storage-server",method="CreateVolume"}'
        missing = 'polyvol_rpc_total{code="NOT_FOUND",driver="storage-server",method="GetVolume"}'
        assert samples[ok] == 2 and samples[missing] == 1
        assert samples['polyvol_rpc_seconds_count{driver="storage-server",method="CreateVolume"}'] == 2


def test_a_node_probe_tells_a_stalled_data_plane_from_a_serving_one(server):
    """The server keeps its NBD listening socket while nbdkit is down or stuck (so reconnects
    queue instead of failing), which makes a bare TCP connect succeed; the node's probe waits
    for the NBD greeting instead, and leaves nothing in nbdkit's log when it is fine."""
    from driver.attach import nbd

    seen = len(server.log_lines())  # the server is shared with earlier tests
    assert nbd.probe_nbd("127.0.0.1", server.nbd_port) is None
    time.sleep(0.5)  # nbdkit's complaints reach the server's log through a pipe
    assert not [line for line in server.log_lines()[seen:] if line.get("event") == "nbdkit says"]
    [pid] = nbdkit_pids(server.workdir)
    os.kill(pid, signal.SIGSTOP)
    try:
        assert nbd.probe("127.0.0.1", server.nbd_port) is None  # the kernel accepts for it
        assert "does not answer" in nbd.probe_nbd("127.0.0.1", server.nbd_port, timeout=0.5)
    finally:
        os.kill(pid, signal.SIGCONT)
    assert nbd.probe_nbd("127.0.0.1", server.nbd_port) is None


class FlakyDataPlane:
    """Stands in for nbdkit.Nbdkit in an in-process StorageServicer: nothing is served, and
    the first attempt to cut connections fails, as a restart that went wrong would."""

    psk_file = None

    def __init__(self):
        self.cuts = []

    def restart_if_open(self, file_id, reason):
        self.cuts.append(reason)
        if len(self.cuts) == 1:
            raise errors.Unavailable("the NBD data plane did not come back in time")
        return None

    def ready_for(self):
        return 3600.0

    def open_files(self):
        return set()


class AbortedCall(Exception):
    pass


class CallContext:
    def abort(self, code, message):
        raise AbortedCall(code, message)


def test_a_fence_that_failed_is_done_by_the_retry(tmp_path):
    """The links changed but the cut of the old node's connections failed: the publish fails,
    and its retry cuts them, although it finds no old export name left to remove."""
    from driver.filestore import FileStore
    from driver.storage import server as storage_server
    from driver.storage import snapshot_id_pattern, volume_id_pattern

    store = FileStore(tmp_path / "data", volume_id_pattern("s1"), snapshot_id_pattern("s1"), 0, "s1")
    exports = tmp_path / "data" / "exports"
    exports.mkdir()
    plane = FlakyDataPlane()
    servicer = storage_server.StorageServicer("s1", store, exports, plane, labels={},
                                              nbd_address="127.0.0.1:1", reflink=False,
                                              reconnect_grace=0)
    volume = vid(90)
    servicer.CreateVolume(storage_pb2.CreateVolumeRequest(
        volume_id=volume, name="flaky", size_bytes=4 * MiB), CallContext())
    publish = storage_pb2.PublishVolumeRequest
    servicer.PublishVolume(publish(volume_id=volume, node_id="node-a"), CallContext())
    servicer.UnpublishVolume(storage_pb2.UnpublishVolumeRequest(volume_id=volume, node_id="node-a"),
                             CallContext())
    with pytest.raises(AbortedCall):
        servicer.PublishVolume(publish(volume_id=volume, node_id="node-b"), CallContext())
    moved = store.read_volume(volume)
    assert moved["fence_pending"] and sorted(os.listdir(exports)) == [moved["export"]]
    stored = servicer.PublishVolume(publish(volume_id=volume, node_id="node-b"), CallContext())
    assert len(plane.cuts) == 2 and stored.export_name == moved["export"]
    assert "fence_pending" not in store.read_volume(volume)
    servicer.PublishVolume(publish(volume_id=volume, node_id="node-b"), CallContext())
    assert len(plane.cuts) == 2  # nothing left to cut
