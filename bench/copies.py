"""Copies benchmark: how many raw bytes each volume class really keeps per byte written, measured.

    .venv/bin/python bench/copies.py [--size 256Mi] [--classes local,remote,replicated,erasure-coded]
                                     [--settle 5]

For every class it makes one volume of `--size` the way a pod gets it (CreateVolume,
NodeStageVolume, NodePublishVolume as a raw block device, through a real `polyvol plugin`,
the same setup as bench/datapath.py), writes the whole volume once with fio (1 MiB blocks,
direct=1, a fresh random buffer for every block (incompressible), fsync at the end), and then
reads what the backend itself says it allocated, before the volume is unstaged:

  local-ephemeral  the data file on the node: st_blocks x 512 of the FileStore's disk.img
                   (<plugin state>/local/volumes/<id>/disk.img)
  remote-disk      the data file on the storage server (tests/remote_lab.py, one server in its
                   own network namespace): st_blocks of <data dir>/volumes/<id>/disk.img
  replicated       Ceph's pool statistics (the `df detail` monitor command, as `ceph df detail`):
                   bytes_used (raw, every replica) and stored (logical) of the image's pool
  erasure-coded    the same for the EC data pool plus the replicated pool that holds the image's
                   header and metadata (dataPool + pool)

Each number is a difference against the same reading taken before CreateVolume (nothing for a
new file; the pools' usage for Ceph), so what the volume's metadata costs is counted too. Ceph
updates pool statistics lazily (OSD -> mgr -> monitor, every few seconds): each reading polls
until `stored` has taken in the write and no number has changed for `--settle` seconds. For the
file classes a second, independent reading checks that nothing else was allocated: the whole
FileStore directory (every file once, hard links such as the server's exports/ counted once).

Prints one table: logical MiB written, raw MiB the backend used, raw/logical (the measured
storage copies), the copies the driver reports for the volume (volume_context
`polyvol.csi.io/copies`), and what an app that replicates itself ends up with: Kafka with
replication factor 3 (3 x raw/logical) and Elasticsearch with 1 replica (2 x raw/logical). The
"9 copies vs 3" of the design notes is the Kafka column of `replicated` vs `remote-disk`.

Everything the run made (volumes, mounts, loop devices, helpers, the storage lab and the
throw-away Ceph cluster) is deleted and stopped at the end, also on errors and on SIGINT/SIGTERM,
and then checked, including that the backends let go of the volumes (no data file, no RBD image
left). Exit status: 0 when every class was measured and nothing was left behind.
"""

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/: datapath, lifecycle

import datapath  # noqa: E402 - sets up the import paths of the repository and tests/
from datapath import (Env, ErasureCoded, LocalEphemeral, RemoteDisk, Replicated,  # noqa: E402
                      clean_up_below, leftover_namespaces, leftover_processes)
from driver.backends.remote_disk import CTX_SERVER  # noqa: E402
from driver.filestore import DISK  # noqa: E402
from driver.parameters import CTX_COPIES  # noqa: E402
from driver.units import format_size, parse_size  # noqa: E402
from lifecycle import describe, leftovers  # noqa: E402

MiB = 1 << 20
KAFKA_RF, ES_COPIES = 3, 2  # app replicas: Kafka replication factor 3, Elasticsearch 1 replica
SETTLE_TIMEOUT = 90.0  # seconds a Ceph reading may take before it counts as failed
POLL = 0.5


@dataclass
class Reading:
    raw: int                                   # bytes the backend allocated
    stored: int | None = None                  # bytes the backend counts as data (Ceph)
    detail: dict = field(default_factory=dict)  # part -> raw bytes (per pool, per file)
    seconds: float = 0.0                       # how long it took to settle


@dataclass
class Row:
    label: str
    written: int = 0
    raw: int | None = None
    stored: int | None = None
    reported: float | None = None  # storage copies in the volume context
    volume_id: str = ""
    checked: bool = False  # the backend was seen to let go of the volume after DeleteVolume
    notes: list = field(default_factory=list)
    error: str = ""

    @property
    def ratio(self) -> float | None:
        return self.raw / self.written if self.raw is not None and self.written else None


# --- what the backends allocated -----------------------------------------------------------------

def allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


def tree_allocated(root: Path) -> int:
    """Bytes allocated below `root`: files and directories, each inode once."""
    seen, total = set(), 0
    for directory, dirs, files in os.walk(root):
        for name in [".", *files]:
            try:
                info = os.lstat(os.path.join(directory, name))
            except FileNotFoundError:
                continue
            if (info.st_dev, info.st_ino) not in seen:
                seen.add((info.st_dev, info.st_ino))
                total += info.st_blocks * 512
    return total


