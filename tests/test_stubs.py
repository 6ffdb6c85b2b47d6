"""The committed gRPC stubs in driver/proto/ must be what proto/generate.py makes now."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# Where the official Go distribution installs itself, for when PATH lacks it.
GO_FALLBACK_DIRS = ("/usr/local/go/bin", str(Path.home() / "go" / "bin"))


def find_go() -> str | None:
    return shutil.which("go") or shutil.which("go", path=os.pathsep.join(GO_FALLBACK_DIRS))


def test_generated_stubs_are_current():
    go = find_go()
    assert go, "Go is needed to fetch the pinned csi.proto (scripts/setup.sh expects it on the machine)"
    env = {**os.environ, "PATH": os.pathsep.join([str(Path(go).parent), os.environ.get("PATH", "")])}
    done = subprocess.run([sys.executable, str(REPO / "proto" / "generate.py"), "--check"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"proto/generate.py --check failed:\n{done.stdout}\n{done.stderr}"
    assert "up to date" in done.stdout, done.stdout
