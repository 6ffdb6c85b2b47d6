"""Lifecycle benchmark: how long a local-ephemeral volume's whole life takes, and who spends it.

    .venv/bin/python bench/lifecycle.py [--volumes 32] [--concurrency 16] [--fs ext4]

Starts its own `polyvol plugin` (the test suite's `Plugin` class, in a temporary directory),
then runs create -> stage -> publish -> unpublish -> unstage -> delete for N volumes, first
one after another, then with `--concurrency` threads each doing whole cycles. For every step
it prints the client-side p50/p99 latency and how the plugin's time for the call (its RPC
log line, matched by method and volume) splits:

  external = command_ms + kernel_ms: the volume's real work, done for the plugin
    command_ms  inside external programs (mkfs, blkid, mount, umount, ...), from the start
                of the program until its exit is seen
    kernel_ms   waiting in the kernel on the volume's work done in-process: the loop ioctls
                (LOOP_CONFIGURE with LOOP_CTL_GET_FREE, LOOP_SET_CAPACITY),
                creating a new volume's sparse data file and unlinking a deleted one's (the
                kernel freeing its blocks); what a tool (losetup, truncate, rm) would do
  own = ms - external: the plugin's overhead. Python, logging, its own metadata records
    (temporary file, fsync, rename, directory fsync), the volume directory, staging and
    target directories, mountinfo and sysfs scans, locks, and, with many workers, waiting
    for a CPU or for the GIL. (gRPC's own work outside the servicer is in neither: it shows
    in the client-side columns.)

The total row gives the plugin's own overhead, own / RPC ms summed over the cycle, against
the target: under 20 % of the cycle; and the same split in CPU time (the plugin's own
threads vs the commands it ran, from /proc), which does not count waiting for a CPU as
overhead, and the plugin threads' scheduler times (on a CPU / runnable but waiting for one).
Then the external work that took the most time, by command or kernel call, from the
plugin's debug log, and notes on what limits the concurrent phase.

Everything the run made is unmounted, detached and removed at the end, also on errors.
Exit status: 0 when every call succeeded (whether or not the target is met), 1 on errors.
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from concurrent import futures
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import grpc  # noqa: E402

from driver.fs import MIN_FS_BYTES  # noqa: E402
from driver.proto import csi_pb2, csi_pb2_grpc  # noqa: E402
from driver.rpc import _subject  # noqa: E402 - the same key the plugin logs as "volume"
from driver.units import format_size, parse_size  # noqa: E402
from tests.conftest import Plugin, clean_up_below  # noqa: E402

STEPS = ("CreateVolume", "NodeStageVolume", "NodePublishVolume",
         "NodeUnpublishVolume", "NodeUnstageVolume", "DeleteVolume")
TARGET_OVERHEAD = 0.20


class Timings(grpc.UnaryUnaryClientInterceptor):
    """Times every unary call on the channel as the client sees it: (method, subject) -> ms."""

    def __init__(self):
        self._lock = threading.Lock()
        self.calls: list[tuple[str, str, float, str]] = []  # method, subject, ms, code

    def intercept_unary_unary(self, continuation, details, request):
        started = time.monotonic()
        outcome = continuation(details, request)
        error = outcome.exception()
        ms = (time.monotonic() - started) * 1000
        code = error.code().name if error is not None else "OK"
        with self._lock:
            self.calls.append((details.method.rsplit("/", 1)[-1], _subject(request), ms, code))
        return outcome


class TimedPlugin(Plugin):
    """The test suite's plugin, with every call from its helpers going through `Timings`."""

    def __init__(self, workdir: Path, log_level: str = "debug"):
        # Plugin passes --log-level debug; a later --log-level wins (argparse).
        super().__init__(workdir, extra_args=["--log-level", log_level], node_id="node-bench")
        self.timings = Timings()

    def start(self) -> None:
        super().start()
        self.channel = grpc.intercept_channel(self.channel, self.timings)
        self.identity = csi_pb2_grpc.IdentityStub(self.channel)
        self.controller = csi_pb2_grpc.ControllerStub(self.channel)
        self.node = csi_pb2_grpc.NodeStub(self.channel)


def cycle(plugin: TimedPlugin, name: str, size: int, fs_type: str) -> float:
    """One volume's whole life; returns its duration in ms as the client saw it."""
    started = time.monotonic()
    volume = plugin.create(name, size=size, fs_type=fs_type)
    plugin.stage_and_publish(volume, name, fs_type=fs_type)
    plugin.unpublish_and_unstage(volume.volume_id, name)
    plugin.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=volume.volume_id),
                                   timeout=120)
    return (time.monotonic() - started) * 1000


