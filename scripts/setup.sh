#!/usr/bin/env bash
# Install everything polyvol's plugin and its tests need on a Debian 12 machine (as root).
#
# Idempotent and fast when everything is already there: apt runs only when a package is
# missing, pip only when pyproject.toml changed since the last install (or the venv is
# broken), `go install` only when the pinned csi-sanity is absent. Tool chatter goes to
# .work/setup.log, which is printed (its tail) when a step fails.
#
# To add system packages (for example Ceph's, later), extend APT_PACKAGES below.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WORK="$REPO/.work"
LOG="$WORK/setup.log"
VENV="$REPO/.venv"
BIN="$WORK/bin"

# Debian packages, grouped by what needs them.
APT_PACKAGES=(
    # filesystems: mkfs, fsck, grow (resize2fs, xfs_growfs), blkid, fsfreeze, nsenter
    e2fsprogs xfsprogs util-linux
    # mount, umount, losetup
    mount
    # user-space attach paths: fusermount3, nbdkit (storage server data plane), nbdfuse, qemu-nbd
    fuse3 nbdkit libnbd-bin qemu-utils
    # remote-disk attach: qemu-storage-daemon (TLS-PSK NBD client that reconnects), kernel NBD client
    qemu-system-common qemu-block-extra nbd-client
    # network namespaces for multi-host tests
    iproute2
    # data-integrity and performance tests
    fio
    # Ceph (replicated and erasure-coded classes): the single-host test cluster's daemons, the
    # rbd/ceph commands (krbd map, lock fencing), the librados/librbd Python bindings
    ceph-mon ceph-osd ceph-mgr ceph-common python3-rados python3-rbd
    # the virtualenv, when the machine has no other Python 3.11
    python3.11 python3.11-venv
)

CSI_SANITY_MODULE="github.com/kubernetes-csi/csi-test/v5"
CSI_SANITY_VERSION="v5.6.0"   # tests/test_sanity.py's skip table was checked against this version

mkdir -p "$WORK" "$BIN"

say() { printf 'setup: %s\n' "$*" >&2; }

# Run a command with its output in the log; on failure show the log's tail and stop.
quietly() {
    printf '\n$ %s\n' "$*" >>"$LOG"
    if ! "$@" >>"$LOG" 2>&1 </dev/null; then
        say "FAILED: $*"
        say "last lines of $LOG:"
        tail -n 60 "$LOG" >&2
        exit 1
    fi
}

# Only one setup at a time (test.sh and run-plugin.sh may start together).
exec 9>"$WORK/setup.lock"
flock 9
: >"$LOG"

# --- Debian packages -------------------------------------------------------------------
missing=()
for package in "${APT_PACKAGES[@]}"; do
    status="$(dpkg-query -W -f='${db:Status-Status}' "$package" 2>/dev/null || true)"
    [[ "$status" == "installed" ]] || missing+=("$package")
