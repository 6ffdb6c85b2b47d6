"""Data-path benchmark: fio throughput and IOPS of each volume class, against a raw loop device.

    .venv/bin/python bench/datapath.py [--size 1Gi] [--runtime 8] [--layer block|fs]
                 [--classes raw,local,remote,remote-plain,replicated,erasure-coded]

For every class it makes one volume the way a pod gets it (CreateVolume, NodeStageVolume,
NodePublishVolume through a real `polyvol plugin`), fills it once with a sequential write (so
reads and overwrites never touch holes of the sparse backing file), then runs fio, direct=1,
libaio, time-based: sequential 1 MiB write and read (MB/s = 10^6 B/s), 4k random write and
read (IOPS). `--layer block` (default) stages the volume in raw block mode and runs fio on
the published block device; `--layer fs` stages it as ext4 and runs fio on one file in it
(the raw baseline then gets the same mkfs.ext4 and mount).

Classes (rows, in this order; `--classes` picks some):
  raw           the baseline: a sparse file on the same filesystem as the volumes, behind
                `losetup --direct-io=on`, no plugin
  local         local-ephemeral: sparse file + loop device on the node, through the plugin
  remote        remote-disk over the veth link of tests/remote_lab.py (storage server and the
                plugin each in their own network namespace): nbdkit TLS-PSK ->
                qemu-storage-daemon -> nbdfuse -> loop
  remote-plain  the same from a storage server started with --insecure-nbd (the explicit TLS
                opt-out): the volume context says nbd-tls=false and the node attaches without TLS
  replicated    an RBD image in the size-3 pool of a throw-away single-host Ceph cluster
                (tests/ceph_cluster.py: 1 mon, 1 mgr, 3 BlueStore OSDs on sparse files in
                /var/tmp, cephx, 127.0.0.1 only), attached the way CI can: qemu-storage-daemon
                (librbd) -> NBD on a unix socket -> nbdfuse -> loop
  erasure-coded the same with the image's data in the k=2 m=1 EC pool (dataPool), its header
                in a replicated pool
Adding a class: a `CsiClass` with its StorageClass parameters and secrets, and, if it needs a
backend running, an entry in `Env.start` keyed by the name in its `needs` (see "remote" and
"ceph").

The Ceph rows get a plugin of their own, in the machine's network namespace: the cluster
listens on 127.0.0.1 only, which the remote lab's node namespace cannot reach. (Without a
remote row there is one plugin, with the Ceph arguments too.) The cephx key reaches it only
as request secrets, as in a cluster. The cluster takes ~6-15 s to start and is torn down at
the end; its daemons are this run's processes in the CPU table (ceph-osd, ceph-mon, ceph-mgr).

Prints one table (each value also as a ratio of the raw loop's; stage/unstage = the
NodeStageVolume/NodeUnstageVolume time as the client sees it, losetup for the raw loop), then
where the CPU went during each test on this machine: system-wide busy time from /proc/stat
(usr, sys, irq = hard+soft interrupts, which is where loopback/veth TCP runs) and per-process
CPU of everything that ran (fio from its rusage), as % of one core, and CPU per GiB moved or
per IO. Everything the run made is deleted, unmounted, detached and stopped at the end, also
on errors and on SIGINT/SIGTERM, and then checked. Exit status: 0 when every class ran and
nothing was left behind.

Reading the numbers: everything shares one machine's CPUs, so a remote-disk row pays for the
node's helpers AND the storage server's nbdkit, and a Ceph row for the node's helpers AND all
three OSDs (a replicated write is written three times, an EC write as 2 data + 1 parity
chunks, all on the same disk), and the CPU table is the main result on small machines. The
storage server's nbdkit writes through its page cache (no O_DIRECT), so remote rows measure
the transport, not the server's disk; the raw loop, local-ephemeral and the OSDs (BlueStore
opens its block file with O_DIRECT) go to the disk with direct I/O (whatever the hypervisor
caches below). The raw loop and local-ephemeral use the same kernel path; their difference is
the noise of the run. The line "before the run" and the "other" column say whether other work
on the machine disturbed it.
"""

import argparse
import contextlib
import json
import os
import platform
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(1, str(REPO / "bench"))  # lifecycle.py, also when not run as a script

import tests.conftest as conftest  # noqa: E402

# tests/remote_lab.py imports `conftest` and `netlab` as top-level modules (pytest's view):
# give it the module already loaded instead of a second copy.
sys.modules.setdefault("conftest", conftest)
sys.path.insert(2, str(REPO / "tests"))

from driver import fs  # noqa: E402
from driver.backends.ceph import SECRET_KEY, SECRET_USER  # noqa: E402
from driver.backends.remote_disk import CTX_NBD_TLS  # noqa: E402
from driver.proto import csi_pb2  # noqa: E402
from driver.units import format_size, parse_size  # noqa: E402
from lifecycle import describe, leftovers  # noqa: E402 - bench/ is this script's directory
from ceph_cluster import running_cluster  # noqa: E402
from remote_lab import RemoteCluster  # noqa: E402

