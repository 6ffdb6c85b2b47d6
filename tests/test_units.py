"""Fast tests of the pure parts of the driver: no root, no plugin process, no devices.

Expected values are written out by hand (never derived from the code under test), so each
test fails when the behaviour it pins changes.
"""

import json
import os
import shutil
import subprocess
import threading
import time

import grpc
import pytest

from driver import command, errors, fs, state
from driver.backends.base import DEFAULT_SIZE, choose_size
from driver.errors import Aborted, FailedPrecondition, InvalidArgument, OutOfRange, status_of
from driver.locks import OperationLocks
from driver.rpc import check_host_path, page
from driver.units import format_size, parse_size

KiB, MiB, GiB, TiB = 1 << 10, 1 << 20, 1 << 30, 1 << 40
Code = grpc.StatusCode


# --- driver.units ---------------------------------------------------------------------------

@pytest.mark.parametrize("text, size", [
    ("4096", 4096),
    ("0", 0),
    ("1Ki", KiB),
    ("500Mi", 500 * MiB),
    ("1Gi", GiB),
    ("2Ti", 2 * TiB),
    ("1GiB", GiB),
    ("3MiB", 3 * MiB),
    ("1k", 1000),
    ("1K", 1000),
    ("10G", 10 * 1000**3),
    ("7M", 7 * 1000**2),
    ("1T", 1000**4),
    ("  5Mi \n", 5 * MiB),
])
def test_parse_size_accepts_kubernetes_quantities(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", [
    "", "   ", "Gi", "abc", "-1", "+1", "1.5Gi", "1e9", "1 Gi", "1Xi", "1iB", "1GB", "1kB",
    "1Pi", "1gi", "Mi1", "0x10", "1_000",
    "²", "²Gi", "٣Gi",  # Unicode digits: str.isdigit() says yes, but they are not sizes
])
def test_parse_size_refuses_anything_else_with_invalid_argument(text):
    with pytest.raises(InvalidArgument, match="is not a size"):
        parse_size(text)


