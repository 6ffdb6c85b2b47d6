"""The kernel NBD and krbd steps, against a fake sysfs.

These machines have no nbd or rbd kernel module, so the kernel paths cannot run here for
real (see the module docstrings). What the code decides from the kernel's tables can still
be tested: the kernel is replaced by a directory laid out like /sys and a stand-in for
`nbd-client` / `rbd` that changes it the way the kernel would. Unit tests with fakes, in
addition to the real-device tests of the user-space paths, not instead of them."""

from pathlib import Path

import pytest

from driver import command
from driver.attach import nbd_kernel, rbd
from driver.errors import CommandFailed, FailedPrecondition, ResourceExhausted


class FakeNbdKernel:
    """/sys/block/nbdN as the kernel shows it, and nbd-client acting on it."""

    def __init__(self, root: Path, devices: int):
        self.root = root
        self.calls: list[list[str]] = []
        self.refuse: set[str] = set()  # devices whose connect fails (lost a race)
        for index in range(devices):
            (root / f"nbd{index}").mkdir(parents=True)
            (root / f"nbd{index}" / "size").write_text("0\n")
        (root / "loop0").mkdir()  # other block devices are ignored

    def busy(self, name: str, size: str = "0") -> None:
        (self.root / name / "pid").write_text("4242\n")
        (self.root / name / "size").write_text(f"{size}\n")

    def run(self, argv, **_):
        self.calls.append(list(argv))
        assert argv[0] == "nbd-client"
        if argv[1] == "-d":
            name = Path(argv[2]).name
            (self.root / name / "pid").unlink()
            (self.root / name / "size").write_text("0\n")
            return command.Result(argv, 0, "", "", 0.0)
        device = argv[3]
        name = Path(device).name
        if device in self.refuse:
            raise CommandFailed(argv, 1, "Error: Device busy")
        self.busy(name, size="131072")
        return command.Result(argv, 0, "", "", 0.0)


@pytest.fixture
def kernel(tmp_path, monkeypatch):
    fake = FakeNbdKernel(tmp_path / "block", devices=4)
    monkeypatch.setattr(nbd_kernel, "SYS_BLOCK", fake.root)
    monkeypatch.setattr(nbd_kernel.command, "run", fake.run)
    return fake


def test_connect_takes_the_first_free_device_with_the_agreed_options(kernel):
    kernel.busy("nbd0")
    device = nbd_kernel.connect("/run/q.sock", "vol", timeout_s=90)
    assert device == "/dev/nbd1" and nbd_kernel.connected(device)
    assert kernel.calls == [["nbd-client", "-unix", "/run/q.sock", "/dev/nbd1", "-name", "vol",
                             "-block-size", "512", "-timeout", "90"]]


def test_a_lost_race_moves_on_to_the_next_device(kernel):
    kernel.refuse.add("/dev/nbd0")
    assert nbd_kernel.connect("/run/q.sock", "vol", timeout_s=90) == "/dev/nbd1"
    assert [c[3] for c in kernel.calls] == ["/dev/nbd0", "/dev/nbd1"]


def test_a_device_with_a_size_but_no_pid_is_not_taken(kernel):
    # disconnecting, or set up by someone else: not free
    (kernel.root / "nbd0" / "size").write_text("2048\n")
    assert nbd_kernel.connect("/run/q.sock", "vol", timeout_s=90) == "/dev/nbd1"


def test_no_free_device_is_resource_exhausted(kernel):
    for index in range(4):
        kernel.busy(f"nbd{index}")
    with pytest.raises(ResourceExhausted, match="nbds_max"):
        nbd_kernel.connect("/run/q.sock", "vol", timeout_s=90)
    assert kernel.calls == []


def test_every_attempt_failing_says_why(kernel):
    kernel.refuse.update(f"/dev/nbd{i}" for i in range(4))
    with pytest.raises(FailedPrecondition, match="Device busy"):
        nbd_kernel.connect("/run/q.sock", "vol", timeout_s=90)


def test_disconnect_only_touches_a_connected_device(kernel):
    nbd_kernel.disconnect("/dev/nbd2")
    assert kernel.calls == []
    device = nbd_kernel.connect("/run/q.sock", "vol", timeout_s=90)
    nbd_kernel.disconnect(device)
    assert kernel.calls[-1] == ["nbd-client", "-d", device] and not nbd_kernel.connected(device)


# --- krbd: which /dev/rbdN map an image, read from /sys/bus/rbd/devices ---
def map_device(root: Path, index: int, pool: str, image: str, namespace: str = "",
               snap: str = "-") -> None:
    entry = root / str(index)
    entry.mkdir(parents=True)
    for name, value in (("pool", pool), ("name", image), ("pool_ns", namespace),
                        ("current_snap", snap)):
        (entry / name).write_text(f"{value}\n")


def test_krbd_devices_match_pool_namespace_and_image_and_skip_snapshots(tmp_path, monkeypatch):
    root = tmp_path / "rbd-devices"
    monkeypatch.setattr(rbd, "RBD_SYSFS", root)
    recorded = {"pool": "rep", "namespace": "", "image": "pv-1"}
    assert rbd._krbd_devices(recorded) == []  # no rbd module: no directory at all
    map_device(root, 0, "rep", "pv-1")
    map_device(root, 1, "rep", "pv-2")
    map_device(root, 2, "other", "pv-1")
    map_device(root, 3, "rep", "pv-1", namespace="tenant")
    map_device(root, 4, "rep", "pv-1", snap="snap-1")  # a snapshot mapped read-only
    map_device(root, 5, "rep", "pv-1")
    assert rbd._krbd_devices(recorded) == ["/dev/rbd0", "/dev/rbd5"]
    assert rbd._krbd_devices({**recorded, "namespace": "tenant"}) == ["/dev/rbd3"]