Plugin, capability, clean_up_below = conftest.Plugin, conftest.capability, conftest.clean_up_below
MiB, GiB = 1 << 20, 1 << 30
FS_TYPE = "ext4"


# --- what is measured ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Test:
    key: str
    title: str
    rw: str
    bs: str
    unit: str  # "MB/s" or "IOPS"
    sequential: bool

    @property
    def direction(self) -> str:
        return "read" if "read" in self.rw else "write"


TESTS = (Test("seq-write", "seq write 1M", "write", "1M", "MB/s", True),
         Test("seq-read", "seq read 1M", "read", "1M", "MB/s", True),
         Test("rand-write", "4k rand write", "randwrite", "4k", "IOPS", False),
         Test("rand-read", "4k rand read", "randread", "4k", "IOPS", False))


@dataclass
class Result:
    value: float          # MB/s or IOPS
    bytes_per_s: float
    iops: float
    p99_ms: float
    cpu: "CpuUsage"


@dataclass
class Row:
    label: str
    results: dict = field(default_factory=dict)  # test key -> Result
    stage_ms: float | None = None
    unstage_ms: float | None = None
    fill_mbs: float | None = None
    notes: list = field(default_factory=list)
    error: str = ""


# --- CPU accounting -----------------------------------------------------------------------------

CLK_TCK = os.sysconf("SC_CLK_TCK")
_ALIASES = {"qemu-storage-da": "qemu-storage-daemon"}


def _process_name(comm: str) -> str:
    if comm.startswith("kworker"):
        return "kworker"
    comm = _ALIASES.get(comm, comm).split("/")[0]  # ksoftirqd/1 -> ksoftirqd
    return re.sub(r"\d+$", "", comm) or comm         # loop3 -> loop


def _system_ticks() -> list[int]:
    # user nice system idle iowait irq softirq steal
    return [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]


OTHERS = "(not this run)"
PF_KTHREAD = 0x00200000  # /proc/PID/stat flags
_run_markers: list[str] = []  # the work directory (set by main()), the Ceph cluster's directory
_owners: dict = {}  # (pid, start time) -> name to account under, or OTHERS


def _owner(pid: str, start: str, name: str, kernel_thread: bool) -> str:
    """The accounting name of a process: kernel threads and this run's processes (the bench,
    the plugin, storage servers and their helpers: their command lines name the work
    directory; the Ceph daemons name the cluster's directory) by name; everything else on the
    machine is OTHERS, so a busy shared machine shows as such instead of being charged to a
    class."""
    key = (pid, start)
    if key not in _owners:
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            cmdline = b""
        if int(pid) == os.getpid():
            _owners[key] = "bench"
        elif kernel_thread or any(marker.encode() in cmdline for marker in _run_markers):
            _owners[key] = name
        else:
            _owners[key] = OTHERS
    return _owners[key]