class FileClass:
    """A file-backed class: the data file and the FileStore it lives in."""

    def store_root(self, env: Env, volume) -> Path:
        raise NotImplementedError

    def before(self, env: Env, settle: float) -> Reading:
        return Reading(0, detail={"store": tree_allocated(self.store_root(env, None))})

    def after(self, env: Env, volume, before: Reading, written: int, settle: float) -> Reading:
        root = self.store_root(env, volume)
        data = root / "volumes" / volume.volume_id / DISK
        if not data.is_file():
            raise RuntimeError(f"no data file {data}: the FileStore layout changed?")
        raw = allocated(data)
        store = tree_allocated(root) - before.detail["store"]
        return Reading(raw, detail={"data file": raw, "whole store": store, "_path": str(data),
                                    "_size": data.stat().st_size})

    def gone(self, env: Env, volume_id: str) -> list[str]:
        path = self.store_root(env, None) / "volumes" / volume_id
        return [f"{path} still exists"] if path.exists() else []


class LocalCopies(FileClass, LocalEphemeral):
    def store_root(self, env, volume):
        return env.plugin.state_dir / "local"


class RemoteCopies(FileClass, RemoteDisk):
    """remote-disk on the lab's one storage server (TLS on; encryption does not change what is
    stored)."""

    def store_root(self, env, volume):
        server = volume.volume_context[CTX_SERVER] if volume is not None else env.TLS_SERVER
        return env.cluster.data_dir(server)


class CephClassCopies:
    """A Ceph class: the pools its images use, from the run's cluster."""

    def pools(self, env: Env) -> list[str]:
        raise NotImplementedError

    def pool_stats(self, env: Env) -> dict[str, dict]:
        """The class's pools' statistics, and under "_cluster" the whole cluster's."""
        answer = env.ceph.mon_command("df", detail="detail")
        stats = {pool["name"]: pool["stats"] for pool in answer["pools"]}
        return {**{name: stats[name] for name in self.pools(env)}, "_cluster": answer["stats"]}

    def settled(self, env: Env, ready, settle: float) -> tuple[dict, float]:
        """Pool statistics once `ready(stats)` holds and nothing changed for `settle` s."""
        started = time.monotonic()
        last, since = None, None
        while True:
            stats = self.pool_stats(env)
            cluster = stats.pop("_cluster")
            key = {name: (s["stored"], s["bytes_used"], s["objects"]) for name, s in stats.items()}
            now = time.monotonic()
            if key != last:
                last, since = key, now
            elif ready(stats) and now - since >= settle:
                return {**stats, "_cluster": cluster}, now - started
            if now - started > SETTLE_TIMEOUT:
                raise TimeoutError(f"Ceph pool statistics did not settle in {SETTLE_TIMEOUT:g} s: "
                                   f"{json.dumps(key)}")
            time.sleep(POLL)

    def before(self, env: Env, settle: float) -> Reading:
        stats, seconds = self.settled(env, lambda s: True, settle)
        cluster = stats.pop("_cluster")["total_used_raw_bytes"]
        return Reading(sum(s["bytes_used"] for s in stats.values()),
                       sum(s["stored"] for s in stats.values()),
                       {**{name: s["bytes_used"] for name, s in stats.items()}, "_cluster": cluster},
                       seconds)

    def after(self, env, volume, before: Reading, written: int, settle: float) -> Reading:
        # ready: Ceph's own count of stored bytes has taken in the whole write
        stats, seconds = self.settled(
            env, lambda s: sum(p["stored"] for p in s.values()) - before.stored >= written, settle)
        cluster = stats.pop("_cluster")["total_used_raw_bytes"] - before.detail["_cluster"]
        detail = {name: s["bytes_used"] - before.detail[name] for name, s in stats.items()}
        detail["_cluster"] = cluster
        detail.update({f"_objects {name}": s["objects"] for name, s in stats.items()})
        return Reading(sum(s["bytes_used"] for s in stats.values()) - before.raw,
                       sum(s["stored"] for s in stats.values()) - before.stored, detail, seconds)

    def gone(self, env: Env, volume_id: str) -> list[str]:
        """RBD images left in the pool that holds the image headers (the run's cluster is new:
        every image in it is the run's)."""
        import rbd
        pool = self.pools(env)[-1]
        with env.ceph.ioctx(pool) as ioctx:
            return [f"RBD image {pool}/{name}" for name in rbd.RBD().list(ioctx)]


class ReplicatedCopies(CephClassCopies, Replicated):
    def pools(self, env):
        return [env.ceph.rep_pool]