done
if ((${#missing[@]})); then
    say "installing Debian packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    # A third-party source that cannot be reached must not stop the install from Debian's.
    printf '\n$ apt-get update\n' >>"$LOG"
    apt-get update >>"$LOG" 2>&1 </dev/null ||
        say "apt-get update reported errors (see $LOG); installing anyway"
    quietly apt-get install -y "${missing[@]}"
fi

# --- Python virtualenv -----------------------------------------------------------------
stamp="$VENV/.polyvol-setup"
want="$(sha256sum "$REPO/pyproject.toml" | cut -d' ' -f1) $REPO"
# An editable install of *this* checkout with the dev tools importable.
venv_ok() {
    [[ -x "$VENV/bin/python" && -x "$VENV/bin/polyvol" && -f "$stamp" ]] || return 1
    [[ "$(cat "$stamp")" == "$want" ]] || return 1
    "$VENV/bin/python" - "$REPO" <<'EOF' >/dev/null 2>&1
import pathlib, sys
import driver, grpc, grpc_tools, pytest, pytest_timeout
assert pathlib.Path(driver.__file__).resolve().parent.parent == pathlib.Path(sys.argv[1]).resolve()
EOF
}
if ! venv_ok; then
    if [[ ! -x "$VENV/bin/python" ]]; then
        python="$(command -v python3.11 || true)"
        [[ -n "$python" ]] || { say "python3.11 not found"; exit 1; }
        say "creating $VENV with $python"
        quietly "$python" -m venv "$VENV"
    fi
    say "installing polyvol (editable) and its dev dependencies into .venv"
    quietly "$VENV/bin/python" -m pip install --disable-pip-version-check -e "$REPO[dev]"
    printf '%s\n' "$want" >"$stamp"
    venv_ok || { say "the virtualenv still does not import polyvol and its dev tools"; exit 1; }
fi

# --- Ceph's Python bindings in the virtualenv ---------------------------------------------
# Debian's python3-rados/python3-rbd are single extension modules built for CPython 3.11.
# Link just those two files into a directory of the venv named by a .pth file (not the whole
# of dist-packages: Debian's other modules must not shadow the venv's).
ceph_dir="$VENV/ceph-bindings"
ceph_pth="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/polyvol-ceph.pth"
mkdir -p "$ceph_dir"
for module in rados rbd; do
    so="$(ls /usr/lib/python3/dist-packages/"$module".cpython-311-*.so 2>/dev/null | head -n 1)"
    [[ -n "$so" ]] || { say "python3-$module has no CPython 3.11 module in /usr/lib/python3/dist-packages"; exit 1; }
    [[ "$(readlink "$ceph_dir/$(basename "$so")" || true)" == "$so" ]] || ln -sfn "$so" "$ceph_dir/$(basename "$so")"
done
[[ "$(cat "$ceph_pth" 2>/dev/null || true)" == "$ceph_dir" ]] || printf '%s\n' "$ceph_dir" >"$ceph_pth"
"$VENV/bin/python" -c 'import rados, rbd' >>"$LOG" 2>&1 ||
    { say "the virtualenv cannot import Ceph's rados/rbd modules (see $LOG)"; tail -n 20 "$LOG" >&2; exit 1; }

# --- Go and csi-sanity -----------------------------------------------------------------
# Go (>= 1.25 for csi-test v5.6.0) comes with the machine; look in the usual places too.
export PATH="$PATH:/usr/local/go/bin"
sanity_ok() {
    [[ -x "$BIN/csi-sanity" ]] &&
        grep -aqF "$(printf 'mod\t%s\t%s\t' "$CSI_SANITY_MODULE" "$CSI_SANITY_VERSION")" "$BIN/csi-sanity"
}
if ! sanity_ok; then
    command -v go >/dev/null || { say "go not found (needed to build csi-sanity)"; exit 1; }
    say "building csi-sanity $CSI_SANITY_VERSION into .work/bin"
    quietly env GOBIN="$BIN" go install "$CSI_SANITY_MODULE/cmd/csi-sanity@$CSI_SANITY_VERSION"
    sanity_ok || { say "$BIN/csi-sanity is not $CSI_SANITY_MODULE $CSI_SANITY_VERSION"; exit 1; }
fi

# --- kustomize and helm (tests/test_manifests.py renders deploy/ and charts/polyvol) -----
# Built from their Go modules at pinned versions (kustomize v5.8.3 needs Go 1.27).
GO_TOOLS=(
    "sigs.k8s.io/kustomize/kustomize/v5 v5.8.2 kustomize"
    "helm.sh/helm/v3 v3.22.0 helm"
)
for tool in "${GO_TOOLS[@]}"; do
    read -r module version binary <<<"$tool"
    if ! grep -aqF "$(printf 'mod\t%s\t%s\t' "$module" "$version")" "$BIN/$binary" 2>/dev/null; then
        command -v go >/dev/null || { say "go not found (needed to build $binary)"; exit 1; }
        say "building $binary $version into .work/bin"
        package="$module"; [[ "$binary" == helm ]] && package="$module/cmd/helm"
        quietly env GOBIN="$BIN" go install "$package@$version"
    fi
done

say "ok (Debian packages, .venv with Ceph bindings, csi-sanity $CSI_SANITY_VERSION)"