def _process_ticks() -> dict:
    """(pid, start time) -> (accounting name, utime + stime ticks) of every process (threads
    summed)."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            text = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        comm = text[text.index("(") + 1:text.rindex(")")]
        fields = text[text.rindex(")") + 2:].split()
        kernel_thread = bool(int(fields[6]) & PF_KTHREAD)
        found[(entry, fields[19])] = (_owner(entry, fields[19], _process_name(comm), kernel_thread),
                                      int(fields[11]) + int(fields[12]))
    return found


@dataclass
class CpuUsage:
    """Average cores busy over a window (1.0 = one core fully busy)."""
    seconds: float
    busy: float
    user: float
    system: float
    irq: float
    steal: float
    by_name: dict  # process name -> cores


class CpuWindow:
    def __enter__(self):
        self.started = time.monotonic()
        self.system = _system_ticks()
        self.processes = _process_ticks()
        self.children = resource.getrusage(resource.RUSAGE_CHILDREN)
        return self

    def __exit__(self, *exc):
        seconds = max(1e-6, time.monotonic() - self.started)
        delta = [b - a for a, b in zip(self.system, _system_ticks())]
        user, nice, system, idle, iowait, irq, softirq, steal = delta

        def cores(ticks):
            return ticks / CLK_TCK / seconds
        by_name = {}
        for key, (name, ticks) in _process_ticks().items():
            used = ticks - (self.processes[key][1] if key in self.processes else 0)
            if used > 0:
                by_name[name] = by_name.get(name, 0.0) + cores(used)
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        fio = (children.ru_utime - self.children.ru_utime + children.ru_stime
               - self.children.ru_stime)
        by_name["fio"] = by_name.get("fio", 0.0) + fio / seconds  # fio exited: from its rusage
        self.usage = CpuUsage(seconds, cores(user + nice + system + irq + softirq),
                              cores(user + nice), cores(system), cores(irq + softirq),
                              cores(steal), by_name)
        return False


# --- fio --------------------------------------------------------------------------------------

def fio(target: str, size: int, test: Test | None, args, fill: bool = False) -> tuple[dict, CpuUsage]:
    """One fio job on `target`; returns (its JSON job, the CPU used meanwhile). `fill` writes
    the whole target once, sequentially (not time-based)."""
    # --thread: the job is a thread of the one fio process, so when the run is interrupted
    # (subprocess.run kills fio) nothing is left holding the device open.
    argv = ["fio", "--name=bench", f"--filename={target}", f"--size={size}", "--direct=1",
            "--ioengine=libaio", "--thread", "--output-format=json", "--group_reporting"]
    if fill:
        argv += ["--rw=write", "--bs=1M", f"--iodepth={args.seq_iodepth}"]
    else:
        iodepth = args.seq_iodepth if test.sequential else args.rand_iodepth
        argv += [f"--rw={test.rw}", f"--bs={test.bs}", f"--iodepth={iodepth}", "--time_based",
                 f"--runtime={args.runtime}", f"--ramp_time={args.ramp}"]
        if not test.sequential:
            argv += ["--norandommap", "--randrepeat=0"]
    with CpuWindow() as window:
        done = subprocess.run(argv, capture_output=True, text=True,
                              timeout=args.runtime + args.ramp + 600)
    if done.returncode != 0:
        raise RuntimeError(f"fio failed ({done.returncode}): {done.stderr.strip()[-800:]}")
    report = json.loads(done.stdout[done.stdout.index("{"):])
    job = report["jobs"][0]
    if job.get("error"):
        raise RuntimeError(f"fio job error {job['error']}: {done.stderr.strip()[-800:]}")
    return job, window.usage


def measure(target: str, size: int, test: Test, args) -> Result:
    job, cpu = fio(target, size, test, args)
    side = job[test.direction]
    percentiles = side.get("clat_ns", {}).get("percentile", {})
    p99 = percentiles.get("99.000000", 0) / 1e6
    value = side["bw_bytes"] / 1e6 if test.unit == "MB/s" else side["iops"]
    return Result(value, side["bw_bytes"], side["iops"], p99, cpu)


# --- the classes (rows) ---------------------------------------------------------------------------

class BenchClass:
    """One row. `attach` returns the fio target (a block device or a file) and sets stage_ms;
    `detach` undoes it and sets unstage_ms; `release` is the best-effort version for errors
    (safe to call in any state)."""
    key = ""
    label = ""
    needs: tuple = ()  # environments Env.start brings up for it

    def attach(self, env: "Env", row: Row) -> tuple[str, int]:
        raise NotImplementedError

    def detach(self, env: "Env", row: Row) -> None:
        raise NotImplementedError

    def release(self, env: "Env") -> None:
        pass


def timed(call) -> float:
    started = time.monotonic()
    call()
    return (time.monotonic() - started) * 1000


def fs_file_size(volume_bytes: int) -> int:
    """The fio file in --layer fs: room left for ext4's journal and metadata."""
    return max(64 * MiB, int(volume_bytes * 0.85) // MiB * MiB)


class RawLoop(BenchClass):
    key, label = "raw", "raw loop"

    def __init__(self):
        self.device = None
        self.mountpoint = None

    def attach(self, env, row):
        backing = env.workdir / "raw" / "disk.img"
        backing.parent.mkdir()
        with open(backing, "wb") as handle:
            handle.truncate(env.size)  # sparse, like every volume file
        env.check_same_filesystem(backing, self.label)

        def setup():
            self.device = subprocess.run(
                ["losetup", "--find", "--show", "--direct-io=on", str(backing)],
                check=True, capture_output=True, text=True).stdout.strip()
            if env.layer == "fs":
                fs.ensure_formatted(self.device, FS_TYPE)  # the plugin's own mkfs options
                self.mountpoint = str(env.workdir / "raw" / "mnt")
                fs.ensure_mounted(self.device, self.mountpoint, FS_TYPE)
        row.stage_ms = timed(setup)
        dio = Path(f"/sys/block/{os.path.basename(self.device)}/loop/dio").read_text().strip()
        row.notes.append(f"{self.device} over a sparse file, dio={dio}")
        if env.layer == "fs":
            return f"{self.mountpoint}/fio.dat", fs_file_size(env.size)
        return self.device, env.size

    def detach(self, env, row):
        def teardown():
            if self.mountpoint:
                fs.ensure_unmounted(self.mountpoint)
                self.mountpoint = None
            subprocess.run(["losetup", "--detach", self.device], check=True, capture_output=True)
            self.device = None
        row.unstage_ms = timed(teardown)

    def release(self, env):
        if self.mountpoint:
            subprocess.run(["umount", self.mountpoint], check=False, capture_output=True)
        if self.device:
            subprocess.run(["losetup", "--detach", self.device], check=False, capture_output=True)
        self.device = self.mountpoint = None


class CsiClass(BenchClass):
    """A volume through the plugin: create, stage, publish; unpublish, unstage, delete."""
    needs = ("plugin",)
    storage_class_type = ""

    def __init__(self):
        self.volume = None
        self.staged = self.published = False

    def parameters(self, env) -> dict:
        return {"type": self.storage_class_type}

    def secrets(self, env) -> dict:
        return {}

    def create(self, env, cap) -> csi_pb2.Volume:
        return env.create_volume(f"datapath-{self.key}", cap, self.parameters(env),
                                 self.secrets(env), plugin=env.plugin_for(self))

    def paths(self, env) -> tuple[str, str]:
        plugin = env.plugin_for(self)
        return plugin.path(self.key, "staging"), plugin.path(self.key, "target")

    def attach(self, env, row):
        block = env.layer == "block"
        cap = capability(block=block, fs_type="" if block else FS_TYPE)
        self.volume = self.create(env, cap)
        staging, target = self.paths(env)
        os.makedirs(staging, exist_ok=True)
        node, volume = env.plugin_for(self).node, self.volume
        row.stage_ms = timed(lambda: node.NodeStageVolume(csi_pb2.NodeStageVolumeRequest(
            volume_id=volume.volume_id, staging_target_path=staging, volume_capability=cap,
            volume_context=volume.volume_context, secrets=self.secrets(env)), timeout=180))
        self.staged = True
        publish_ms = timed(lambda: node.NodePublishVolume(csi_pb2.NodePublishVolumeRequest(
            volume_id=volume.volume_id, staging_target_path=staging, target_path=target,
            volume_capability=cap, volume_context=volume.volume_context,
            secrets=self.secrets(env)), timeout=180))
        self.published = True
        row.notes.append(f"{volume.volume_id}, publish {publish_ms:.0f} ms"
                         + self.attach_note(env))
        if block:
            return target, env.size
        return f"{target}/fio.dat", fs_file_size(env.size)

    def attach_note(self, env) -> str:
        return ""

    def detach(self, env, row):
        staging, target = self.paths(env)
        node, volume_id = env.plugin_for(self).node, self.volume.volume_id
        node.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(
            volume_id=volume_id, target_path=target), timeout=180)
        self.published = False
        row.unstage_ms = timed(lambda: node.NodeUnstageVolume(csi_pb2.NodeUnstageVolumeRequest(
            volume_id=volume_id, staging_target_path=staging), timeout=180))
        self.staged = False
        env.delete_volume(volume_id)
        self.volume = None

    def release(self, env):
        plugin = env.plugin_for(self)
        if self.volume is None or plugin is None or plugin.process is None:
            return
        staging, target = self.paths(env)
        volume_id = self.volume.volume_id
        for call, request in ((plugin.node.NodeUnpublishVolume, csi_pb2.NodeUnpublishVolumeRequest(
                volume_id=volume_id, target_path=target)),
                (plugin.node.NodeUnstageVolume, csi_pb2.NodeUnstageVolumeRequest(
                    volume_id=volume_id, staging_target_path=staging))):
            for _ in range(5):  # a device still closing (an interrupted fio) makes it busy
                try:
                    call(request, timeout=180)
                    break
                except Exception:  # noqa: BLE001 - best effort; leftovers are checked afterwards
                    time.sleep(1)
        self.volume = None  # Env.close deletes every volume it created