class ErasureCodedCopies(CephClassCopies, ErasureCoded):
    def pools(self, env):  # the data pool, then the pool of the image headers (last)
        return [env.ceph.ec_data_pool, env.ceph.ec_meta_pool]


CLASSES = {c.key: c for c in (LocalCopies, RemoteCopies, ReplicatedCopies, ErasureCodedCopies)}


# --- the run ---------------------------------------------------------------------------------

def write_volume(target: str, size: int) -> tuple[int, float]:
    """Write all of `target` once: 1 MiB blocks, direct I/O, a new random buffer for every block
    (incompressible), fsync at the end. Returns (bytes fio wrote, MB/s)."""
    argv = ["fio", "--name=copies", f"--filename={target}", f"--size={size}", "--rw=write",
            "--bs=1M", "--iodepth=16", "--direct=1", "--ioengine=libaio", "--thread",
            "--refill_buffers", "--buffer_compress_percentage=0", "--end_fsync=1",
            "--output-format=json"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"fio failed ({done.returncode}): {done.stderr.strip()[-800:]}")
    job = json.loads(done.stdout[done.stdout.index("{"):])["jobs"][0]
    if job.get("error"):
        raise RuntimeError(f"fio job error {job['error']}: {done.stderr.strip()[-800:]}")
    return job["write"]["io_bytes"], job["write"]["bw_bytes"] / 1e6


def mib(value: int) -> str:
    return f"{value / MiB:.1f}"


def exact(value: int) -> str:
    return f"{value:,} B ({value / MiB:.2f} MiB)"


def run_class(bench, env: Env, args) -> Row:
    row = Row(bench.label)
    started = time.monotonic()
    attached = False
    try:
        before = bench.before(env, args.settle)
        target, size = bench.attach(env, datapath.Row(bench.label))
        attached = True
        volume = bench.volume
        row.volume_id = volume.volume_id
        row.reported = float(volume.volume_context[CTX_COPIES])
        row.written, mbs = write_volume(target, size)
        if row.written != size:
            raise RuntimeError(f"fio wrote {row.written} bytes, not the volume's {size}")
        reading = bench.after(env, volume, before, row.written, args.settle)
        row.raw, row.stored = reading.raw, reading.stored
        parts = ", ".join(f"{name} {exact(value)}" for name, value in reading.detail.items()
                          if not name.startswith("_"))
        row.notes.append(f"{volume.volume_id}: fio wrote {exact(row.written)} at {mbs:.0f} MB/s; "
                         f"raw used: {parts}")
        if isinstance(bench, CephClassCopies):
            objects = ", ".join(f"{name[9:]} {value}" for name, value in reading.detail.items()
                                if name.startswith("_objects "))
            row.notes.append(f"Ceph's own logical count (stored) +{exact(reading.stored)}; objects "
                             f"now: {objects}; whole cluster's raw used (OSDs, BlueStore's "
                             f"RocksDB/WAL included) {reading.detail['_cluster']:+,} B; baseline "
                             f"settled in {before.seconds:.1f} s, the reading in {reading.seconds:.1f} s")
        else:
            row.notes.append(f"{reading.detail['_path']} (apparent size {exact(reading.detail['_size'])})")
        bench.detach(env, datapath.Row(bench.label))
        attached = False
        left = bench.gone(env, volume.volume_id)
        if left:
            raise RuntimeError(f"after DeleteVolume: {', '.join(left)}")
        row.checked = True
    except Exception as error:  # noqa: BLE001 - reported in the table, the run goes on
        row.error = describe(error)
        if attached:
            bench.release(env)
    print(f"  {row.label}: {'done' if not row.error else 'FAILED: ' + row.error} "
          f"({time.monotonic() - started:.0f} s)", flush=True)
    return row


def print_table(rows: list[Row]) -> None:
    header = (f"{'class':<22}{'logical MiB':>12}{'raw MiB':>11}{'raw/logical':>13}"
              f"{'copies (driver)':>17}{'Kafka RF=3':>12}{'Elasticsearch':>15}")
    print(header)
    print(f"{'':<22}{'written':>12}{'measured':>11}{'measured':>13}{'volume_context':>17}"
          f"{'3 x raw/log':>12}{'2 x raw/log':>15}")
    print("-" * len(header))
    for row in rows:
        ratio = row.ratio
        cells = [mib(row.written) if row.written else "-", f"{row.raw / MiB:.2f}" if row.raw is not None else "-",
                 f"{ratio:.3f}" if ratio is not None else "-",
                 f"{row.reported:g}" if row.reported is not None else "-",
                 f"{KAFKA_RF * ratio:.2f}" if ratio is not None else "-",
                 f"{ES_COPIES * ratio:.2f}" if ratio is not None else "-"]
        print(f"{row.label:<22}" + "".join(f"{c:>{w}}" for c, w in zip(cells, (12, 11, 13, 17, 12, 15))))
        if row.error:
            print(f"{'':<22}FAILED: {row.error}")


