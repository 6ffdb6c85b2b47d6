"""A real, throw-away, single-host Ceph cluster for the tests (Ceph Pacific from Debian).

    with running_cluster() as cluster:          # or the session fixture `ceph_cluster`
        cluster.monitors, cluster.user_id, cluster.user_key, cluster.rep_pool, ...

What it is: 1 mon, 1 mgr and 3 BlueStore OSDs on sparse files, cephx on, every daemon bound
to 127.0.0.1 on ports nobody else uses, everything (config, keys, data, logs, sockets) in one
directory `/var/tmp/polyvol-ceph-*` (BlueStore opens its block file with O_DIRECT, which tmpfs
refuses, so not under a tmpfs /tmp). Pools:

    rep_pool      "polyvol-rep"       replicated, size 3, min_size 2   (type: replicated)
    ec_meta_pool  "polyvol-ec-meta"   replicated, size 3: image metadata of EC images
    ec_data_pool  "polyvol-ec"        erasure-coded k=2 m=1, allow_ec_overwrites (the dataPool)

and a cephx user `client.polyvol` with the caps an RBD CSI driver needs and no more: `profile
rbd` on the mon (which includes adding a dead lock holder to the OSD blocklist) and `profile
rbd pool=...` on the OSDs and the mgr for exactly those three pools.

Daemons run in the foreground (`-f`) as children of the test process, each in its own session;
`teardown` SIGKILLs them all (the data is thrown away, so a clean shutdown buys nothing and
costs seconds) together with any other process whose command line names the directory, then
removes the directory. The directory holds `owner.json` naming the test process: a later
start removes the directories (and kills the processes) of runs whose owner is gone, e.g. a
pytest that was killed, and leaves a concurrently running session's cluster alone.

Settings that matter on a small CI machine (see ../shared/design.md): one host, so CRUSH
chooses leaves of type osd (`osd_crush_chooseleaf_type = 0`); `paxos_propose_interval = 0.1`
(the 1 s default makes each pool creation take seconds); the BlueStore block file must not be
`<osd_data>/block` (BlueStore symlinks that name to it); every client process gets its own
admin socket and log (`$name.$pid`), else concurrent clients fight over one socket.

All commands are argument lists; the admin work goes through the librados Python bindings
(`rados.Rados.mon_command`), which is much faster than a `ceph` process per step.
"""

import base64
import contextlib
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest

BASE_DIR = Path(os.environ.get("POLYVOL_CEPH_BASE", "/var/tmp"))
DIR_PREFIX = "polyvol-ceph-"
NUM_OSDS = 3
OSD_BLOCK_BYTES = 10 << 30          # sparse; BlueFS/RocksDB take about 1 GiB of it
OSD_MEMORY_TARGET = 896 << 20       # the smallest value the OSD accepts
PORT_RANGE = (20000, 30000)         # the monitor's two ports are picked free from this range
BOOT_TIMEOUT = 120.0
ADMIN_TIMEOUT = 30                  # seconds for one monitor command


def _cephx_key() -> str:
    """A new cephx secret, encoded as keyrings and `osd new` want it: the CryptoKey
    serialisation (type 1 = AES, creation time, length 16) and 16 random bytes, base64."""
    now = time.time()
    blob = struct.pack("<HIIH", 1, int(now), int((now % 1) * 1e9), 16) + os.urandom(16)
    return base64.b64encode(blob).decode()


def _keyring(entity: str, key: str, caps: dict | None = None) -> str:
    lines = [f"[{entity}]", f"\tkey = {key}"]
    lines += [f'\tcaps {kind} = "{cap}"' for kind, cap in (caps or {}).items()]
    return "\n".join(lines) + "\n"


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(text)