class LocalEphemeral(CsiClass):
    key, label, storage_class_type = "local", "local-ephemeral", "local-ephemeral"


class RemoteDisk(CsiClass):
    key, label, storage_class_type = "remote", "remote-disk", "remote-disk"
    needs = ("plugin", "remote")
    tls = True

    def create(self, env, cap):
        return env.remote_volume(self.tls, cap)

    def attach_note(self, env):
        volume_id = self.volume.volume_id
        for line in reversed(env.plugin.log_lines()):
            if line.get("event") == "nbd attached" and line.get("volume_id") == volume_id:
                if bool(line.get("tls")) != self.tls:
                    raise RuntimeError(f"{self.label}: attached with tls={line.get('tls')}")
                return (f", {line.get('method')} from {line.get('host')}:{line.get('port')}, "
                        f"tls={line.get('tls')}, attach {line.get('ms')} ms in the plugin")
        raise RuntimeError(f"{self.label}: no 'nbd attached' line in the plugin log")


class RemoteDiskPlain(RemoteDisk):
    key, label = "remote-plain", "remote-disk (no TLS)"
    tls = False


class CephClass(CsiClass):
    """An RBD image in the run's Ceph cluster (Env "ceph"), through the Ceph rows' plugin."""
    needs = ("plugin", "ceph")

    def parameters(self, env):
        return env.ceph_parameters(self.storage_class_type)

    def secrets(self, env):
        return env.ceph_secrets()

    def attach_note(self, env):
        volume_id = self.volume.volume_id
        for line in reversed(env.plugin_for(self).log_lines()):
            if line.get("event") in ("nbd attached", "rbd attached") and line.get("volume_id") == volume_id:
                pools = line.get("pool", "?") + (f" + data {line['data_pool']}"
                                                 if line.get("data_pool") else "")
                return (f", {line.get('method')} of {pools}/{line.get('image')}, attach "
                        f"{line.get('ms')} ms in the plugin")
        raise RuntimeError(f"{self.label}: no 'nbd attached' or 'rbd attached' line in the plugin log")


