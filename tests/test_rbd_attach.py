"""The RBD attach layer (driver.attach.rbd) against a real single-host Ceph cluster.

The cluster comes from tests/ceph_cluster.py (one bootstrap per test session). Every attach
operation runs as `python -m driver.attach.rbd ...`, a fresh process each time, exactly as a
plugin restart looks; the test process itself only touches block devices, mounts and files.
Two state directories ("node-a", "node-b") stand for two nodes where a test needs them.
Every test ends with nothing of its volumes left: no qemu-storage-daemon or nbdfuse process,
FUSE mount, loop device or state directory.
"""

import base64
import contextlib
import json
import os
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import zlib
from pathlib import Path

import pytest

from ceph_cluster import ceph_cluster  # noqa: F401 - the session fixture
from conftest import attach_helper_pids, clean_up_below, timed
from test_local_helpers import fio_verify, loops_under, mounts_under

pytestmark = [pytest.mark.root, pytest.mark.timeout(300)]

REPO = Path(__file__).resolve().parent.parent
MiB = 1 << 20
IMAGE_BYTES = 1024 * MiB
FENCE_AFTER = "3"
# Images of these tests live in their own RADOS namespace of each pool: other tests sharing
# the session's cluster (the Ceph backend's) never see them in a listing.
NAMESPACE = "attach-tests"


class Env:
    def __init__(self, cluster, workdir: Path):
        self.cluster, self.workdir = cluster, workdir
        self.key_file = workdir / "polyvol.key"
        self.key_file.write_text(cluster.user_key + "\n")
        os.chmod(self.key_file, 0o600)
        self.mnt = workdir / "mnt"
        self.mnt.mkdir()
        self.outputs: list[str] = []   # everything the attach processes printed
        self.images: list[tuple[str, str]] = []

    def state(self, node: str = "node-a") -> Path:
        return self.workdir / node

    def image(self, kind: str, size: int = IMAGE_BYTES) -> tuple[str, str]:
        """A new image: kind "rep" (replicated pool) or "ec" (metadata in the replicated
        metadata pool, data in the EC pool), in NAMESPACE. Returns (pool, image)."""
        import rbd
        name = f"attach-{kind}-{uuid.uuid4().hex[:8]}"
        pool = self.cluster.rep_pool if kind == "rep" else self.cluster.ec_meta_pool
        with self.cluster.ioctx(pool) as ioctx:
            if not rbd.RBD().namespace_exists(ioctx, NAMESPACE):
                rbd.RBD().namespace_create(ioctx, NAMESPACE)
            ioctx.set_namespace(NAMESPACE)
            rbd.RBD().create(ioctx, name, size, old_format=False,
                             data_pool=self.cluster.ec_data_pool if kind == "ec" else None)
        self.images.append((pool, name))
        return pool, name

    def rbd(self, action: str, volume: str = "", *extra, node: str = "node-a",
            expect_ok: bool = True):
        """Run `python -m driver.attach.rbd` as a fresh process; return its JSON answer."""
        argv = [sys.executable, "-m", "driver.attach.rbd", action, "--state-dir",
                self.state(node), "--volume", volume, "--log-level", "debug", *map(str, extra)]
        done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=150)
        self.outputs.append(done.stdout + done.stderr)
        answer = json.loads(done.stdout) if done.stdout.strip() else None
        if expect_ok:
            assert done.returncode == 0, f"{action} failed: {done.stdout}\n{done.stderr[-4000:]}"
        return answer

    def attach(self, volume: str, pool: str, image: str, node: str = "node-a",
               key_file=None, expect_ok: bool = True, fence_after: str = FENCE_AFTER):
        return self.rbd("attach", volume, "--pool", pool, "--namespace", NAMESPACE,
                        "--image", image, "--monitors", self.cluster.monitors, "--user", self.cluster.user_id,
                        "--key-file", key_file or self.key_file, "--fence-after", fence_after,
                        node=node, expect_ok=expect_ok)

    def volume_dir(self, volume: str, node: str = "node-a") -> Path:
        return self.state(node) / "attach-rbd" / volume

    def helper_pids(self, volume: str = "", node: str = "") -> list[int]:
        """qemu-storage-daemon / nbdfuse processes whose command line names our state."""
        return attach_helper_pids(str(self.volume_dir(volume, node)) if volume else str(self.workdir))

    def attached(self, node: str) -> list[str]:
        return self.rbd("list", node=node) if self.state(node).exists() else []

    def assert_nothing_left(self) -> None:
        assert self.helper_pids() == []
        assert loops_under(self.workdir) == []
        assert mounts_under(self.workdir) == []
        for node in ("node-a", "node-b"):
            root = self.state(node) / "attach-rbd"
            assert not root.exists() or list(root.iterdir()) == [], list(root.iterdir())

    def mount_ext4(self, device: str, name: str) -> Path:
        subprocess.run(["mkfs.ext4", "-q", "-F", device], check=True, capture_output=True)
        target = self.mnt / name
        target.mkdir(exist_ok=True)
        subprocess.run(["mount", device, target], check=True, capture_output=True)
        return target

    def lock_owners(self, pool: str, image: str) -> list[dict]:
        return json.loads(self.cluster.rbd("lock", "ls", f"{pool}/{NAMESPACE}/{image}",
                                           "--format", "json"))

    def blocklist(self) -> str:
        return self.cluster.ceph("osd", "blocklist", "ls")