def print_claim(rows: dict) -> None:
    """The design notes' claim, in the measured numbers."""
    def ratio(key):
        row = rows.get(key)
        return row.ratio if row is not None and not row.error else None
    parts = []
    for key, app, copies in (("replicated", "Kafka (RF=3)", KAFKA_RF),
                             ("remote", "Kafka (RF=3)", KAFKA_RF),
                             ("erasure-coded", "Elasticsearch (1 replica)", ES_COPIES),
                             ("remote", "Elasticsearch (1 replica)", ES_COPIES)):
        if ratio(key) is not None:
            parts.append(f"{app} on {rows[key].label}: {copies * ratio(key):.2f} bytes stored per "
                         f"byte written")
    if parts:
        print("\nmeasured: " + "\n          ".join(parts))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=parse_size, default=parse_size("256Mi"),
                        help="bytes written = volume size (default 256Mi)")
    parser.add_argument("--classes", default=",".join(CLASSES),
                        help=f"comma-separated rows, from {', '.join(CLASSES)} (default: all)")
    parser.add_argument("--settle", type=float, default=5.0,
                        help="seconds Ceph's pool statistics must stay unchanged (default 5)")
    parser.add_argument("--dir", default=None, help="parent of the temporary work directory")
    args = parser.parse_args(argv)
    keys = [k.strip() for k in args.classes.split(",") if k.strip()]
    unknown = [k for k in keys if k not in CLASSES]
    if unknown or not keys:
        parser.error(f"--classes: unknown {unknown}; choose from {', '.join(CLASSES)}")
    if args.size < 64 * MiB or args.size % MiB:
        parser.error("--size must be a whole number of MiB, at least 64Mi")
    if args.settle < 0:
        parser.error("--settle must be at least 0")
    if os.geteuid() != 0:
        parser.error("run as root (loop devices, mounts, network namespaces)")
    signal.signal(signal.SIGTERM, datapath._stop_handler(os.getpid()))
    signal.signal(signal.SIGINT, datapath._stop_handler(os.getpid()))
    benches = [CLASSES[k]() for k in dict.fromkeys(keys)]
    needs = {n for bench in benches for n in bench.needs}

    workdir = Path(tempfile.mkdtemp(prefix="polyvol-bench-", dir=args.dir))
    env = Env(workdir, needs, args.size, "block", plain_server=False)
    rows, problems = {}, []
    kept_log = Path(tempfile.gettempdir()) / "polyvol-copies-failed.log"
    kept_ceph_log = Path(tempfile.gettempdir()) / "polyvol-copies-ceph-failed.log"
    try:
        print(f"polyvol copies benchmark: {format_size(args.size)} of incompressible data written "
              f"to one raw block volume per class (fio 1M direct=1 libaio, fsync at the end); raw "
              f"bytes read from the backends")
        print(f"work directory {workdir}, kernel {platform.release()}, {os.cpu_count()} cores")
        env.start()
        for bench in benches:
            rows[bench.key] = run_class(bench, env, args)
        print()
        print_table(list(rows.values()))
        print_claim(rows)
        print("\nnotes:")
        for row in rows.values():
            for note in row.notes:
                print(f"  {row.label}: {note}")
        problems += [f"{row.label}: {row.error}" for row in rows.values() if row.error]
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
        env.delete_all(problems)
        for bench in benches:  # volumes Env.delete_all just deleted: did the backends let go?
            row = rows.get(bench.key)
            if row is not None and row.volume_id and not row.checked:
                try:
                    problems += [f"after clean-up: {item}" for item in bench.gone(env, row.volume_id)]
                except Exception as error:  # noqa: BLE001
                    problems.append(f"checking {bench.label}'s backend: {describe(error)}")
        env.close(problems)
        for plugin, kept in ((env.plugin, kept_log), (env.ceph_plugin, kept_ceph_log)):
            if plugin is not None and plugin.log_path.exists():
                shutil.copyfile(plugin.log_path, kept)
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
        print("\nclean-up checked: no volume, data file, RBD image, mount, loop device, process or "
              "namespace left" + (", Ceph cluster torn down" if env.ceph is not None else ""))
        return 0
    logs = " and ".join(str(p) for p in (kept_log, kept_ceph_log) if p.exists())
    print(f"\n{len(problems)} error(s) (plugin logs kept: {logs or '-'}):", file=sys.stderr)
    for problem in problems[:20]:
        print(f"  {problem}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