class Replicated(CephClass):
    key, label, storage_class_type = "replicated", "replicated (3x)", "replicated"


class ErasureCoded(CephClass):
    key, label, storage_class_type = "erasure-coded", "erasure-coded (2+1)", "erasure-coded"


CLASSES = {c.key: c for c in (RawLoop, LocalEphemeral, RemoteDisk, RemoteDiskPlain, Replicated,
                              ErasureCoded)}
BASELINE = RawLoop.key


# --- environments: the plugin, the storage lab ---------------------------------------------------

class Env:
    """What the selected classes need, started once: "plugin" (a `polyvol plugin` on a unix
    socket), "remote" (tests/remote_lab.py's RemoteCluster with srv1 serving NBD over TLS-PSK
    and, with `plain_server`, srv2 with --insecure-nbd; the plugin then runs in the lab's node
    namespace), "ceph" (tests/ceph_cluster.py's throw-away cluster and a --ceph-config naming
    it; the Ceph rows' plugin runs in the machine's network namespace, where the cluster's
    127.0.0.1 is: the main plugin when there is no remote lab, else a second plugin)."""
    TLS_SERVER, PLAIN_SERVER = "srv1", "srv2"
    CEPH_CLUSTER_ID = "polyvol-bench"

    def __init__(self, workdir: Path, needs: set, size: int, layer: str, plain_server: bool = True):
        self.workdir, self.needs, self.size, self.layer = workdir, needs, size, layer
        self.plain_server = plain_server
        self.plugin = None
        self.ceph_plugin = None  # the plugin of the Ceph rows (may be self.plugin)
        self.cluster = None
        self.ceph = None  # tests/ceph_cluster.CephCluster
        self._ceph_context = contextlib.ExitStack()
        self.created: dict[str, tuple] = {}  # volume id -> (plugin, secrets), until deleted
        self.remote_volumes: dict[bool, csi_pb2.Volume] = {}

    def start(self) -> None:
        extra_args, prefix, ceph_args = [], [], []
        if "ceph" in self.needs:
            started = time.monotonic()
            self.ceph = self._ceph_context.enter_context(running_cluster())
            _run_markers.append(str(self.ceph.directory) + "/")
            config = self.workdir / "ceph-config.json"
            config.write_text(json.dumps({"clusters": [{"clusterID": self.CEPH_CLUSTER_ID,
                                                        "monitors": [self.ceph.mon_host]}]}))
            ceph_args = ["--ceph-config", str(config), "--rbd-attach", "userspace"]
            print(f"ceph cluster up in {time.monotonic() - started:.1f} s ({self.ceph.directory}, "
                  f"{self.ceph.monitors}, health {self.ceph.health()})", flush=True)
        if "remote" in self.needs:
            servers, plain = (2, [self.PLAIN_SERVER]) if self.plain_server else (1, [])
            self.cluster = RemoteCluster(self.workdir, servers=servers, insecure_nbd=plain)
            self.cluster.__enter__()
            extra_args, prefix = self.cluster.plugin_args, self.cluster.node_prefix
        if "plugin" in self.needs:
            shared = self.cluster is None  # no lab: one plugin, in this namespace, for all rows
            self.plugin = Plugin(self.workdir, extra_args=extra_args + (ceph_args if shared else []),
                                 argv_prefix=prefix, node_id="node-bench")
            self.plugin.start()
            self.check_same_filesystem(self.plugin.state_dir, "the plugin's state directory")
            if ceph_args:
                self.ceph_plugin = self.plugin if shared else Plugin(
                    self.workdir / "ceph-client", extra_args=ceph_args, node_id="node-bench")
                if self.ceph_plugin is not self.plugin:
                    self.ceph_plugin.start()

    def plugin_for(self, bench: "BenchClass") -> Plugin | None:
        return self.ceph_plugin if "ceph" in bench.needs else self.plugin

    def ceph_parameters(self, class_type: str) -> dict:
        """The StorageClass parameters of a Ceph class on the run's cluster."""
        parameters = {"type": class_type, "clusterID": self.CEPH_CLUSTER_ID,
                      "pool": self.ceph.rep_pool}
        if class_type == "erasure-coded":
            parameters.update(pool=self.ceph.ec_meta_pool, dataPool=self.ceph.ec_data_pool)
        return parameters

    def ceph_secrets(self) -> dict:
        """The cephx user and key, as a StorageClass's secrets give them (never an argument)."""
        return {SECRET_USER: self.ceph.user_id, SECRET_KEY: self.ceph.user_key}

    def check_same_filesystem(self, path: Path, what: str) -> None:
        if os.stat(path).st_dev != os.stat(self.workdir).st_dev:
            raise RuntimeError(f"{what} ({path}) is not on the work directory's filesystem")

    def create_volume(self, name: str, cap, parameters: dict, secrets: dict,
                      plugin: Plugin | None = None) -> csi_pb2.Volume:
        plugin = plugin or self.plugin
        volume = plugin.controller.CreateVolume(csi_pb2.CreateVolumeRequest(
            name=name, capacity_range=csi_pb2.CapacityRange(required_bytes=self.size),
            volume_capabilities=[cap], parameters=parameters, secrets=secrets), timeout=180).volume
        self.created[volume.volume_id] = (plugin, secrets)
        if volume.capacity_bytes != self.size:
            raise RuntimeError(f"{name}: asked {self.size} bytes, got {volume.capacity_bytes}")
        return volume

    def delete_volume(self, volume_id: str) -> None:
        plugin, secrets = self.created[volume_id]
        plugin.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(
            volume_id=volume_id, secrets=secrets), timeout=180)
        self.created.pop(volume_id, None)

    def remote_volume(self, tls: bool, cap) -> csi_pb2.Volume:
        """A remote-disk volume on the TLS or the plain server. Placement picks servers by
        room, so one volume is made on each server at once, in one spread group (required:
        no two on one server), and each is told apart by its context's nbd-tls."""
        if not self.remote_volumes:
            for server in self.cluster.names:
                volume = self.create_volume(f"datapath-remote-{server}", cap, {
                    "type": "remote-disk", "spreadGroup": "bench/datapath",
                    "spreadPolicy": "required"}, {})
                self.remote_volumes[volume.volume_context[CTX_NBD_TLS] == "true"] = volume
            expected = {True, False} if self.plain_server else {True}
            if set(self.remote_volumes) != expected:
                raise RuntimeError(f"expected {len(expected)} remote volume(s) with nbd-tls "
                                   f"{sorted(expected)}, got "
                                   f"{[v.volume_context for v in self.remote_volumes.values()]}")
        return self.remote_volumes[tls]

    def delete_all(self, problems: list) -> None:
        """Delete every volume the run made and still has (through the plugin that made it)."""
        for volume_id, (plugin, _) in list(self.created.items()):
            if plugin.process is None:
                continue
            try:
                self.delete_volume(volume_id)
            except Exception as error:  # noqa: BLE001
                problems.append(f"deleting {volume_id}: {describe(error)}")

    def close(self, problems: list) -> None:
        self.delete_all(problems)
        ceph_plugin = self.ceph_plugin if self.ceph_plugin is not self.plugin else None
        for what, stop in (("plugin", self.plugin and self.plugin.stop),
                           ("Ceph rows' plugin", ceph_plugin and ceph_plugin.stop),
                           ("storage lab", self.cluster and self.cluster.close),
                           ("Ceph cluster", self._ceph_context.close)):
            if stop:
                try:
                    stop()
                except Exception as error:  # noqa: BLE001
                    problems.append(f"stopping the {what}: {describe(error)}")

    def leftovers(self) -> list[str]:
        """After close: what is left of the Ceph cluster (its directory, its processes)."""
        if self.ceph is None:
            return []
        directory = self.ceph.directory
        return leftover_processes(directory) + ([f"Ceph directory {directory}"] if directory.exists() else [])


