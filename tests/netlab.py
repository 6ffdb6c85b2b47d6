"""A small multi-host network lab on one machine: one network namespace per "host".

    with NetLab(["node", "srv1", "srv2"]) as lab:
        server = lab.popen("srv1", ["nbdkit", "-f", "-i", lab.address("srv1"), ...])
        lab.run("node", ["nbdinfo", f"nbd://{lab.address('srv1')}/vol"], check=True)

Layout: every host is its own network namespace with loopback up and one veth link `eth0`
carrying its address (10.213.0.<n>/24, hosts numbered from .1 in the order given). The
other ends of the veths are enslaved to a bridge that lives in a namespace of its own (the
"hub"), so nothing is added to the root namespace: the root namespace can neither reach
the lab's addresses nor be reached from them, and labs running side by side do not clash
(each has its own namespaces; the same addresses live in separate worlds).

Commands run with `nsenter --net=/run/netns/NAME`: ONLY the network namespace is entered.
(`ip netns exec` would also give the command a private mount namespace, so a long-lived
helper would keep private copies of mounts made later and pin their loop devices.) Mounts,
loop devices and files are therefore shared with the rest of the machine, as on a real node.

Teardown (leaving the `with` block, also on an exception, or `close()`) kills every process
started through `popen`, then every other process still inside a lab namespace (helpers that
daemonized away from their parent, e.g. qemu-storage-daemon started by the code under test),
then removes the namespaces, which destroys the veths and the bridge with them. Namespaces of
an earlier lab whose owning process died (a killed pytest) are removed at the next start.

Namespace names are `pvlab<pid>-<n>-<host>`; host names must be short ([a-z0-9]{1,8}).
"""

import itertools
import os
import re
import signal
import subprocess
import time
from pathlib import Path

from pyroute2 import NetNS, netns

NETNS_DIR = Path("/run/netns")
SUBNET = "10.213.0"
PREFIXLEN = 24
_PREFIX = "pvlab"
_HUB = "hub"
_HOST_NAME = re.compile(r"^[a-z0-9]{1,8}$")
_serial = itertools.count(1)