def run_phase(plugin: TimedPlugin, prefix: str, count: int, workers: int, size: int,
              fs_type: str) -> dict:
    """Run `count` cycles on `workers` threads; return the calls, log lines and failures."""
    log_start = len(plugin.log_lines())
    call_start = len(plugin.timings.calls)
    names = [f"{prefix}-{i:03d}" for i in range(count)]
    failures, cycles = [], []
    started = time.monotonic()

    def one(name):
        try:
            cycles.append(cycle(plugin, name, size, fs_type))
        except Exception as error:  # noqa: BLE001 - reported and counted, the run goes on
            failures.append((name, error))

    cpu_before = cpu_seconds(plugin.process.pid)
    sched_before = thread_schedstat(plugin.process.pid)
    load_before = os.getloadavg()[0]
    with futures.ThreadPoolExecutor(max_workers=workers) as pool:
        list(pool.map(one, names))
    wall = time.monotonic() - started
    cpu_after = cpu_seconds(plugin.process.pid)
    sched = schedstat_delta(sched_before, thread_schedstat(plugin.process.pid))
    return {"calls": plugin.timings.calls[call_start:], "log": plugin.log_lines()[log_start:],
            "failures": failures, "cycles": cycles, "wall": wall, "count": count, "workers": workers,
            "cpu": tuple(after - before for after, before in zip(cpu_after, cpu_before)),
            "sched": sched, "load": (load_before, os.getloadavg()[0])}