# --- the run ---------------------------------------------------------------------------------

def run_class(bench: BenchClass, env: Env, args) -> Row:
    row = Row(bench.label)
    started = time.monotonic()
    try:
        target, size = bench.attach(env, row)
        job, _ = fio(target, size, None, args, fill=True)
        row.fill_mbs = job["write"]["bw_bytes"] / 1e6
        for test in TESTS:
            row.results[test.key] = measure(target, size, test, args)
        bench.detach(env, row)
    except Exception as error:  # noqa: BLE001 - reported in the table, the run goes on
        row.error = describe(error)
        bench.release(env)
    print(f"  {row.label}: {'done' if not row.error else 'FAILED: ' + row.error} "
          f"({time.monotonic() - started:.0f} s)", flush=True)
    return row


def human(value: float, unit: str) -> str:
    if unit == "IOPS":
        return f"{value / 1000:.1f}k" if value >= 1000 else f"{value:.0f}"
    return f"{value:.0f}"


def print_table(rows: list[Row], baseline: Row | None) -> None:
    head = [f"{t.title} {t.unit}" for t in TESTS]
    cell = 21
    header = f"{'class':<22}" + "".join(f"{h:>{cell}}" for h in head) + f"{'stage ms':>10}{'unstage ms':>12}"
    print(header)
    print("-" * len(header))
    for row in rows:
        line = f"{row.label:<22}"
        for test in TESTS:
            result = row.results.get(test.key)
            if result is None:
                line += f"{'-':>{cell}}"
                continue
            base = baseline.results.get(test.key) if baseline else None
            ratio = f"({result.value / base.value:.2f}x)" if base and base.value else "(-)"
            line += f"{human(result.value, test.unit):>{cell - 9}} {ratio:>8}"
        for ms, width in ((row.stage_ms, 10), (row.unstage_ms, 12)):
            line += f"{ms:>{width}.0f}" if ms is not None else f"{'-':>{width}}"
        print(line)
        if row.error:
            print(f"{'':<22}FAILED: {row.error}")