@pytest.fixture(scope="module")
def env(ceph_cluster):  # noqa: F811 - the imported fixture
    workdir = Path(tempfile.mkdtemp(prefix="polyvol-rbd-"))
    environment = Env(ceph_cluster, workdir)
    try:
        yield environment
    finally:
        try:
            for node in ("node-a", "node-b"):
                for volume in environment.attached(node):  # a failed test's attachments
                    environment.rbd("detach", volume, node=node, expect_ok=False)
        finally:
            clean_up_below(workdir)
            subprocess.run(["rm", "-rf", "--one-file-system", str(workdir)], check=False)
            _remove_images(ceph_cluster, environment.images)


def _remove_images(cluster, images) -> None:
    """Remove the module's images and namespaces. A killed client's lock would make the
    removal wait for its watch to expire (~30 s per image): break it first (which blocklists
    the dead client, and the OSDs drop its watch). Best effort, bounded: what is left goes
    with the cluster at the end of the session."""
    import rbd

    def remove():
        for pool, name in images:
            with contextlib.suppress(rbd.Error), cluster.ioctx(pool) as ioctx:
                ioctx.set_namespace(NAMESPACE)
                with rbd.Image(ioctx, name) as image:
                    for owner in image.lock_get_owners():
                        image.lock_break(rbd.RBD_LOCK_MODE_EXCLUSIVE, owner["owner"])
                rbd.RBD().remove(ioctx, name)
        for pool in sorted({pool for pool, _ in images}):
            with contextlib.suppress(rbd.Error), cluster.ioctx(pool) as ioctx:
                rbd.RBD().namespace_remove(ioctx, NAMESPACE)
    worker = threading.Thread(target=remove, daemon=True)
    worker.start()
    worker.join(60)


@pytest.fixture
def rbd_env(env):
    yield env
    for node in ("node-a", "node-b"):
        for volume in env.attached(node):
            env.rbd("detach", volume, node=node)
    for target in sorted(mounts_under(env.mnt), reverse=True):
        subprocess.run(["umount", "-l", target], check=False, timeout=60)
    env.assert_nothing_left()


# --- 1. data integrity: fio crc32c verify at iodepth 32 on both classes, block and ext4 ---