class NetLab:
    def __init__(self, hosts, subnet: str = SUBNET):
        hosts = list(hosts)
        if len(set(hosts)) != len(hosts) or not hosts or len(hosts) > 250:
            raise ValueError(f"host names must be unique and 1-250 of them: {hosts}")
        for host in hosts:
            if not _HOST_NAME.match(host) or host == _HUB:
                raise ValueError(f"bad host name {host!r}: [a-z0-9]{{1,8}}, not {_HUB!r}")
        self.hosts = hosts
        self.subnet = subnet
        self._tag = f"{_PREFIX}{os.getpid()}-{next(_serial)}"
        self._addresses = {host: f"{subnet}.{n}" for n, host in enumerate(hosts, start=1)}
        self._made: list[str] = []  # namespace names, in creation order
        self._children: list[subprocess.Popen] = []

    # --- the API ---------------------------------------------------------------------------

    def namespace(self, host: str) -> str:
        """The network namespace name of `host` (a file in /run/netns)."""
        self._check(host)
        return f"{self._tag}-{host}"

    def netns_path(self, host: str) -> str:
        return str(NETNS_DIR / self.namespace(host))

    def address(self, host: str) -> str:
        """The IPv4 address of `host` on the lab link."""
        self._check(host)
        return self._addresses[host]

    def prefix(self, host: str) -> list[str]:
        """The argv prefix that runs a command inside `host`'s network namespace (only)."""
        return ["nsenter", f"--net={self.netns_path(host)}", "--"]

    def run(self, host: str, argv, **kwargs) -> subprocess.CompletedProcess:
        """subprocess.run(argv) inside `host`; keyword arguments go to subprocess.run.
        Defaults: capture_output=True, text=True, timeout=120. A command that leaves a daemon
        behind (setsid -f ...) needs stdout/stderr=subprocess.DEVNULL and capture_output=False,
        or run() waits for the daemon to close the pipes."""
        kwargs.setdefault("capture_output", True)
        kwargs.setdefault("text", True)
        kwargs.setdefault("timeout", 120)
        return subprocess.run(self.prefix(host) + [str(a) for a in argv], **kwargs)

    def popen(self, host: str, argv, **kwargs) -> subprocess.Popen:
        """subprocess.Popen(argv) inside `host`, in a new session; stopped at teardown (or
        earlier with `stop`). Keyword arguments go to subprocess.Popen (stdin defaults to
        /dev/null)."""
        kwargs.setdefault("stdin", subprocess.DEVNULL)
        kwargs["start_new_session"] = True
        child = subprocess.Popen(self.prefix(host) + [str(a) for a in argv], **kwargs)
        self._children.append(child)
        return child

    def stop(self, child: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 10) -> None:
        """Signal a child started with `popen` (its whole session), wait, then SIGKILL."""
        _signal_group(child, sig)
        try:
            child.wait(timeout)
        except subprocess.TimeoutExpired:
            _signal_group(child, signal.SIGKILL)
            child.wait(10)
        if child in self._children:
            self._children.remove(child)

    def pids(self, host: str | None = None) -> list[int]:
        """Processes living in `host`'s network namespace (every lab namespace when None)."""
        wanted = set()
        for name in ([self.namespace(host)] if host else self._made):
            try:
                st = os.stat(NETNS_DIR / name)
            except FileNotFoundError:
                continue
            wanted.add((st.st_dev, st.st_ino))
        found = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) == os.getpid():
                continue
            try:
                st = os.stat(f"/proc/{entry}/ns/net")
            except OSError:
                continue
            if (st.st_dev, st.st_ino) in wanted:
                found.append(int(entry))
        return found

    # --- lifecycle -------------------------------------------------------------------------

    def __enter__(self) -> "NetLab":
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self) -> None:
        remove_stale()
        hub = f"{self._tag}-{_HUB}"
        for name in [hub] + [self.namespace(h) for h in self.hosts]:
            if (NETNS_DIR / name).exists():
                raise RuntimeError(f"network namespace {name} already exists")
            netns.create(name)
            self._made.append(name)
        with NetNS(hub, flags=0) as ipr:
            self._link_up(ipr, "lo")
            ipr.link("add", ifname="br0", kind="bridge")
            bridge = self._link_up(ipr, "br0")
            for n, host in enumerate(self.hosts, start=1):
                fd = os.open(self.netns_path(host), os.O_RDONLY)
                try:
                    ipr.link("add", ifname=f"v{n}", kind="veth",
                             peer={"ifname": "eth0", "net_ns_fd": fd})
                finally:
                    os.close(fd)
                port = ipr.link_lookup(ifname=f"v{n}")[0]
                ipr.link("set", index=port, master=bridge)
                self._link_up(ipr, f"v{n}")
        for host in self.hosts:
            with NetNS(self.namespace(host), flags=0) as ipr:
                self._link_up(ipr, "lo")
                eth = ipr.link_lookup(ifname="eth0")[0]
                ipr.addr("add", index=eth, address=self.address(host), prefixlen=PREFIXLEN)
                self._link_up(ipr, "eth0")

    def close(self) -> None:
        """Kill what runs in the lab and remove its namespaces. Safe to call twice."""
        for child in list(self._children):
            _signal_group(child, signal.SIGTERM)
        deadline = time.monotonic() + 5
        for child in list(self._children):
            try:
                child.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal_group(child, signal.SIGKILL)
                child.wait(10)
        self._children.clear()
        _kill_all(self.pids)
        for name in reversed(self._made):
            _remove(name)
        self._made.clear()

    # --- internals -------------------------------------------------------------------------

    def _check(self, host: str) -> None:
        if host not in self._addresses:
            raise KeyError(f"no host {host!r} in this lab ({', '.join(self.hosts)})")

    @staticmethod
    def _link_up(ipr, ifname: str) -> int:
        index = ipr.link_lookup(ifname=ifname)[0]
        ipr.link("set", index=index, state="up")
        return index


def _signal_group(child: subprocess.Popen, sig: int) -> None:
    if child.poll() is None:
        try:
            os.killpg(child.pid, sig)
        except ProcessLookupError:
            pass


def _kill_all(list_pids) -> None:
    """SIGKILL every process `list_pids()` returns until none is left (bounded)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        alive = [pid for pid in list_pids() if not _zombie(pid)]
        if not alive:
            return
        for pid in alive:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.05)


def _zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rpartition(")")[2].split()[0] in ("Z", "X")


def _remove(name: str) -> None:
    try:
        netns.remove(name)
    except FileNotFoundError:
        pass


def remove_stale() -> None:
    """Remove lab namespaces whose owning process is gone (left by a killed test run)."""
    if not NETNS_DIR.is_dir():
        return
    for name in os.listdir(NETNS_DIR):
        found = re.match(rf"^{_PREFIX}(\d+)-", name)
        if not found or Path(f"/proc/{found.group(1)}").exists():
            continue
        st = os.stat(NETNS_DIR / name)
        lab_pids = []
        for entry in os.listdir("/proc"):
            try:
                if entry.isdigit():
                    ns = os.stat(f"/proc/{entry}/ns/net")
                    if (ns.st_dev, ns.st_ino) == (st.st_dev, st.st_ino):
                        lab_pids.append(int(entry))
            except OSError:
                pass
        _kill_all(lambda: [p for p in lab_pids if Path(f"/proc/{p}").exists()])
        _remove(name)