def print_cpu(rows: list[Row], cores: int) -> None:
    print(f"\nCPU during each test, % of one core ({cores} cores = {cores * 100} %). busy = usr+sys+irq "
          "of the whole machine; irq = hard+soft interrupts (TCP over veth, block completions); "
          "other = processes that are not this run's (a shared machine); CPU/unit = (busy - other) "
          "per GiB moved or per IO")
    header = (f"{'class':<22}{'test':<15}{'result':>9}{'busy':>6}{'usr':>5}{'sys':>5}{'irq':>5}"
              f"{'other':>6}{'CPU/unit':>13}  processes of this run, kernel threads")
    print(header)
    print("-" * (len(header) + 40))
    for row in rows:
        for test in TESTS:
            result = row.results.get(test.key)
            if result is None:
                continue
            cpu = result.cpu
            ours = max(0.0, cpu.busy - cpu.by_name.get(OTHERS, 0.0))
            if test.sequential:
                per = f"{ours / (result.bytes_per_s / GiB):.2f} s/GiB" if result.bytes_per_s else "-"
            else:
                per = f"{ours / result.iops * 1e6:.0f} us/IO" if result.iops else "-"
            top = sorted(((c, n) for n, c in cpu.by_name.items() if c >= 0.02 and n != OTHERS),
                         reverse=True)[:6]
            processes = ", ".join(f"{n} {c * 100:.0f}" for c, n in top)
            steal = f" (steal {cpu.steal * 100:.0f})" if cpu.steal >= 0.02 else ""
            print(f"{row.label:<22}{test.title:<15}{human(result.value, test.unit):>9}"
                  f"{cpu.busy * 100:>6.0f}{cpu.user * 100:>5.0f}{cpu.system * 100:>5.0f}"
                  f"{cpu.irq * 100:>5.0f}{cpu.by_name.get(OTHERS, 0) * 100:>6.0f}{per:>13}  "
                  f"{processes}{steal}")


