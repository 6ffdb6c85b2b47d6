#!/usr/bin/env python3
"""Regenerate the Python gRPC stubs in driver/proto/ from the pinned protos.

The CSI spec is not vendored: its csi.proto is taken from the Go module named in
proto/csi.lock (through the Go module proxy, which checks it against the Go checksum
database) and its module hash is compared with the pinned one. polyvol's own protos
live next to this script.

    python proto/generate.py          # rewrite driver/proto/
    python proto/generate.py --check  # exit 1 if the committed stubs are stale
"""

import argparse
import filecmp
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LOCK = REPO / "proto" / "csi.lock"
OUT_PACKAGE = "driver/proto"
OWN_PROTOS = sorted((REPO / "proto").glob("*.proto"))


def read_lock() -> dict:
    entries = {}
    for line in LOCK.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            entries[key.strip()] = value.strip()
    return entries


def fetch_csi_proto() -> Path:
    lock = read_lock()
    ref = f"{lock['module']}@{lock['version']}"
    done = subprocess.run(["go", "mod", "download", "-json", ref],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        sys.exit(f"go mod download {ref} failed: {done.stderr or done.stdout}")
    info = json.loads(done.stdout)
    if info.get("Sum") != lock["sum"]:
        sys.exit(f"{ref}: module hash {info.get('Sum')} differs from the pinned {lock['sum']}")
    return Path(info["Dir"]) / "csi.proto"


def generate(out_dir: Path) -> None:
    from grpc_tools import protoc  # dev dependency; imported late so --help works without it

    with tempfile.TemporaryDirectory() as tmp:
        # Laying the protos out as driver/proto/<name>.proto makes the generated
        # *_pb2_grpc.py import "from driver.proto import x_pb2", which is what a package needs.
        include = Path(tmp) / "src"
        pkg_dir = include / OUT_PACKAGE
        pkg_dir.mkdir(parents=True)
        shutil.copy(fetch_csi_proto(), pkg_dir / "csi.proto")
        for own in OWN_PROTOS:
            shutil.copy(own, pkg_dir / own.name)
        build = Path(tmp) / "out"
        build.mkdir()
        well_known = Path(protoc.__file__).parent / "_proto"
        sources = sorted(str(p.relative_to(include)) for p in pkg_dir.glob("*.proto"))
        args = ["protoc", f"-I{include}", f"-I{well_known}", f"--python_out={build}",
                f"--pyi_out={build}", f"--grpc_python_out={build}", *sources]
        if protoc.main(args) != 0:
            sys.exit("protoc failed")
        out_dir.mkdir(parents=True, exist_ok=True)
        for generated in sorted((build / OUT_PACKAGE).iterdir()):
            shutil.copy(generated, out_dir / generated.name)
    (out_dir / "__init__.py").write_text('"""Generated gRPC stubs; regenerate with proto/generate.py."""\n')


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="compare freshly generated stubs with the committed ones")
    args = parser.parse_args()
    target = REPO / OUT_PACKAGE
    if not args.check:
        for old in target.glob("*_pb2*.py*"):
            old.unlink()
        generate(target)
        print(f"regenerated {OUT_PACKAGE}")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        fresh = Path(tmp) / "stubs"
        generate(fresh)
        names = sorted(p.name for p in fresh.iterdir())
        committed = sorted(p.name for p in target.iterdir() if p.is_file())
        _, mismatch, errors = filecmp.cmpfiles(fresh, target, names, shallow=False)
        if mismatch or errors or names != committed:
            print(f"stale stubs in {OUT_PACKAGE}: differing {mismatch + errors}, "
                  f"expected files {names}, found {committed}; run proto/generate.py")
            return 1
    print(f"{OUT_PACKAGE} is up to date")
    return 0


if __name__ == "__main__":
    os.chdir(REPO)
    sys.exit(main())