@pytest.mark.parametrize("size, text", [
    (0, "0 B"),
    (1023, "1023 B"),
    (1024, "1.0 KiB"),
    (1536, "1.5 KiB"),
    (64 * MiB, "64.0 MiB"),
    (GiB + GiB // 2, "1.5 GiB"),
    (5 * TiB, "5.0 TiB"),
    (2048 * TiB, "2048.0 TiB"),  # no unit above TiB
    (-2048, "-2.0 KiB"),
])
def test_format_size(size, text):
    assert format_size(size) == text


# --- driver.backends.base.choose_size -------------------------------------------------------

@pytest.mark.parametrize("required, limit, minimum, expected", [
    (0, 0, 16 * MiB, DEFAULT_SIZE),                 # nothing asked: the default
    (0, 0, 2 * GiB, 2 * GiB),                       # ...unless the class minimum is larger
    (0, 512 * MiB, 16 * MiB, 512 * MiB),            # a limit below the default caps it
    (1, 0, 16 * MiB, 16 * MiB),                     # raised to the class minimum
    (100 * MiB, 0, 16 * MiB, 100 * MiB),            # exact MiB: kept
    (100 * MiB + 1, 0, 16 * MiB, 101 * MiB),        # rounded up to MiB
    (100 * MiB + 1, 100 * MiB + 4096, 16 * MiB, 100 * MiB + 4096),  # MiB does not fit: 4 KiB
    (100 * MiB + 1, 100 * MiB + 1024, 16 * MiB, 100 * MiB + 512),   # 4 KiB neither: 512 B
    (64 * MiB, 64 * MiB, 16 * MiB, 64 * MiB),       # required == limit, aligned
    (16 * MiB, 0, 16 * MiB, 16 * MiB),              # exactly the minimum
])
def test_choose_size(required, limit, minimum, expected):
    assert choose_size(required, limit, minimum) == expected


def test_choose_size_custom_granularity_rounds_to_it():
    assert choose_size(5 * MiB + 1, 0, MiB, granularity=4 * MiB) == 8 * MiB


@pytest.mark.parametrize("required, limit, minimum, message", [
    (-1, 0, MiB, "negative"),
    (0, -1, MiB, "negative"),
    (2 * GiB, GiB, MiB, "larger than limit_bytes"),
    (0, 8 * MiB, 16 * MiB, "below this class's minimum"),
    (MiB, 8 * MiB, 16 * MiB, "below this class's minimum"),
    (100 * MiB + 1, 100 * MiB + 100, 16 * MiB, "multiple of 512"),
    (16 * MiB + 1, 16 * MiB + 1, 16 * MiB, "multiple of 512"),  # exact but unaligned
])
def test_choose_size_out_of_range(required, limit, minimum, message):
    with pytest.raises(OutOfRange, match=message) as raised:
        choose_size(required, limit, minimum)
    assert status_of(raised.value) == Code.OUT_OF_RANGE


# --- driver.rpc.page --------------------------------------------------------------------------

class StaleToken(Exception):
    """A stand-in for the caller's error type: page must raise exactly what it is given."""


ITEMS = ["a", "b", "c", "d", "e"]


def test_page_walks_the_list_with_tokens():
    assert page(ITEMS, 2, "", StaleToken) == (["a", "b"], "2")
    assert page(ITEMS, 2, "2", StaleToken) == (["c", "d"], "4")
    assert page(ITEMS, 2, "4", StaleToken) == (["e"], "")


def test_page_zero_max_entries_means_everything():
    assert page(ITEMS, 0, "", StaleToken) == (ITEMS, "")
    assert page(ITEMS, 0, "3", StaleToken) == (["d", "e"], "")


def test_page_exact_fit_and_empty_list_give_no_next_token():
    assert page(ITEMS, 5, "", StaleToken) == (ITEMS, "")
    assert page(ITEMS, 10, "", StaleToken) == (ITEMS, "")
    assert page([], 3, "", StaleToken) == ([], "")
    assert page(ITEMS, 2, "5", StaleToken) == ([], "")  # the end itself is a valid position


@pytest.mark.parametrize("token", ["6", "99", "x", "-1", "1.0", " 1", "²"])
def test_page_bad_token_raises_the_given_error(token):
    with pytest.raises(StaleToken, match="not valid"):
        page(ITEMS, 2, token, StaleToken)


def test_page_bad_token_with_aborted_maps_to_aborted():
    with pytest.raises(Aborted) as raised:
        page(ITEMS, 1, "nope", Aborted)
    assert status_of(raised.value) == Code.ABORTED


def test_page_negative_max_entries_is_invalid_argument():
    with pytest.raises(InvalidArgument, match="max_entries"):
        page(ITEMS, -1, "", StaleToken)


# --- driver.rpc.check_host_path ---------------------------------------------------------------

@pytest.fixture
def roots(tmp_path):
    """An allowed root with a symlink escaping it, one staying inside it, and an outside dir."""
    root = tmp_path / "kubelet"
    outside = tmp_path / "outside"
    (root / "pods").mkdir(parents=True)
    outside.mkdir()
    (root / "escape").symlink_to(outside)
    (root / "inside").symlink_to(root / "pods")
    return root, outside


def test_check_host_path_accepts_paths_below_the_root(roots):
    root, _ = roots
    assert check_host_path(f"{root}/pods/v/mount", "target_path", [str(root)]) == f"{root}/pods/v/mount"
    assert check_host_path(f"{root}/new/deep/x", "target_path", [str(root)]) == f"{root}/new/deep/x"
    # A trailing slash is the same path, returned without it.
    assert check_host_path(f"{root}/pods/v/", "target_path", [str(root)]) == f"{root}/pods/v"
    # A symlink inside the root that stays inside it is fine for the parent.
    assert check_host_path(f"{root}/inside/t", "target_path", [str(root)]) == f"{root}/inside/t"


def test_check_host_path_any_of_several_roots(roots, tmp_path):
    root, outside = roots
    assert check_host_path(f"{outside}/t", "target_path", [str(root), str(outside)]) == f"{outside}/t"


@pytest.mark.parametrize("path, message", [
    ("", "is required"),
    ("pods/v/mount", "absolute path"),
    ("./pods", "absolute path"),
    ("{root}/pods/\0x", "absolute path"),
    ("{root}/pods/../../outside/t", "not a normalised path"),
    ("{root}/pods/..", "not a normalised path"),
    ("{root}/pods/./v", "not a normalised path"),
    ("{root}//pods", "not a normalised path"),
    ("{root}/escape/t", "outside the directories"),     # the parent resolves outside
    ("{root}/escape/sub/t", "outside the directories"),
    ("{root}/escape", "symbolic link"),                 # the path itself is a link
    ("{root}/inside", "symbolic link"),
    ("{outside}/t", "outside the directories"),
    ("{root}x/t", "outside the directories"),          # a sibling sharing the root's prefix
    ("/etc/passwd", "outside the directories"),
    ("{root}", "outside the directories"),              # the root itself
    ("{root}/", "outside the directories"),
])
def test_check_host_path_refuses(roots, path, message):
    root, outside = roots
    with pytest.raises(InvalidArgument, match=message) as raised:
        check_host_path(path.format(root=root, outside=outside), "target_path", [str(root)])
    if path:
        assert "target_path" in str(raised.value)


def test_check_host_path_root_given_through_a_symlink(tmp_path):
    real = tmp_path / "real-kubelet"
    real.mkdir()
    (tmp_path / "kubelet").symlink_to(real)
    root = str(tmp_path / "kubelet")
    assert check_host_path(f"{root}/pods/t", "target_path", [root]) == f"{root}/pods/t"
    assert check_host_path(f"{real}/pods/t", "target_path", [root]) == f"{real}/pods/t"
    with pytest.raises(InvalidArgument, match="outside"):
        check_host_path(str(real), "target_path", [root])


# --- driver.errors.status_of ------------------------------------------------------------------

EXPECTED_CODES = {
    errors.InvalidArgument: Code.INVALID_ARGUMENT,
    errors.NotFound: Code.NOT_FOUND,
    errors.AlreadyExists: Code.ALREADY_EXISTS,
    errors.ResourceExhausted: Code.RESOURCE_EXHAUSTED,
    errors.OutOfRange: Code.OUT_OF_RANGE,
    errors.FailedPrecondition: Code.FAILED_PRECONDITION,
    errors.Aborted: Code.ABORTED,
    errors.PermissionDenied: Code.PERMISSION_DENIED,
    errors.Unauthenticated: Code.UNAUTHENTICATED,
    errors.Unavailable: Code.UNAVAILABLE,
    errors.Unimplemented: Code.UNIMPLEMENTED,
    errors.DeadlineExceeded: Code.DEADLINE_EXCEEDED,
}


@pytest.mark.parametrize("cls, code", EXPECTED_CODES.items(), ids=lambda x: getattr(x, "__name__", ""))
def test_status_of_each_typed_error(cls, code):
    assert status_of(cls("message")) == code


def test_status_of_command_errors():
    failed = errors.CommandFailed(["mkfs.ext4", "/dev/loop9"], 1, "first\nmkfs: device busy\n")
    assert status_of(failed) == Code.INTERNAL
    assert str(failed) == "mkfs.ext4 exited with 1: mkfs: device busy"
    assert str(errors.CommandFailed(["true"], 3, "  ")) == "true exited with 3: no stderr"
    timed_out = errors.CommandTimedOut(["mount", "x", "y"], 2.5)
    assert status_of(timed_out) == Code.DEADLINE_EXCEEDED  # inherits from DeadlineExceeded
    assert "mount did not finish within 2.5s" in str(timed_out)


def test_status_of_subclasses_inherit_their_parents_code():
    class VolumeGone(errors.NotFound):
        pass

    class DeeperGone(VolumeGone):
        pass

    class BusyAndMissing(errors.Aborted, errors.NotFound):  # the first base in the MRO wins
        pass

    assert status_of(VolumeGone("x")) == Code.NOT_FOUND
    assert status_of(DeeperGone("x")) == Code.NOT_FOUND
    assert status_of(BusyAndMissing("x")) == Code.ABORTED


@pytest.mark.parametrize("error", [ValueError("x"), KeyError("k"), RuntimeError(),
                                   errors.PolyvolError("untyped"), KeyboardInterrupt()])
def test_status_of_unknown_is_internal(error):
    assert status_of(error) == Code.INTERNAL


def test_every_typed_error_in_the_module_has_a_deliberate_code():
    """A new error class must get a row in STATUS_OF (or inherit one), not fall to INTERNAL."""
    typed = {cls for cls in vars(errors).values()
             if isinstance(cls, type) and issubclass(cls, errors.PolyvolError)
             and cls is not errors.PolyvolError}
    unmapped = {cls.__name__ for cls in typed
                if status_of(cls.__new__(cls)) == Code.INTERNAL and cls is not errors.CommandFailed}
    assert unmapped == set()
    assert set(EXPECTED_CODES) | {errors.CommandFailed, errors.CommandTimedOut} == typed


# --- driver.state -----------------------------------------------------------------------------

def test_state_round_trip_adds_the_schema(tmp_path):
    path = tmp_path / "meta.json"
    record = {"volume_id": "lcl-1", "size_bytes": 64 * MiB, "parameters": {"fsType": "ext4"}}
    state.write_atomic(path, record)
    assert state.read(path) == {"schema": 1, **record}
    assert json.loads(path.read_text())["schema"] == 1
    assert os.listdir(tmp_path) == ["meta.json"]  # no temporary file left


def test_state_rewrite_replaces_the_record(tmp_path):
    path = tmp_path / "meta.json"
    state.write_atomic(path, {"state": "creating"})
    again = state.read(path)
    again["state"] = "ready"
    state.write_atomic(path, again)  # what backends do: read, change, write back
    assert state.read(path) == {"schema": 1, "state": "ready"}
    assert os.listdir(tmp_path) == ["meta.json"]


def test_state_failed_write_keeps_the_old_record_and_leaves_no_temp_file(tmp_path):
    path = tmp_path / "meta.json"
    state.write_atomic(path, {"state": "ready"})
    with pytest.raises(TypeError):
        state.write_atomic(path, {"state": object()})  # not JSON
    assert state.read(path) == {"schema": 1, "state": "ready"}
    assert os.listdir(tmp_path) == ["meta.json"]


def test_state_read_missing_is_none(tmp_path):
    assert state.read(tmp_path / "absent.json") is None


@pytest.mark.parametrize("body", ['{"schema": 2, "state": "ready"}', '{"state": "ready"}',
                                  '{"schema": "1"}', '{"schema": null}', '{"schema": 1.5}'])
def test_state_refuses_newer_or_missing_schema(tmp_path, body):
    path = tmp_path / "meta.json"
    path.write_text(body)
    with pytest.raises(FailedPrecondition, match="schema") as raised:
        state.read(path)
    assert status_of(raised.value) == Code.FAILED_PRECONDITION


def test_state_accepts_older_schema(tmp_path):
    path = tmp_path / "meta.json"
    path.write_text('{"schema": 0, "state": "ready"}')
    assert state.read(path) == {"schema": 0, "state": "ready"}


# --- driver.locks -----------------------------------------------------------------------------

def test_second_hold_is_aborted_naming_the_owner():
    locks = OperationLocks()
    with locks.hold("vol-1", "NodeStageVolume"):
        assert locks.busy() == {"vol-1": "NodeStageVolume"}
        with pytest.raises(Aborted) as raised:
            with locks.hold("vol-1", "DeleteVolume"):
                pytest.fail("the second hold must not run")
        assert "NodeStageVolume on vol-1 has been running for" in str(raised.value)
        assert status_of(raised.value) == Code.ABORTED
        with locks.hold("vol-2", "DeleteVolume"):  # another key is independent
            assert locks.busy() == {"vol-1": "NodeStageVolume", "vol-2": "DeleteVolume"}
        assert locks.busy() == {"vol-1": "NodeStageVolume"}  # the refused hold freed nothing
    assert locks.busy() == {}


def test_hold_is_released_after_an_exception():
    locks = OperationLocks()
    with pytest.raises(RuntimeError):
        with locks.hold("vol-1", "NodeStageVolume"):
            raise RuntimeError("mkfs blew up")
    assert locks.busy() == {}
    with locks.hold("vol-1", "NodeUnstageVolume"):  # free again
        assert locks.busy() == {"vol-1": "NodeUnstageVolume"}


def test_hold_from_another_thread_is_aborted():
    locks = OperationLocks()
    held, release = threading.Event(), threading.Event()

    def owner():
        with locks.hold("vol-1", "CreateVolume"):
            held.set()
            release.wait(10)

    thread = threading.Thread(target=owner)
    thread.start()
    try:
        assert held.wait(10)
        with pytest.raises(Aborted, match="CreateVolume on vol-1"):
            with locks.hold("vol-1", "DeleteVolume"):
                pass
    finally:
        release.set()
        thread.join(10)
    with locks.hold("vol-1", "DeleteVolume"):
        pass


# --- driver.fs: mountinfo parsing -------------------------------------------------------------

MOUNTINFO = "\n".join([
    "22 27 0:21 / /proc rw,relatime - proc proc rw",
    "27 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw,discard",
    r"101 27 7:3 / /var/lib/kubelet/pods/a\040b/volumes/my\011vol rw,relatime shared:5 master:2"
    r" - ext4 /dev/loop3 rw",
    r"102 27 7:3 /sub\134dir /srv/back\134slash rw - ext4 /dev/loop3 rw",
    "103 27 0:45 / /mnt/café\\040bar ro,nosuid - fuse.nbdfuse /tmp/nbd\\040sock rw",
    "104 27 0:6 /loop3 /var/lib/kubelet/block/dev rw - devtmpfs udev rw",
    "105 103 7:4 / /mnt/café\\040bar rw - xfs /dev/loop4 rw",
    "",
])


def test_mountinfo_fields_and_optional_tags():
    parsed = fs.mounts(MOUNTINFO)
    assert len(parsed) == 7
    root = parsed[1]
    assert (root.mount_id, root.device, root.root, root.target, root.options, root.fstype,
            root.source) == (27, "254:0", "/", "/", "rw,relatime", "ext4", "/dev/vda")


def test_mountinfo_unescapes_space_tab_and_backslash():
    by_id = {m.mount_id: m for m in fs.mounts(MOUNTINFO)}
    assert by_id[101].target == "/var/lib/kubelet/pods/a b/volumes/my\tvol"
    assert (by_id[101].fstype, by_id[101].source, by_id[101].device) == ("ext4", "/dev/loop3", "7:3")
    assert by_id[102].root == "/sub\\dir"
    assert by_id[102].target == "/srv/back\\slash"


def test_mountinfo_keeps_utf8_names_next_to_escapes():
    by_id = {m.mount_id: m for m in fs.mounts(MOUNTINFO)}
    assert by_id[103].target == "/mnt/café bar"
    assert by_id[103].source == "/tmp/nbd sock"
    assert by_id[103].fstype == "fuse.nbdfuse"


def test_mountinfo_lookups_use_the_unescaped_path(monkeypatch):
    monkeypatch.setattr(fs, "_read_mountinfo", lambda: MOUNTINFO)
    stacked = fs.mounts_at("/mnt/café bar")
    assert [m.mount_id for m in stacked] == [103, 105]  # in mount order: the top one last
    assert fs.mounts_at("/mnt/café bar/") == stacked  # normalised
    assert fs.is_mounted("/var/lib/kubelet/pods/a b/volumes/my\tvol")
    assert not fs.is_mounted(r"/var/lib/kubelet/pods/a\040b/volumes/my\011vol")
    assert not fs.is_mounted("/mnt")
    assert fs.is_mounted("/srv/back\\slash")
    assert not fs.is_mounted("/srv/back")  # a prefix of a mounted path is not mounted
    assert not fs.is_mounted("/sub\\dir")  # a bind mount's root is not its target
    assert fs.mounts_at("/") == [m for m in fs.mounts(MOUNTINFO) if m.target == "/"]


def test_mountinfo_lookups_agree_with_a_full_parse(monkeypatch):
    """The lookups parse only the lines that can match; they must find exactly what a
    filter over the whole table finds, for every target and device in it."""
    monkeypatch.setattr(fs, "_read_mountinfo", lambda: MOUNTINFO)
    every = fs.mounts(MOUNTINFO)
    for mount in every:
        assert fs.mounts_at(mount.target) == [m for m in every if m.target == mount.target]
        monkeypatch.setattr(fs, "device_number", lambda device, number=mount.device: number)
        assert fs.mounts_of_device("/dev/x") == [m for m in every if m.device == mount.device]


def test_mounts_reads_this_process_mountinfo_by_default():
    targets = [m.target for m in fs.mounts()]
    assert "/" in targets
    assert "/proc" in targets


# --- driver.fs: the ext4 superblock read by grow_unmounted ------------------------------------

def _superblock_image(tmp_path, blocks: int, log_block_size: int, incompat: int,
                      magic: int = 0xEF53, device_bytes: int = 4 * MiB):
    block = bytearray(1024)
    block[0x04:0x08] = (blocks & 0xFFFFFFFF).to_bytes(4, "little")
    block[0x18:0x1C] = log_block_size.to_bytes(4, "little")
    block[0x38:0x3A] = magic.to_bytes(2, "little")
    block[0x60:0x64] = incompat.to_bytes(4, "little")
    block[0x150:0x154] = (blocks >> 32).to_bytes(4, "little")
    image = tmp_path / "sb.img"
    with open(image, "wb") as out:
        out.truncate(device_bytes)
        out.seek(1024)
        out.write(block)
    return str(image)


@pytest.mark.parametrize("blocks, log_block_size, incompat, expected", [
    (16384, 2, 0x2C2, 16384 * 4096),                # 4 KiB blocks, 64bit (0x80) among others
    (65536, 0, 0x002, 65536 * 1024),                # 1 KiB blocks, no 64bit feature
    ((5 << 32) + 7, 2, 0x80, ((5 << 32) + 7) * 4096),  # the high word counts with 64bit...
    ((5 << 32) + 7, 2, 0x00, 7 * 4096),              # ...and is ignored without it
])
def test_ext4_size_from_the_superblock(tmp_path, blocks, log_block_size, incompat, expected):
    image = _superblock_image(tmp_path, blocks, log_block_size, incompat)
    assert fs._ext4_bytes(image) == (expected, 4 * MiB)


@pytest.mark.parametrize("magic, log_block_size", [(0x1234, 2), (0xEF53, 40)])
def test_ext4_size_refuses_what_is_not_an_ext4_superblock(tmp_path, magic, log_block_size):
    image = _superblock_image(tmp_path, 100, log_block_size, 0, magic=magic)
    assert fs._ext4_bytes(image) == (None, 4 * MiB)


def test_ext4_size_of_a_short_device(tmp_path):
    image = tmp_path / "short.img"
    image.write_bytes(bytes(1500))
    assert fs._ext4_bytes(str(image)) == (None, 1500)


@pytest.mark.skipif(not shutil.which("mkfs.ext4"), reason="needs e2fsprogs")
@pytest.mark.parametrize("options", [[], ["-O", "^64bit"], ["-b", "1024"]])
def test_ext4_size_agrees_with_dumpe2fs(tmp_path, options):
    image = tmp_path / "fs.img"
    with open(image, "wb") as out:
        out.truncate(40 * MiB)
    subprocess.run(["mkfs.ext4", "-q", "-F", *options, str(image), "30M"], check=True,
                   capture_output=True)
    header = subprocess.run(["dumpe2fs", "-h", str(image)], check=True, capture_output=True,
                            text=True).stdout
    fields = dict(line.split(":", 1) for line in header.splitlines() if ":" in line)
    assert int(fields["Block count"]) * int(fields["Block size"]) == 30 * MiB
    assert fs._ext4_bytes(str(image)) == (30 * MiB, 40 * MiB)


# --- driver.command: running tools, and the per-RPC accounting ---------------------------------

def test_command_output_exit_code_and_stderr():
    result = command.run(["sh", "-c", "printf 'a\\r\\nb'; echo oops >&2; exit 3"], ok_codes=(3,))
    assert (result.returncode, result.stdout, result.stderr) == (3, "a\nb", "oops\n")
    with pytest.raises(errors.CommandFailed) as failed:
        command.run(["sh", "-c", "echo broken >&2; exit 2"])
    assert (failed.value.returncode, failed.value.stderr) == (2, "broken\n")
    with pytest.raises(errors.CommandFailed) as missing:
        command.run(["polyvol-no-such-tool"])
    assert missing.value.returncode == 127


def test_command_large_output_and_input():
    # More than a pipe holds, both ways: nothing may deadlock.
    text = "x" * (300 * KiB) + "\n"
    assert command.run(["cat"], input=text).stdout == text
    assert len(command.run(["head", "-c", str(MiB), "/dev/zero"]).stdout) == MiB


def test_command_timeout_kills_the_tool():
    started = time.monotonic()
    with pytest.raises(errors.CommandTimedOut):
        command.run(["sleep", "30"], timeout=0.3)
    assert time.monotonic() - started < 5


def test_a_tool_that_leaves_a_process_holding_its_output_still_returns():
    """The tool exits, but a child it started in the background keeps stdout open: its output
    and exit code are returned about a second later, not after the command's timeout."""
    started = time.monotonic()
    done = command.run(["sh", "-c", "(sleep 29.25 &); echo done"], timeout=20)
    assert done.stdout == "done\n" and done.returncode == 0
    assert time.monotonic() - started < 5
    subprocess.run(["pkill", "-f", "^sleep 29.25$"], check=False)


def test_accounting_keeps_command_and_kernel_time_apart():
    with command.accounting() as spent:
        command.run(["sleep", "0.05"])
        with command.kernel("test call") as fields:
            fields["extra"] = 1
            time.sleep(0.03)
        time.sleep(0.03)  # the plugin's own time: in neither box
    assert 0.05 <= spent.seconds < 1
    assert 0.03 <= spent.kernel_seconds < 1
    assert spent.external_seconds == spent.seconds + spent.kernel_seconds
    command.run(["true"])  # outside any accounting: counted nowhere, no error


# --- driver.attach.loop: which devices a lookup reads -----------------------------------------

def test_loop_lookup_reads_only_loop_devices_with_a_capacity():
    from driver.attach import loop
    partitions = (b"major minor  #blocks  name\n\n"
                  b" 254        0  268435456 vda\n"
                  b" 254        1     524288 vda1\n"
                  b"   7        3      65536 loop3\n"
                  b"   7       12          0 loop12\n"       # under 1 KiB: still a capacity
                  b" 259        0      32768 loop3p1\n"      # a partition of loop3
                  b"   7       40    1048576 loop40\n")
    assert loop._sized_loop_names(partitions) == ["loop3", "loop12", "loop40"]
    assert loop._sized_loop_names(b"major minor  #blocks  name\n\n 254 0 1 vda\n") == []