def leftover_processes(workdir: Path) -> list[str]:
    """Processes whose command line names the work directory (plugin, servers, helpers), or
    another directory of the run (the Ceph cluster's)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if any(str(workdir).encode() in a for a in argv):
                found.append(f"pid {entry} ({argv[0].decode(errors='replace')})")
    return found


def leftover_namespaces() -> list[str]:
    netns = Path("/run/netns")
    mine = f"pvlab{os.getpid()}-"
    return [f"netns {n}" for n in (os.listdir(netns) if netns.is_dir() else []) if n.startswith(mine)]


def _stop_handler(main_pid: int):
    """Unwind the run (its `finally` cleans up) in this process only: a fork of it (pyroute2
    creates namespaces in forked children, which it then stops with a signal) must just exit,
    never run the clean-up, which would tear down the lab under the real run."""
    def handler(signum, frame):
        if os.getpid() != main_pid:
            os._exit(128 + signum)
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        sys.exit(128 + signum)
    return handler


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=parse_size, default=parse_size("1Gi"),
                        help="volume size (default 1Gi)")
    parser.add_argument("--runtime", type=int, default=8, help="seconds per fio test (default 8)")
    parser.add_argument("--ramp", type=int, default=1,
                        help="seconds of each test not counted, before the runtime (default 1)")
    parser.add_argument("--seq-iodepth", type=int, default=16, help="1 MiB tests (default 16)")
    parser.add_argument("--rand-iodepth", type=int, default=32, help="4k tests (default 32)")
    parser.add_argument("--layer", choices=("block", "fs"), default="block",
                        help="block: fio on the published block device (default); fs: on a file "
                             f"in {FS_TYPE} on the volume")
    parser.add_argument("--classes", default=",".join(CLASSES),
                        help=f"comma-separated rows, from {', '.join(CLASSES)} (default: all)")
    parser.add_argument("--dir", default=None, help="parent of the temporary work directory")
    args = parser.parse_args(argv)
    keys = [k.strip() for k in args.classes.split(",") if k.strip()]
    unknown = [k for k in keys if k not in CLASSES]
    if unknown or not keys:
        parser.error(f"--classes: unknown {unknown}; choose from {', '.join(CLASSES)}")
    if args.runtime < 1 or args.ramp < 0 or args.size < 64 * MiB:
        parser.error("--runtime must be at least 1, --ramp at least 0, --size at least 64Mi")
    if args.size % MiB:
        parser.error("--size must be a whole number of MiB")
    if os.geteuid() != 0:
        parser.error("run as root (loop devices, mounts, network namespaces)")
    # SIGTERM and SIGINT (even when inherited as ignored) end the run through the clean-up.
    signal.signal(signal.SIGTERM, _stop_handler(os.getpid()))
    signal.signal(signal.SIGINT, _stop_handler(os.getpid()))
    benches = [CLASSES[k]() for k in dict.fromkeys(keys)]
    needs = {n for bench in benches for n in bench.needs}

    workdir = Path(tempfile.mkdtemp(prefix="polyvol-bench-", dir=args.dir))
    _run_markers[:] = [str(workdir)]
    env = Env(workdir, needs, args.size, args.layer)
    rows, problems = [], []
    kept_log = Path(tempfile.gettempdir()) / "polyvol-datapath-failed.log"
    kept_ceph_log = Path(tempfile.gettempdir()) / "polyvol-datapath-ceph-failed.log"  # 2nd plugin
    cores = os.cpu_count() or 1
    try:
        fstype = next((m.fstype for m in fs.mounts() if m.target == "/"), "?")
        print(f"polyvol datapath benchmark: {format_size(args.size)} volumes, layer {args.layer}"
              f"{f' ({FS_TYPE} file of {format_size(fs_file_size(args.size))})' if args.layer == 'fs' else ''}, "
              f"fio direct=1 libaio, {args.runtime} s (+{args.ramp} s ramp) per test, iodepth "
              f"{args.seq_iodepth} (1M) / {args.rand_iodepth} (4k), each volume filled once first")
        print(f"work directory {workdir} ({fstype} on /), kernel {platform.release()}, "
              f"{cores} cores, {subprocess.run(['fio', '--version'], capture_output=True, text=True).stdout.strip()}")
        with CpuWindow() as idle:
            time.sleep(2)
        quiet = idle.usage
        print(f"before the run, 2 s: machine busy {quiet.busy * 100:.0f} % of one core, "
              f"{quiet.by_name.get(OTHERS, 0) * 100:.0f} % by other processes"
              + ("  <- a busy machine: expect noisy numbers" if quiet.busy > 0.2 else ""))
        env.start()
        for bench in benches:
            rows.append(run_class(bench, env, args))
        baseline = next((r for r, b in zip(rows, benches) if b.key == BASELINE and not r.error), None)
        print()
        print_table(rows, baseline)
        print("\nnotes:")
        for row in rows:
            fill = f"fill {row.fill_mbs:.0f} MB/s" if row.fill_mbs else "no fill"
            print(f"  {row.label}: {fill}; {'; '.join(row.notes) or '-'}")
        print_cpu(rows, cores)
        problems += [f"{row.label}: {row.error}" for row in rows if row.error]
    except (KeyboardInterrupt, SystemExit) as stop:
        problems.append(f"interrupted ({type(stop).__name__}); cleaned up, no table")
    except Exception as error:  # noqa: BLE001
        problems.append(f"benchmark failed: {describe(error)}")
    finally:
        for bench in benches:
            try:
                bench.release(env)
            except Exception as error:  # noqa: BLE001
                problems.append(f"releasing {bench.label}: {describe(error)}")
        env.close(problems)
        if env.plugin is not None and env.plugin.log_path.exists():
            shutil.copyfile(env.plugin.log_path, kept_log)
        if env.ceph_plugin not in (None, env.plugin) and env.ceph_plugin.log_path.exists():
            shutil.copyfile(env.ceph_plugin.log_path, kept_ceph_log)
        clean_up_below(workdir)
        left = (leftovers(workdir) + leftover_processes(workdir) + leftover_namespaces()
                + env.leftovers())
        if left:
            problems.append(f"left behind after clean-up: {', '.join(left)}")
        else:
            subprocess.run(["rm", "-rf", "--one-file-system", str(workdir)], check=False)
    if not problems:
        kept_log.unlink(missing_ok=True)
        kept_ceph_log.unlink(missing_ok=True)
        print("\nclean-up checked: no volume, mount, loop device, process or namespace left"
              + (", Ceph cluster torn down" if env.ceph is not None else ""))
        return 0
    second = env.ceph_plugin not in (None, env.plugin)
    logs = " and ".join(str(p) for p in (kept_log, kept_ceph_log) if p.exists()
                        and (p is kept_log or second))
    print(f"\n{len(problems)} error(s) (plugin log kept at {logs or '-'}):", file=sys.stderr)
    for problem in problems[:20]:
        print(f"  {problem}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
