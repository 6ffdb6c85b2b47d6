"""`polyvol volume|snapshot ...`, the client for people, run as a user would run it against a
real plugin (the README's walk-through): tables on stdout, errors on stderr with exit 1."""

import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

pytestmark = pytest.mark.root


def polyvol(plugin, *args, ok=True) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "driver.cli", *args, "--endpoint", plugin.endpoint],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert (done.returncode == 0) == ok, done.stdout + done.stderr
    return done


def test_a_volume_life_through_the_client(plugin):
    made = polyvol(plugin, "volume", "create", "client-demo", "--size", "64Mi")
    assert "VOLUME ID" in made.stdout and "64.0 MiB" in made.stdout
    volume_id = made.stdout.splitlines()[1].split()[0]
    assert volume_id.startswith("lcl-")

    target = plugin.path("client", "target")
    polyvol(plugin, "volume", "publish", volume_id, "--target", target)
    Path(target, "hello").write_text("from the client")
    shown = polyvol(plugin, "volume", "show", volume_id).stdout
    assert "local-ephemeral" in shown and "ok" in shown

    grown = polyvol(plugin, "volume", "expand", volume_id, "--size", "96Mi").stdout
    assert "96.0 MiB" in grown
    snapshot = polyvol(plugin, "volume", "snapshot", volume_id, "client-snap").stdout
    snapshot_id = next(word for word in snapshot.split() if word.startswith("lcl-snap-"))
    assert snapshot_id in polyvol(plugin, "snapshot", "list", "--volume", volume_id).stdout

    listed = polyvol(plugin, "volume", "list").stdout
    assert volume_id in listed and "RAW/LOGICAL" in listed

    # an attached volume cannot go away under its user
    refused = polyvol(plugin, "volume", "delete", volume_id, ok=False)
    assert refused.stderr.startswith("polyvol: FAILED_PRECONDITION") or "ABORTED" in refused.stderr

    polyvol(plugin, "volume", "unpublish", volume_id, "--target", target)
    assert not Path(target, "hello").exists()
    polyvol(plugin, "snapshot", "delete", snapshot_id)
    polyvol(plugin, "volume", "delete", volume_id)
    assert volume_id not in polyvol(plugin, "volume", "list").stdout


def test_client_errors_name_the_code_and_exit_1(plugin):
    missing = polyvol(plugin, "volume", "show", "lcl-" + "0" * 32, ok=False)
    assert missing.stderr.startswith("polyvol: NOT_FOUND")
    bad = polyvol(plugin, "volume", "create", "x", "--param", "oops", ok=False)
    assert "KEY=VALUE" in bad.stderr