def _start_time(pid: int) -> str | None:
    """The kernel's start time of a live process (field 22 of /proc/PID/stat): with the pid
    it names one process, not whatever later reuses the pid. None when gone or a zombie."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return None
    return None if len(fields) < 20 or fields[0] in ("Z", "X") else fields[19]


def _pids_naming(text: str) -> list[int]:
    """Live processes whose command line contains `text` (never this process)."""
    found = []
    needle = text.encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            if needle in Path(f"/proc/{entry}/cmdline").read_bytes():
                found.append(int(entry))
        except OSError:
            pass
    return found


def _kill_and_wait(pids, timeout: float = 10.0) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + timeout
    for pid in pids:
        while time.monotonic() < deadline:
            with contextlib.suppress(ChildProcessError, OSError):
                os.waitpid(pid, os.WNOHANG)  # reap our own children
            try:
                state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
            except OSError:
                break
            if state in ("Z", "X"):
                break
            time.sleep(0.02)


def remove_stale_clusters(base: Path = BASE_DIR) -> list[Path]:
    """Kill the processes of, and remove, cluster directories whose owning process is gone
    (a test run that was killed). Returns the directories removed."""
    removed = []
    for directory in sorted(base.glob(DIR_PREFIX + "*")) if base.is_dir() else []:
        try:
            owner = json.loads((directory / "owner.json").read_text())
            alive = _start_time(int(owner["pid"])) == owner["start"]
        except (OSError, ValueError, KeyError, TypeError):
            # no owner record: a start that was killed before writing it, or not ours;
            # only take directories that have been around for a while
            alive = time.time() - directory.stat().st_mtime < 600
        if alive:
            continue
        _kill_and_wait(_pids_naming(str(directory) + "/"))
        shutil.rmtree(directory, ignore_errors=True)
        removed.append(directory)
    return removed


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _pick_ports() -> tuple[int, int]:
    """Two consecutive free TCP ports on 127.0.0.1 (msgr2 and legacy msgr1 of the monitor)."""
    start = PORT_RANGE[0] + (os.getpid() * 7) % (PORT_RANGE[1] - PORT_RANGE[0] - 2)
    for offset in range(0, PORT_RANGE[1] - PORT_RANGE[0], 2):
        port = PORT_RANGE[0] + (start - PORT_RANGE[0] + offset) % (PORT_RANGE[1] - PORT_RANGE[0] - 2)
        if _port_free(port) and _port_free(port + 1):
            return port, port + 1
    raise RuntimeError("no two free ports for the Ceph monitor")


def _not_tmpfs(base: Path) -> None:
    kind = subprocess.run(["stat", "-f", "-c", "%T", str(base)], capture_output=True,
                          text=True, check=False).stdout.strip()
    if kind == "tmpfs":
        raise RuntimeError(f"{base} is a tmpfs: BlueStore needs O_DIRECT; set POLYVOL_CEPH_BASE "
                           "to a directory on a disk filesystem")


@dataclass
class CephCluster:
    """A running cluster. Attributes are what clients need; methods drive it."""

    directory: Path
    conf: Path                       # ceph.conf, for `-c`; names the admin keyring
    fsid: str
    mon_v2_port: int
    mon_v1_port: int
    admin_keyring: Path              # client.admin, all caps
    user_id: str = "polyvol"         # cephx id (the entity is client.polyvol)
    user_key: str = field(default="", repr=False)
    user_keyring: Path | None = None
    rep_pool: str = "polyvol-rep"
    ec_meta_pool: str = "polyvol-ec-meta"
    ec_data_pool: str = "polyvol-ec"
    ec_profile: str = "polyvol-k2m1"
    timings: dict = field(default_factory=dict)
    _procs: dict = field(default_factory=dict, repr=False)    # daemon name -> Popen
    _rados: object = field(default=None, repr=False)

    # --- addresses -------------------------------------------------------------------------

    @property
    def monitors(self) -> str:
        """The monitor as clients are told (ceph-csi `monitors`, `rbd -m`, `mon_host`):
        "v2:127.0.0.1:PORT". The prefix matters on a port other than 3300/6789: without it a
        client tries both protocols there, and a wrong key shows as a 15 s timeout instead
        of an immediate "permission denied"."""
        return f"v2:127.0.0.1:{self.mon_v2_port}"

    @property
    def mon_host(self) -> str:
        """The monitor's address vector in ceph.conf `mon_host` syntax (both protocols)."""
        return f"[v2:127.0.0.1:{self.mon_v2_port},v1:127.0.0.1:{self.mon_v1_port}]"

    @property
    def pools(self) -> list[str]:
        return [self.rep_pool, self.ec_meta_pool, self.ec_data_pool]

    # --- administration --------------------------------------------------------------------

    def rados(self):
        """A connected librados handle as client.admin (one per cluster, reused)."""
        if self._rados is None:
            import rados
            handle = rados.Rados(conffile=str(self.conf), name="client.admin")
            handle.conf_set("rados_mon_op_timeout", str(ADMIN_TIMEOUT))
            handle.conf_set("rados_osd_op_timeout", str(ADMIN_TIMEOUT))
            handle.connect(timeout=ADMIN_TIMEOUT)
            self._rados = handle
        return self._rados

    def mon_command(self, prefix: str, inbuf: bytes = b"", **args):
        """Run a monitor command as client.admin; returns its JSON answer (or text)."""
        command = {"prefix": prefix, "format": "json", **args}
        code, out, status = self.rados().mon_command(json.dumps(command), inbuf,
                                                     timeout=ADMIN_TIMEOUT)
        if code != 0:
            raise RuntimeError(f"ceph {prefix} {args}: {os.strerror(-code)}: {status}")
        if not out:
            return status
        try:
            return json.loads(out)
        except ValueError:
            return out.decode(errors="replace")

    def ceph(self, *args: str, user: str = "admin", timeout: float = 60) -> str:
        """The `ceph` command as client.admin (or `user`); returns stdout, raises on failure."""
        return self._cli("ceph", args, user, timeout)

    def rbd(self, *args: str, user: str = "admin", timeout: float = 60) -> str:
        return self._cli("rbd", args, user, timeout)

    def _cli(self, tool: str, args, user: str, timeout: float) -> str:
        argv = [tool, "-c", str(self.conf), "--id", user, *map(str, args)]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr}")
        return done.stdout

    def status(self) -> dict:
        return self.mon_command("status")

    def health(self) -> str:
        return self.mon_command("health")["status"]

    def ioctx(self, pool: str):
        return self.rados().open_ioctx(pool)

    # --- OSDs ------------------------------------------------------------------------------

    @property
    def osd_ids(self) -> list[int]:
        return sorted(int(name[4:]) for name in self._procs if name.startswith("osd."))

    def osd_pid(self, osd: int) -> int | None:
        proc = self._procs.get(f"osd.{osd}")
        return proc.pid if proc is not None and proc.poll() is None else None

    def osd_up(self, osd: int) -> bool:
        for entry in self.mon_command("osd dump")["osds"]:
            if entry["osd"] == osd:
                return bool(entry["up"])
        return False

    def stop_osd(self, osd: int, sig: int = signal.SIGTERM, wait_down: bool = True,
                 timeout: float = 60) -> float:
        """Stop one OSD (SIGTERM: it tells the monitor it is going; SIGKILL: a crash, its
        peers notice the refused connections). With `wait_down`, return once the monitor has
        marked it down. Returns the seconds that took."""
        started = time.monotonic()
        proc = self._procs[f"osd.{osd}"]
        if proc.poll() is None:
            proc.send_signal(sig)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        if wait_down:
            self._wait(lambda: not self.osd_up(osd), timeout, f"osd.{osd} marked down")
        return time.monotonic() - started

    def start_osd(self, osd: int, wait_up: bool = True, timeout: float = 60) -> float:
        """Start a stopped OSD again; with `wait_up`, return once it is up. Returns seconds."""
        started = time.monotonic()
        if self.osd_pid(osd) is None:
            self._spawn(f"osd.{osd}", ["ceph-osd", "-f", "-c", self.conf, "-i", str(osd)])
        if wait_up:
            self._wait(lambda: self.osd_up(osd), timeout, f"osd.{osd} up")
        return time.monotonic() - started

    def wait_healthy(self, timeout: float = BOOT_TIMEOUT) -> float:
        """Wait for HEALTH_OK with every OSD up and every PG of every pool active+clean, seen
        twice a second apart (PG states come from the mgr, up to mgr_stats_period late);
        returns seconds."""
        started = time.monotonic()
        seen = []

        def stable():
            if not self._healthy():
                seen.clear()
                return False
            seen.append(time.monotonic())
            return seen[-1] - seen[0] >= 1.0
        self._wait(stable, timeout, "HEALTH_OK with all PGs active+clean")
        return time.monotonic() - started

    def _healthy(self) -> bool:
        status = self.status()
        if status["health"]["status"] != "HEALTH_OK":
            return False
        osdmap = status["osdmap"]
        if not osdmap["num_osds"] == osdmap["num_up_osds"] == osdmap["num_in_osds"]:
            return False
        expected = sum(pool["pg_num"] for pool in self.mon_command("osd dump")["pools"])
        pgmap = status["pgmap"]
        clean = sum(s["count"] for s in pgmap.get("pgs_by_state", [])
                    if s["state_name"] == "active+clean")
        return pgmap.get("num_pgs") == expected == clean

    def _wait(self, condition, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(RuntimeError):
                if condition():
                    return
            for name, proc in self._procs.items():
                if proc.poll() is not None and name in ("mon.a", "mgr.x"):
                    raise RuntimeError(f"{name} exited ({proc.returncode}) while waiting for "
                                       f"{what}; see {self.directory}/log")
            if time.monotonic() > deadline:
                raise TimeoutError(f"no {what} after {timeout:g}s: "
                                   f"{json.dumps(self._status_or_none())[:2000]}")
            time.sleep(0.1)

    def _status_or_none(self):
        try:
            return self.status()
        except Exception as error:  # noqa: BLE001 - only for the message
            return str(error)

    def _spawn(self, name: str, argv) -> subprocess.Popen:
        with open(self.directory / "log" / f"{name}.out", "ab") as out:
            proc = subprocess.Popen([str(a) for a in argv], stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        self._procs[name] = proc
        return proc

    # --- life cycle ------------------------------------------------------------------------

    def teardown(self) -> float:
        """Kill every process of this cluster and remove its directory; returns seconds."""
        started = time.monotonic()
        if self._rados is not None:
            with contextlib.suppress(Exception):
                self._rados.shutdown()
            self._rados = None
        pids = [p.pid for p in self._procs.values() if p.poll() is None]
        _kill_and_wait(set(pids) | set(_pids_naming(str(self.directory) + "/")))
        for proc in self._procs.values():
            with contextlib.suppress(Exception):
                proc.wait(5)
        shutil.rmtree(self.directory, ignore_errors=True)
        self.timings["teardown"] = time.monotonic() - started
        return self.timings["teardown"]


def _config(directory: Path, fsid: str, v2: int, v1: int) -> str:
    d = directory
    return f"""\
[global]
fsid = {fsid}
mon_host = [v2:127.0.0.1:{v2},v1:127.0.0.1:{v1}]
public_addr = 127.0.0.1
cluster_addr = 127.0.0.1
ms_bind_ipv4 = true
ms_bind_ipv6 = false
auth_cluster_required = cephx
auth_service_required = cephx
auth_client_required = cephx
auth_allow_insecure_global_id_reclaim = false
run_dir = {d}/run
admin_socket = {d}/run/$name.asok
pid_file = {d}/run/$name.pid
log_file = {d}/log/$name.log
crash_dir = {d}/crash
osd_crush_chooseleaf_type = 0
osd_pool_default_size = 3
osd_pool_default_min_size = 2
osd_pool_default_pg_autoscale_mode = off
mon_allow_pool_delete = true
mon_max_pg_per_osd = 1000

[client]
admin_socket = {d}/run/$name.$pid.asok
log_file = {d}/log/$name.$pid.log

[client.admin]
keyring = {d}/admin.keyring

[client.polyvol]
keyring = {d}/polyvol.keyring

[mon]
mon_data = {d}/mon.$id
mon_cluster_log_file = {d}/log/cluster.log
mon_osd_reporter_subtree_level = osd
mon_data_avail_warn = 2
mon_data_avail_crit = 1
paxos_propose_interval = 0.1

[mgr]
mgr_data = {d}/mgr.$id
keyring = {d}/mgr.$id/keyring
mgr_stats_period = 1

[osd]
osd_data = {d}/osd.$id
keyring = {d}/osd.$id/keyring
osd_objectstore = bluestore
bluestore_block_path = {d}/osd.$id/block.img
bluestore_block_create = true
bluestore_block_size = {OSD_BLOCK_BYTES}
bluestore_fsck_on_mkfs = false
bluestore_fsck_on_mount = false
osd_memory_target = {OSD_MEMORY_TARGET}
osd_op_num_shards = 2
osd_op_num_threads_per_shard = 1
osd_heartbeat_grace = 10
osd_recovery_sleep = 0
osd_recovery_sleep_hdd = 0
osd_max_backfills = 8
osd_recovery_max_active = 8
"""


def start_cluster(base: Path = BASE_DIR) -> CephCluster:
    """Bootstrap a cluster (see the module docstring); on failure nothing is left."""
    for tool in ("ceph-mon", "ceph-mgr", "ceph-osd", "monmaptool", "ceph"):
        if shutil.which(tool) is None:
            raise RuntimeError(f"{tool} is not installed (scripts/setup.sh installs Ceph)")
    started = time.monotonic()
    base.mkdir(parents=True, exist_ok=True)
    _not_tmpfs(base)
    remove_stale_clusters(base)
    directory = Path(tempfile.mkdtemp(prefix=DIR_PREFIX, dir=base))
    os.chmod(directory, 0o700)
    (directory / "owner.json").write_text(json.dumps(
        {"pid": os.getpid(), "start": _start_time(os.getpid()), "argv": sys.argv[:3]}))
    for sub in ("run", "log", "crash", "mon.a", "mgr.x"):
        (directory / sub).mkdir()
    v2, v1 = _pick_ports()
    fsid = str(uuid.uuid4())
    cluster = CephCluster(directory, directory / "ceph.conf", fsid, v2, v1,
                          directory / "admin.keyring", user_keyring=directory / "polyvol.keyring")
    try:
        _bootstrap(cluster)
    except BaseException:
        cluster.teardown()
        raise
    cluster.timings["bootstrap"] = time.monotonic() - started
    return cluster


def _bootstrap(cluster: CephCluster) -> None:
    d, conf = cluster.directory, cluster.conf
    t0 = time.monotonic()

    def mark(step):
        cluster.timings[step] = round(time.monotonic() - t0, 2)

    conf.write_text(_config(d, cluster.fsid, cluster.mon_v2_port, cluster.mon_v1_port))
    admin_key = _cephx_key()
    admin_caps = {"mon": "allow *", "osd": "allow *", "mds": "allow *", "mgr": "allow *"}
    _write_private(cluster.admin_keyring, _keyring("client.admin", admin_key, admin_caps))
    _write_private(d / "mon.keyring", _keyring("mon.", _cephx_key(), {"mon": "allow *"})
                   + _keyring("client.admin", admin_key, admin_caps))
    run = _runner(d)
    run(["monmaptool", "--create", "--fsid", cluster.fsid, "--addv", "a", cluster.mon_host,
         d / "monmap"])
    run(["ceph-mon", "-c", conf, "-i", "a", "--mkfs", "--monmap", d / "monmap",
         "--keyring", d / "mon.keyring"])
    cluster._spawn("mon.a", ["ceph-mon", "-f", "-c", conf, "-i", "a"])
    cluster.rados()  # connects once the monitor answers
    mark("mon")

    mgr_keyring = cluster.mon_command(
        "auth get-or-create", entity="mgr.x",
        caps=["mon", "allow profile mgr", "osd", "allow *", "mds", "allow *"], format="plain")
    _write_private(d / "mgr.x" / "keyring", mgr_keyring)
    cluster._spawn("mgr.x", ["ceph-mgr", "-f", "-c", conf, "-i", "x"])

    # OSDs: ids and keys one by one (monitor), mkfs of all three at once, then start them
    osds = []
    for _ in range(NUM_OSDS):
        osd_uuid, key = str(uuid.uuid4()), _cephx_key()
        answer = cluster.mon_command("osd new", json.dumps({"cephx_secret": key}).encode(),
                                     uuid=osd_uuid)
        osd = int(answer["osdid"]) if isinstance(answer, dict) else int(answer)
        (d / f"osd.{osd}").mkdir()
        _write_private(d / f"osd.{osd}" / "keyring", _keyring(f"osd.{osd}", key))
        osds.append((osd, osd_uuid))
    mkfs = [(osd, subprocess.Popen(
        ["ceph-osd", "-c", str(conf), "-i", str(osd), "--mkfs", "--osd-uuid", osd_uuid],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        start_new_session=True)) for osd, osd_uuid in osds]
    for osd, proc in mkfs:
        out, _ = proc.communicate(timeout=BOOT_TIMEOUT)
        if proc.returncode != 0:
            raise RuntimeError(f"ceph-osd --mkfs of osd.{osd} failed: {out.decode()[-2000:]}")
    mark("osd_mkfs")
    for osd, _ in osds:
        cluster._spawn(f"osd.{osd}", ["ceph-osd", "-f", "-c", conf, "-i", str(osd)])

    # pools (need no OSD up to be created) and the polyvol user
    cluster.mon_command("osd pool create", pool=cluster.rep_pool, pg_num=16, pgp_num=16,
                        pool_type="replicated")
    cluster.mon_command("osd pool create", pool=cluster.ec_meta_pool, pg_num=8, pgp_num=8,
                        pool_type="replicated")
    cluster.mon_command("osd erasure-code-profile set", name=cluster.ec_profile,
                        profile=["k=2", "m=1", "crush-failure-domain=osd"])
    cluster.mon_command("osd pool create", pool=cluster.ec_data_pool, pg_num=16, pgp_num=16,
                        pool_type="erasure", erasure_code_profile=cluster.ec_profile)
    cluster.mon_command("osd pool set", pool=cluster.ec_data_pool, var="allow_ec_overwrites",
                        val="true")
    for pool in cluster.pools:
        cluster.mon_command("osd pool application enable", pool=pool, app="rbd")
    grants = ", ".join(f"profile rbd pool={pool}" for pool in cluster.pools)
    keyring = cluster.mon_command(
        "auth get-or-create", entity=f"client.{cluster.user_id}",
        caps=["mon", "profile rbd", "osd", grants, "mgr", grants], format="plain")
    _write_private(cluster.user_keyring, keyring)
    cluster.user_key = next(line.split("=", 1)[1].strip() for line in keyring.splitlines()
                            if line.strip().startswith("key"))
    mark("pools")

    cluster._wait(lambda: cluster.mon_command("osd stat")["num_up_osds"] == NUM_OSDS,
                  BOOT_TIMEOUT, f"{NUM_OSDS} OSDs up")
    mark("osds_up")
    # `rbd pool init`: the rbd_info object in the replicated pools (needs active PGs)
    import rbd
    for pool in (cluster.rep_pool, cluster.ec_meta_pool):
        with cluster.ioctx(pool) as ioctx:
            rbd.RBD().pool_init(ioctx, True)
    mark("pool_init")
    cluster.wait_healthy()
    mark("healthy")


def _runner(directory: Path):
    def run(argv):
        done = subprocess.run([str(a) for a in argv], capture_output=True, text=True,
                              timeout=60, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(map(str, argv))} failed ({done.returncode}): "
                               f"{(done.stdout + done.stderr)[-2000:]}")
        return done.stdout
    return run


@contextlib.contextmanager
def running_cluster(base: Path = BASE_DIR):
    """A bootstrapped cluster for the duration of the block; torn down however it ends."""
    cluster = start_cluster(base)
    try:
        yield cluster
    finally:
        cluster.teardown()


# --- the pytest fixture ----------------------------------------------------------------------
# Test modules use it with `from ceph_cluster import ceph_cluster  # noqa: F401`. Importing a
# fixture into several modules gives pytest one fixture definition per module, so the cluster
# itself is shared here, with a reference count: one bootstrap per test session, torn down
# when the last user is finalised (the end of the session).

_shared = {"cluster": None, "users": 0, "error": None}


@pytest.fixture(scope="session")
def ceph_cluster():
    if _shared["error"] is not None:  # one failed bootstrap per session is enough
        raise RuntimeError(f"the Ceph test cluster did not start: {_shared['error']}")
    if _shared["cluster"] is None:
        try:
            _shared["cluster"] = start_cluster()
        except Exception as error:
            _shared["error"] = f"{type(error).__name__}: {error}"
            raise
        timings = _shared["cluster"].timings
        print(f"\nceph cluster up in {timings['bootstrap']:.1f}s "
              f"({json.dumps({k: v for k, v in timings.items() if k != 'bootstrap'})})")
    _shared["users"] += 1
    try:
        yield _shared["cluster"]
    finally:
        _shared["users"] -= 1
        if _shared["users"] == 0:
            cluster, _shared["cluster"] = _shared["cluster"], None
            seconds = cluster.teardown()
            print(f"\nceph cluster torn down in {seconds:.1f}s")


if __name__ == "__main__":
    # python tests/ceph_cluster.py [seconds]: bootstrap, print the facts, keep it up, tear down
    # (also on SIGTERM/SIGINT; after a SIGKILL the next start removes what is left)
    for _sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(_sig, lambda *_: sys.exit(1))
    with running_cluster() as running:
        print(json.dumps({"dir": str(running.directory), "conf": str(running.conf),
                          "monitors": running.monitors, "mon_host": running.mon_host,
                          "timings": running.timings, "health": running.health()}, indent=1))
        time.sleep(float(sys.argv[1]) if len(sys.argv) > 1 else 0)
    print(json.dumps({"teardown": running.timings["teardown"]}))