@pytest.mark.parametrize("kind", ["rep", "ec"])
def test_fio_verify_block_and_ext4(rbd_env, kind):
    env = rbd_env
    pool, image = env.image(kind)
    attached, seconds = timed(env.attach, f"fio-{kind}", pool, image)
    print(f"\n{kind}: attach {seconds:.2f}s -> {attached}")
    device = attached["device"]
    assert attached["method"] == "rbd-nbd"
    assert Path(f"/sys/block/{os.path.basename(device)}/loop/dio").read_text().strip() == "1"
    job, seconds = timed(fio_verify, device, "192M", name=f"rbd-{kind}-block")
    assert job["read"]["io_bytes"] >= job["write"]["io_bytes"] * 0.99
    print(f"{kind}: fio verify on the block device {seconds:.1f}s, write "
          f"{job['write']['bw_bytes'] / MiB:.0f} MiB/s")
    target = env.mount_ext4(device, f"fio-{kind}")
    job, seconds = timed(fio_verify, str(target / "fio.dat"), "96M", name=f"rbd-{kind}-ext4")
    assert job["read"]["io_bytes"] >= job["write"]["io_bytes"] * 0.99
    print(f"{kind}: fio verify on ext4 {seconds:.1f}s")
    subprocess.run(["umount", target], check=True)
    fsck = subprocess.run(["e2fsck", "-fn", device], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    assert env.lock_owners(pool, image), "the writer should hold the exclusive lock"
    _, seconds = timed(env.rbd, "detach", f"fio-{kind}")
    print(f"{kind}: detach {seconds:.2f}s")
    assert env.lock_owners(pool, image) == [], "detach must release the exclusive lock"
    if kind == "ec":  # the data really is in the erasure-coded pool
        with env.cluster.ioctx(env.cluster.ec_data_pool) as ioctx:
            ioctx.set_namespace(NAMESPACE)
            assert any(o.key.startswith("rbd_data.") for o in ioctx.list_objects())
    env.assert_nothing_left()


# --- 2. re-adoption from a fresh process; attach is idempotent ---

def test_readopt_and_idempotent_attach(rbd_env):
    env = rbd_env
    pool, image = env.image("rep", 256 * MiB)
    device = env.attach("readopt", pool, image)["device"]  # process 1 (exits)
    helpers = sorted(env.helper_pids("readopt", "node-a"))
    assert len(helpers) == 2, helpers  # qsd + nbdfuse outlived the attaching process
    assert env.rbd("find", "readopt") == {"device": device, "method": "rbd-nbd"}  # process 2
    assert env.rbd("list") == ["readopt"]
    again, seconds = timed(env.attach, "readopt", pool, image)  # process 3
    assert again["device"] == device and sorted(env.helper_pids("readopt", "node-a")) == helpers
    print(f"\nre-attach (idempotent) {seconds:.2f}s")
    assert env.rbd("condition", "readopt") == {
        "abnormal": False,
        "message": f"attached through rbd-nbd, image {pool}/{NAMESPACE}/{image}, Ceph "
                   "monitors reachable"}
    # an NBD attachment cannot grow online: a clear error, and the device is unchanged
    from driver.attach.rbd import RbdAttacher
    from driver.errors import FailedPrecondition
    attacher = RbdAttacher(env.state("node-a"), mode="userspace")
    assert attacher.grow("readopt", 256 * MiB) == 256 * MiB
    import rbd
    with env.cluster.ioctx(pool) as ioctx:
        ioctx.set_namespace(NAMESPACE)
        with rbd.Image(ioctx, image) as handle:
            handle.resize(512 * MiB)
    with pytest.raises(FailedPrecondition, match="staged again"):
        attacher.grow("readopt", 512 * MiB)
    assert env.rbd("find", "readopt") == {"device": device, "method": "rbd-nbd"}
    other_pool, other = env.image("rep", 64 * MiB)
    refused = env.attach("readopt", other_pool, other, expect_ok=False)
    assert refused["type"] == "FailedPrecondition" and "detach it first" in refused["error"]
    _, seconds = timed(env.rbd, "detach", "readopt")
    print(f"detach {seconds:.2f}s")
    assert env.rbd("find", "readopt") is None
    env.rbd("detach", "readopt")  # detaching again is fine
    env.assert_nothing_left()


# --- 3. the key never shows: command lines, logs, files ---

class PsSampler(threading.Thread):
    """Runs `ps` over and over and keeps every distinct line it saw."""

    def __init__(self):
        super().__init__(daemon=True)
        self.lines: set[str] = set()
        self.stop = threading.Event()
        self.samples = 0

    def run(self):
        while not self.stop.is_set():
            out = subprocess.run(["ps", "-e", "-ww", "-o", "pid,args"], capture_output=True,
                                 text=True, check=False).stdout
            self.lines.update(out.splitlines())
            self.samples += 1


def wrong_key(key: str) -> str:
    """The same cephx key with other secret bytes (the last 16 of the encoded key)."""
    blob = base64.b64decode(key)
    return base64.b64encode(blob[:-16] + bytes(b ^ 0x5A for b in blob[-16:])).decode()


def test_key_never_exposed(rbd_env):
    env = rbd_env
    key = env.cluster.user_key
    pool, image = env.image("rep", 256 * MiB)
    sampler = PsSampler()
    sampler.start()
    try:
        device = env.attach("secret", pool, image)["device"]
        subprocess.run(["dd", "if=/dev/zero", f"of={device}", "bs=1M", "count=4",
                        "oflag=direct"], check=True, capture_output=True)
        # a second "node" attaches the same image while the first holds its lock
        env.attach("secret", pool, image, node="node-b")
        env.rbd("condition", "secret")
        volume_dir = env.volume_dir("secret")
        key_file = volume_dir / "ceph.key"
        assert key_file.read_text() == key
        assert key_file.stat().st_mode & 0o777 == 0o600
        for directory in (volume_dir, volume_dir.parent):
            assert directory.stat().st_mode & 0o077 == 0, directory
        texts = {str(p): p.read_text(errors="replace") for p in volume_dir.iterdir()
                 if p.is_file() and p.name != "ceph.key"}
        assert set(texts) >= {str(volume_dir / n) for n in ("attachment.json", "ceph.conf",
                                                            "qsd.log", "nbdfuse.log")}
        for path, text in texts.items():
            assert key not in text, f"the key is in {path}"
        # a refused attach must not echo it either
        wrong = env.workdir / "wrong.key"
        wrong.write_text(wrong_key(key))
        refused = env.attach("secret-wrong", pool, image, key_file=wrong, expect_ok=False)
        assert refused["type"] == "PermissionDenied", refused
        env.rbd("detach", "secret", node="node-b")
        env.rbd("detach", "secret")
    finally:
        sampler.stop.set()
        sampler.join(10)
    print(f"\n{sampler.samples} ps samples, {len(sampler.lines)} distinct lines")
    assert sampler.samples > 5
    assert any("qemu-storage-daemon" in line and image in line for line in sampler.lines)
    assert not [line for line in sampler.lines if key in line]
    assert not [out for out in env.outputs if key in out], "the key is in a log line"


# --- 4. a lost node's lock: fenced within seconds, not ~30 s ---

def _write(device: str, mib: int = 4, timeout: float = 60) -> float:
    started = time.monotonic()
    subprocess.run(["dd", "if=/dev/urandom", f"of={device}", "bs=1M", f"count={mib}",
                    "oflag=direct"], check=True, capture_output=True, timeout=timeout)
    return time.monotonic() - started


def test_dead_owner_is_fenced(rbd_env):
    """Node A writes (holds the exclusive lock), then dies: its helpers are SIGKILLed and its
    watch lingers for the watch timeout. Node B's attach fences it and writes at once."""
    env = rbd_env
    pool, image = env.image("rep", 256 * MiB)
    device_a = env.attach("lost", pool, image)["device"]
    _write(device_a)
    [owner] = env.lock_owners(pool, image)
    for pid in env.helper_pids("lost", "node-a"):
        os.kill(pid, signal.SIGKILL)
    started = time.monotonic()
    device_b = env.attach("lost", pool, image, node="node-b")["device"]
    attach_seconds = time.monotonic() - started
    write_seconds = _write(device_b)
    print(f"\nattach on node B after node A died {attach_seconds:.2f}s "
          f"(fence after {FENCE_AFTER}s), first write {write_seconds:.2f}s")
    assert attach_seconds < float(FENCE_AFTER) + 8
    assert write_seconds < 5
    assert owner["address"] in env.blocklist()
    assert [o["address"] for o in env.lock_owners(pool, image)] != [owner["address"]]
    # node A's broken attachment is still cleaned up, and quickly
    assert env.rbd("condition", "lost")["abnormal"]
    _, seconds = timed(env.rbd, "detach", "lost")
    print(f"detach of the dead attachment {seconds:.2f}s")
    assert seconds < 15
    env.rbd("detach", "lost", node="node-b")
    env.assert_nothing_left()


def test_live_owner_hands_over_and_a_cut_off_owner_is_fenced(rbd_env):
    """A live owner hands the lock over (no fencing). An owner that cannot answer (stopped,
    like a node cut off from the network) is fenced; when it comes back its I/O fails and its
    condition says so."""
    env = rbd_env
    pool, image = env.image("rep", 256 * MiB)
    device_a = env.attach("handover", pool, image)["device"]
    _write(device_a)
    [owner] = env.lock_owners(pool, image)
    _, seconds = timed(env.attach, "handover", pool, image, node="node-b")
    assert seconds < 3, "a live owner must hand the lock over at once"
    assert owner["address"] not in env.blocklist()
    assert not any('"fenced"' in out for out in env.outputs[-1:])
    env.rbd("detach", "handover", node="node-b")
    _write(device_a)  # A takes the lock back and goes on
    [owner] = env.lock_owners(pool, image)
    qsd = [p for p in env.helper_pids("handover", "node-a")
           if Path(f"/proc/{p}/comm").read_text().strip() == "qemu-storage-da"]
    os.kill(qsd[0], signal.SIGSTOP)  # cut off: cannot answer the lock request
    try:
        _, seconds = timed(env.attach, "handover", pool, image, node="node-b")
        print(f"\nattach on node B with node A cut off {seconds:.2f}s")
        assert owner["address"] in env.blocklist()
    finally:
        os.kill(qsd[0], signal.SIGCONT)
    with pytest.raises(subprocess.CalledProcessError):
        _write(device_a, 1)  # A is fenced: its write fails
    condition = env.rbd("condition", "handover")
    assert condition["abnormal"] and "fenced" in condition["message"], condition
    _write(env.rbd("find", "handover", node="node-b")["device"])  # B is fine
    env.rbd("detach", "handover")
    env.rbd("detach", "handover", node="node-b")
    env.assert_nothing_left()


# --- 5. detach when a helper is dead or hung: bounded, nothing left ---

@pytest.mark.parametrize("fault", ["qsd-stopped", "qsd-killed", "nbdfuse-killed"])
def test_detach_with_broken_helper(rbd_env, fault):
    env = rbd_env
    pool, image = env.image("rep", 256 * MiB)
    volume = f"broken-{fault}"
    device = env.attach(volume, pool, image)["device"]
    target = env.mount_ext4(device, volume)
    (target / "data").write_bytes(os.urandom(MiB))  # dirty pages the unmount would write
    kind = "qemu-storage-da" if fault.startswith("qsd") else "nbdfuse"  # comm: 15 chars
    [pid] = [p for p in env.helper_pids(volume, "node-a")
             if Path(f"/proc/{p}/comm").read_text().strip() == kind]
    os.kill(pid, signal.SIGSTOP if fault.endswith("stopped") else signal.SIGKILL)
    condition = env.rbd("condition", volume)
    assert condition["abnormal"], condition
    if fault.endswith("killed"):
        assert env.rbd("find", volume) is None
    _, seconds = timed(env.rbd, "detach", volume)
    print(f"\ndetach with {fault} {seconds:.2f}s")
    assert seconds < 15
    env.assert_nothing_left()


# --- 6. refused attaches: clear errors, nothing left ---

@pytest.mark.parametrize("case, error_type, words", [
    ("wrong-key", "PermissionDenied", ["client.polyvol", "key"]),
    ("no-such-image", "NotFound", ["does not exist"]),
    ("no-such-pool", "NotFound", ["pool"]),
])
def test_refused_attach_leaves_nothing(rbd_env, case, error_type, words):
    env = rbd_env
    pool, image = env.cluster.rep_pool, "no-such-image"
    key_file = None
    if case == "wrong-key":
        pool, image = env.image("rep", 64 * MiB)
        key_file = env.workdir / "other.key"
        key_file.write_text(wrong_key(env.cluster.user_key))
    elif case == "no-such-pool":
        pool = "no-such-pool"
    answer, seconds = timed(env.attach, f"refused-{case}", pool, image, key_file=key_file,
                            expect_ok=False)
    print(f"\n{case}: {seconds:.2f}s {answer}")
    assert answer["type"] == error_type, answer
    for word in words:
        assert word in answer["error"], answer
    assert seconds < 10
    env.assert_nothing_left()


# --- 7. one OSD stopped while both classes are written: writes go on; health returns ---

RECORD = 64 * 1024


def record_bytes(seq: int) -> bytes:
    body = seq.to_bytes(8, "little") * (RECORD // 8 - 1)
    return body + struct.pack("<II", zlib.crc32(body), 0x0DD5EED5)


class Writer(threading.Thread):
    """Writes 64 KiB records at offset seq*64 KiB with fsync after each; remembers what was
    durable and when each record completed."""

    def __init__(self, device: str, capacity: int):
        super().__init__(daemon=True)
        self.device, self.capacity, self.durable, self.error = device, capacity, 0, None
        self.stop = threading.Event()
        self.done_at: list[float] = []

    def run(self):
        fd = os.open(self.device, os.O_RDWR)
        try:
            seq = 0
            while not self.stop.is_set() and (seq + 1) * RECORD <= self.capacity:
                os.pwrite(fd, record_bytes(seq), seq * RECORD)
                os.fsync(fd)
                seq += 1
                self.durable = seq
                self.done_at.append(time.monotonic())
        except OSError as error:
            self.error = error
        finally:
            os.close(fd)

    def written_between(self, start: float, end: float) -> int:
        return sum(1 for t in self.done_at if start <= t <= end)

    def longest_gap(self) -> float:
        return max((b - a for a, b in zip(self.done_at, self.done_at[1:])), default=0.0)


def test_osd_stopped_while_writing(rbd_env):
    env = rbd_env
    cluster = env.cluster
    volumes = {kind: env.image(kind, IMAGE_BYTES) for kind in ("rep", "ec")}
    writers = {}
    for kind, (pool, image) in volumes.items():
        writers[kind] = Writer(env.attach(f"osd-{kind}", pool, image)["device"], IMAGE_BYTES)
        writers[kind].start()
    time.sleep(3)
    osd = cluster.osd_ids[1]
    stopped_at = time.monotonic()
    down_seconds = cluster.stop_osd(osd, signal.SIGKILL)
    time.sleep(8)
    down_end = time.monotonic()
    assert not cluster.osd_up(osd)
    degraded = cluster.health()
    for kind, writer in writers.items():
        during = writer.written_between(stopped_at + down_seconds, down_end)
        print(f"\n{kind}: {during} records written while osd.{osd} was down "
              f"(marked down after {down_seconds:.1f}s), health {degraded}")
        assert writer.error is None, f"{kind}: the writer saw {writer.error!r}"
        assert during > 0, f"{kind}: writes did not continue with osd.{osd} down"
    up_seconds = cluster.start_osd(osd)
    up_at = time.monotonic()
    healthy_seconds = cluster.wait_healthy(180)
    print(f"osd.{osd} up after {up_seconds:.1f}s, HEALTH_OK after {healthy_seconds:.1f}s more")
    time.sleep(1)
    for kind, writer in writers.items():
        writer.stop.set()
        writer.join(60)
        print(f"{kind}: {writer.durable} records, longest gap between fsyncs "
              f"{writer.longest_gap():.1f}s")
        assert writer.error is None, f"{kind}: the writer saw {writer.error!r}"
        assert writer.is_alive() is False and writer.durable * RECORD < IMAGE_BYTES, \
            f"{kind}: the writer ran out of image; make IMAGE_BYTES larger"
        assert writer.written_between(up_at, time.monotonic()) > 0, \
            f"{kind}: no writes after osd.{osd} came back"
    # read back through fresh attachments: nothing can come from a cache
    for kind, (pool, image) in volumes.items():
        env.rbd("detach", f"osd-{kind}")
        device = env.attach(f"osd-{kind}", pool, image)["device"]
        with open(device, "rb") as disk:
            data = disk.read(writers[kind].durable * RECORD)
        bad = [seq for seq in range(writers[kind].durable)
               if data[seq * RECORD:(seq + 1) * RECORD] != record_bytes(seq)]
        assert bad == [], f"{kind}: {len(bad)} fsync'd records lost or damaged, first {bad[:5]}"
        env.rbd("detach", f"osd-{kind}")
    assert cluster.health() == "HEALTH_OK"
    env.assert_nothing_left()


# --- small pure checks (no cluster needed) ---

def test_target_checks_and_argv(tmp_path):
    from driver.attach import rbd
    from driver.errors import FailedPrecondition, InvalidArgument
    key = "AQBuZ2dpAAAAABAAW0mN0UVYm+0xkZp0Fb5Lqg=="
    good = rbd.RbdTarget("pool", "img", "v2:10.0.0.1:3300,10.0.0.2", "polyvol", key)
    good.check()
    assert key not in repr(good) and key not in json.dumps(good.summary())
    assert rbd.monitor_endpoints(good.monitors) == [("10.0.0.1", 3300), ("10.0.0.2", 3300),
                                                     ("10.0.0.2", 6789)]
    assert rbd.monitor_endpoints("[v2:10.0.0.1:3300,v1:10.0.0.1:6789]") == [
        ("10.0.0.1", 3300), ("10.0.0.1", 6789)]
    for bad in (dict(pool="a,b"), dict(image="x/y"), dict(image="img@snap"),
                dict(monitors="10.0.0.1:3300\nkeyring=/etc/shadow"), dict(monitors=""),
                dict(user="client.polyvol"), dict(key=""), dict(key="not a key!")):
        fields = {"pool": "pool", "image": "img", "monitors": "10.0.0.1", "user": "polyvol",
                  "key": key, **bad}
        with pytest.raises(InvalidArgument) as raised:
            rbd.RbdTarget(**fields).check()
        assert key not in str(raised.value)
    assert rbd.krbd_map_argv("/s/ceph.conf", good) == [
        "rbd", "device", "map", "--conf", "/s/ceph.conf", "--id", "polyvol", "--options",
        "noudev", "pool/img"]
    assert rbd.krbd_unmap_argv("/dev/rbd0", force=True)[-2:] == ["noudev,force", "/dev/rbd0"]
    usable, _ = rbd.krbd_available()
    assert rbd.choose_method("userspace") == rbd.METHOD_NBD
    assert rbd.choose_method("auto") == (rbd.METHOD_KRBD if usable else rbd.METHOD_NBD)
    if not usable:
        with pytest.raises(FailedPrecondition, match="krbd"):
            rbd.choose_method("krbd")
    with pytest.raises(InvalidArgument):
        rbd.choose_method("fastest")
    attacher = rbd.RbdAttacher(tmp_path, mode="userspace")
    assert attacher._vol("rbd-abc").path == tmp_path / "attach-rbd" / "rbd-abc"
    assert attacher.find("rbd-abc") is None and attacher.attached() == []
    attacher.detach("rbd-abc")  # nothing attached: fine