def cpu_seconds(pid: int) -> tuple[float, float]:
    """(CPU seconds of the plugin's own threads, CPU seconds of the commands it ran and waited
    for), from /proc/PID/stat: utime+stime and cutime+cstime."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    utime, stime, cutime, cstime = (int(fields[i]) for i in (11, 12, 13, 14))
    return (utime + stime) / ticks, (cutime + cstime) / ticks


def thread_schedstat(pid: int) -> dict[int, tuple[int, int]]:
    """thread id -> (ns on a CPU, ns runnable but waiting for a CPU), from
    /proc/PID/task/TID/schedstat. A thread blocked (on the GIL, a lock, I/O) is in neither."""
    found = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            on_cpu, waiting, _ = Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()
        except (OSError, ValueError):
            continue
        found[int(tid)] = (int(on_cpu), int(waiting))
    return found


def schedstat_delta(before: dict, after: dict) -> tuple[float, float]:
    """Seconds (on a CPU, waiting for one) of the threads between two `thread_schedstat`s
    (threads that ended meanwhile are lost; the plugin's gRPC workers live on)."""
    on_cpu = waiting = 0
    for tid, (run, wait) in after.items():
        run0, wait0 = before.get(tid, (0, 0))
        on_cpu, waiting = on_cpu + run - run0, waiting + wait - wait0
    return on_cpu / 1e9, waiting / 1e9


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    position = (len(ordered) - 1) * q
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def describe(error: Exception) -> str:
    if isinstance(error, grpc.RpcError):
        return f"{error.code().name}: {error.details()}"
    return f"{type(error).__name__}: {error}"


def command_name(argv: list[str]) -> str:
    name = os.path.basename(argv[0])
    if name == "losetup" and len(argv) > 1:
        name += " " + argv[1]  # --list (a lookup) and --find (an attach) are different costs
    return name


def external_name(line: dict) -> str | None:
    """The name of the external work a debug log line reports (a command or a kernel call
    the plugin makes itself), or None for any other line."""
    if line.get("event") == "command" and "argv" in line:
        return command_name(line["argv"])
    if line.get("event") == "kernel" and "call" in line:
        return f"[kernel] {line['call']}"
    return None


def report(title: str, phase: dict) -> tuple[float, list[str]]:
    """Print the phase's tables; return the plugin overhead and the problems found."""
    problems = [f"{name}: {describe(error)}" for name, error in phase["failures"]]
    rpc_lines = {}
    for line in phase["log"]:
        if line.get("event") == "rpc":
            rpc_lines[(line["method"], line["volume"])] = line
            if line["code"] != "OK":
                problems.append(f"{line['method']} {line['volume']}: {line['code']} "
                                f"{line.get('message', '')}")
    per_step = defaultdict(list)  # step -> [(client ms, server ms, command ms, kernel ms)]
    for method_name, subject, ms, code in phase["calls"]:
        if method_name not in STEPS:
            continue
        line = rpc_lines.get((method_name, subject))
        if line is None:
            problems.append(f"no plugin log line for {method_name} {subject}")
            continue
        per_step[method_name].append((ms, line["ms"], line["command_ms"], line.get("kernel_ms", 0.0),
                                      line.get("cpu_ms", 0.0), line.get("runq_ms", 0.0)))
    load_before, load_after = phase["load"]
    print(f"\n== {title}: {phase['count']} volumes, {phase['workers']} worker(s), "
          f"{phase['wall']:.2f} s wall, {phase['count'] / phase['wall']:.2f} cycles/s, "
          f"load average {load_before:.2f} -> {load_after:.2f} ==")
    header = (f"{'step':<22}{'n':>4}{'p50 ms':>9}{'p99 ms':>9}{'mean ms':>9}"
              f"{'plugin':>9}{'cmd':>8}{'kernel':>8}{'own':>8}{'own %':>7}{'cpu':>7}{'runq':>7}")
    print(f"{'':<22}{'':>4}{'client side':^27}{'plugin side, mean ms (own = plugin - cmd - kernel)':>47}"
          f"{'thread':>14}")
    print(header)
    print("-" * len(header))
    totals = [0.0] * 6  # client, server, command, kernel, serving thread cpu, runq
    for step in STEPS:
        rows = per_step.get(step, [])
        if not rows:
            print(f"{step:<22}{0:>4}")
            continue
        client = [r[0] for r in rows]
        sums = [sum(client), *(sum(r[i] for r in rows) for i in (1, 2, 3, 4, 5))]
        totals = [total + add for total, add in zip(totals, sums)]
        server, commands, kernel, cpu, runq = sums[1:]
        own = server - commands - kernel
        n = len(rows)
        print(f"{step:<22}{n:>4}{percentile(client, .5):>9.1f}{percentile(client, .99):>9.1f}"
              f"{statistics.fmean(client):>9.1f}{server / n:>9.1f}{commands / n:>8.1f}"
              f"{kernel / n:>8.2f}{own / n:>8.1f}{own / server if server else 0:>7.0%}"
              f"{cpu / n:>7.1f}{runq / n:>7.1f}")
    print("-" * len(header))
    count = max(1, phase["count"])
    client_total, server_total, command_total, kernel_total, cpu_total, runq_total = totals
    external_total = command_total + kernel_total
    own_total = server_total - external_total
    overhead = own_total / server_total if server_total else 1.0
    client_overhead = (client_total - external_total) / client_total if client_total else 1.0
    verdict = "PASS" if overhead < TARGET_OVERHEAD else "FAIL"
    cycles = phase["cycles"] or [0.0]
    print(f"{'whole cycle':<22}{len(phase['cycles']):>4}{percentile(cycles, .5):>9.1f}"
          f"{percentile(cycles, .99):>9.1f}{client_total / count:>9.1f}"
          f"{server_total / count:>9.1f}{command_total / count:>8.1f}"
          f"{kernel_total / count:>8.2f}{own_total / count:>8.1f}{overhead:>7.0%}"
          f"{cpu_total / count:>7.1f}{runq_total / count:>7.1f}")
    print(f"plugin overhead (RPC ms - command ms - kernel ms) / RPC ms = {overhead:.1%}   "
          f"target < {TARGET_OVERHEAD:.0%} of the cycle: {verdict}")
    print(f"  (as the client sees it, gRPC and client included: {client_overhead:.1%})")
    own_cpu, command_cpu = phase["cpu"]
    cycles_done = len(phase["cycles"]) or 1
    if own_cpu + command_cpu:
        # Wall-clock overhead counts waiting for a CPU as the plugin's time, which dominates
        # with many workers on few cores; CPU time says who actually worked. The plugin's CPU
        # includes its gRPC threads and the kernel work of its in-process calls (ioctls).
        print(f"CPU: plugin {own_cpu:.2f} s, commands {command_cpu:.2f} s -> plugin share "
              f"{own_cpu / (own_cpu + command_cpu):.1%} of the CPU the cycles used "
              f"({own_cpu * 1000 / cycles_done:.1f} ms per cycle)")
    phase["summary"] = {"own": own_total / count, "rpc": server_total / count,
                        "overhead": overhead, "cpu": cpu_total / count, "runq": runq_total / count}
    on_cpu, waiting = phase["sched"]
    print(f"all plugin threads per cycle: {on_cpu * 1000 / cycles_done:.1f} ms on a CPU, "
          f"{waiting * 1000 / cycles_done:.1f} ms runnable but waiting for a CPU")
    serving = [line for line in rpc_lines.values() if "cpu_ms" in line and line["method"] in STEPS]
    if serving:
        # The serving threads' wall time = on a CPU + waiting for a CPU + blocked. Blocked
        # outside commands and kernel calls is the GIL, the disk (fsync) and locks; what the
        # thread spends on a CPU around a command (fork/exec) is in command_ms and cpu_ms
        # both, so `blocked, own` is a lower bound.
        cpu = sum(line["cpu_ms"] for line in serving) / count
        runq = sum(line["runq_ms"] for line in serving) / count
        wall = sum(line["ms"] for line in serving) / count
        external = sum(line["command_ms"] + line.get("kernel_ms", 0.0) for line in serving) / count
        own = wall - external
        print(f"serving threads per cycle: {wall:.1f} ms = {cpu:.1f} on a CPU + {runq:.1f} waiting "
              f"for a CPU + {wall - cpu - runq:.1f} blocked; of the {own:.1f} ms own, at least "
              f"{max(0.0, own - cpu - runq):.1f} blocked (GIL, fsync, locks)")

    external = defaultdict(lambda: [0, 0.0])
    for line in phase["log"]:
        name = external_name(line)
        if name is not None and "ms" in line:
            external[name][0] += 1
            external[name][1] += line["ms"]
    phase["summary"]["external"] = {name: ms / runs for name, (runs, ms) in external.items()}
    all_ms = sum(ms for _, ms in external.values()) or 1.0
    if not external:
        print("\n(no command lines in the plugin log: run with --log-level debug for them)")
        return overhead, problems
    print(f"\n{'external work':<28}{'runs':>6}{'total ms':>11}{'mean ms':>10}{'share':>8}")
    for name, (runs, ms) in sorted(external.items(), key=lambda item: -item[1][1]):
        print(f"{name:<28}{runs:>6}{ms:>11.1f}{ms / runs:>10.2f}{ms / all_ms:>8.0%}")
    return overhead, problems


def commands_per_step(phase: dict) -> None:
    """In a sequential phase the external work logged before an rpc line belongs to that RPC."""
    pending, seen, calls = Counter(), defaultdict(Counter), Counter()
    for line in phase["log"]:
        name = external_name(line)
        if name is not None:
            pending[name] += 1
        elif line.get("event") == "rpc":
            seen[line["method"]].update(pending)
            calls[line["method"]] += 1
            pending = Counter()
    print("\nexternal work per call (sequential phase, mean):")
    for step in STEPS:
        if calls[step]:
            listed = ", ".join(f"{name} x{n / calls[step]:g}" for name, n in seen[step].most_common())
            print(f"  {step:<22}{listed or '-'}")


def notes(sequential: dict, concurrent: dict) -> None:
    """What limits the concurrent phase, from the two phases' numbers (the reading is the
    bench's; the numbers are this run's)."""
    seq, par = sequential.get("summary"), concurrent.get("summary")
    if not seq or not par or not concurrent["cycles"]:
        return
    cpus = os.cpu_count() or 1
    cycles = len(concurrent["cycles"])
    own_cpu, command_cpu = (value * 1000 / cycles for value in concurrent["cpu"])
    busy = sum(concurrent["cpu"]) / concurrent["wall"] / cpus
    load_before, load_after = concurrent["load"]
    print(f"\nnotes on the concurrent phase ({concurrent['workers']} workers, {cpus} CPUs):")
    print(f"- own time per cycle {seq['own']:.1f} ms alone -> {par['own']:.1f} ms with "
          f"{concurrent['workers']} workers, while the serving threads' CPU per cycle went "
          f"{seq['cpu']:.1f} -> {par['cpu']:.1f} ms: the extra is waiting, not work.")
    print(f"- waiting for a CPU: {par['runq']:.1f} ms per cycle of it (alone: {seq['runq']:.1f}). "
          f"The cycles used {own_cpu + command_cpu:.1f} ms of CPU each ({own_cpu:.1f} plugin, "
          f"{command_cpu:.1f} commands), {busy:.0%} of {cpus} CPUs over the phase, next to the "
          f"machine's other load ({load_before:.1f}). With more runnable threads and tools than "
          f"CPUs, everything queues, and the plugin's threads wait in about the proportion of "
          f"the CPU they use: on a saturated machine the wall-clock own share tends to the "
          f"plugin's CPU share ({own_cpu / ((own_cpu + command_cpu) or 1):.0%} here).")
    blocked = max(0.0, par["own"] - par["cpu"] - par["runq"])
    print(f"- blocked outside commands (GIL hand-offs, fsync, locks): at least {blocked:.1f} ms "
          f"per cycle (alone: {max(0.0, seq['own'] - seq['cpu'] - seq['runq']):.1f}). Every "
          f"blocking system call (file I/O, fsync, waiting for a tool) gives the GIL up, and "
          f"the thread must win it back from threads running Python, which CPython makes "
          f"give it up only every switch interval (5 ms by default).")
    slower = []
    for name in ("[kernel] LOOP_CONFIGURE", "mkfs.ext4", "mkfs.xfs", "blkid", "mount", "umount",
                 "[kernel] unlink data file"):
        alone, crowded = seq["external"].get(name), par["external"].get(name)
        if alone and crowded:
            slower.append(f"{name} {alone:.1f} -> {crowded:.1f} ms")
    if slower:
        print(f"- external work stretches too (mean per call, alone -> crowded): {', '.join(slower)}. "
              f"The tools are CPU-bound (mkfs writes its metadata, blkid probes) and queue for "
              f"the same CPUs; LOOP_CONFIGURE also serialises in the kernel (loop_ctl_mutex for "
              f"a free device, then the new device's queue freeze and its uevent).")


def leftovers(workdir: Path) -> list[str]:
    prefix = str(workdir) + "/"
    found = [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()
             if line.split()[4].startswith(prefix)]
    listing = subprocess.run(["losetup", "--list", "--json", "-O", "NAME,BACK-FILE"],
                             capture_output=True, text=True, check=False).stdout
    for loop in (json.loads(listing)["loopdevices"] if listing.strip() else []):
        if (loop.get("back-file") or "").startswith(prefix):
            found.append(loop["name"])
    return found


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--volumes", type=int, default=32, help="volumes per phase (default 32)")
    parser.add_argument("--concurrency", type=int, default=16,
                        help="worker threads in the concurrent phase (default 16)")
    parser.add_argument("--fs", choices=sorted(MIN_FS_BYTES), default="ext4")
    parser.add_argument("--size", type=parse_size, default=None,
                        help="volume size (default 64Mi, or the filesystem's minimum if larger)")
    parser.add_argument("--dir", default=None, help="parent of the temporary work directory")
    parser.add_argument("--log-level", choices=("debug", "info"), default="debug",
                        help="the plugin's log level; the command table needs debug, which "
                             "itself costs the plugin time (one JSON line per command)")
    args = parser.parse_args(argv)
    if args.volumes < 1 or args.concurrency < 1:
        parser.error("--volumes and --concurrency must be at least 1")
    size = args.size or max(64 << 20, MIN_FS_BYTES[args.fs])

    workdir = Path(tempfile.mkdtemp(prefix="polyvol-bench-", dir=args.dir))
    plugin = TimedPlugin(workdir, args.log_level)
    problems = []
    try:
        plugin.start()
        print(f"polyvol lifecycle benchmark: {args.fs}, {format_size(size)} local-ephemeral "
              f"volumes, plugin log {plugin.log_path} (kept only on errors)")
        sequential = run_phase(plugin, "seq", args.volumes, 1, size, args.fs)
        concurrent = run_phase(plugin, "par", args.volumes, args.concurrency, size, args.fs)
        for title, phase in (("sequential", sequential), ("concurrent", concurrent)):
            _, found = report(title, phase)
            problems += found
            if phase is sequential:
                commands_per_step(phase)
        notes(sequential, concurrent)
    except Exception as error:  # noqa: BLE001
        problems.append(f"benchmark failed: {type(error).__name__}: {error}")
    finally:
        try:
            plugin.stop()
        except Exception as error:  # noqa: BLE001
            problems.append(f"stopping the plugin: {error}")
        # The plugin log outlives the work directory only when something went wrong.
        kept_log = Path(tempfile.gettempdir()) / "polyvol-bench-failed.log"
        if plugin.log_path.exists():
            shutil.copyfile(plugin.log_path, kept_log)
        clean_up_below(workdir)
        left = leftovers(workdir)
        if left:
            problems.append(f"left behind after clean-up: {', '.join(left)}")
        else:
            subprocess.run(["rm", "-rf", "--one-file-system", str(workdir)], check=False)
    if not problems:
        kept_log.unlink(missing_ok=True)
    if problems:
        print(f"\n{len(problems)} error(s) (plugin log kept at {kept_log}):", file=sys.stderr)
        for problem in problems[:20]:
            print(f"  {problem}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
