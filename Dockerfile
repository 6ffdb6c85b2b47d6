# syntax=docker/dockerfile:1
#
# One image for every polyvol role: the CSI plugin (controller and node) and the remote-disk
# storage server. `polyvol` is the entrypoint; the manifests choose the subcommand:
#
#   polyvol plugin --role controller ...   non-root, no host access
#   polyvol plugin --role node ...         root + privileged: mount, loop devices, /dev/fuse
#   polyvol storage-server ...             non-root: needs only its data dir and two ports
#
# Build:   docker build -t REGISTRY/polyvol:0.1.0 .
# The tag should be the package version (driver/__init__.py); tests/test_manifests.py checks
# that the manifests and the Helm chart name that tag.
#
# Base: Debian 12 (bookworm), the release every measurement in this project was made on
# (QEMU 7.2, nbdkit 1.32, Ceph 16.2.15). The point-release tag is exact; for a reproducible
# build also pin the digest (`docker buildx imagetools inspect debian:12.11-slim` prints it)
# and pass it as --build-arg DEBIAN_IMAGE=debian:12.11-slim@sha256:<digest>.
ARG DEBIAN_IMAGE=debian:12.11-slim

# --- stage 1: build wheels for polyvol and every Python dependency ---------------------------
FROM ${DEBIAN_IMAGE} AS build

# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.11 python3.11-venv \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /src
# Only what the wheel needs (see .dockerignore): the package, its metadata and the README
# that pyproject names as the long description.
COPY pyproject.toml README.md ./
COPY driver ./driver

# `kubernetes` (the client the controller uses to find storage-server pods) is a dependency
# in pyproject (>=30); naming it here again only pins the release the image is built with.
ARG KUBERNETES_CLIENT_VERSION=37.0.2
RUN python3.11 -m venv /build-venv \
    && /build-venv/bin/pip wheel --no-cache-dir --disable-pip-version-check --wheel-dir /wheels \
        . "kubernetes==${KUBERNETES_CLIENT_VERSION}"

# --- stage 2: the runtime image ----------------------------------------------------------------
FROM ${DEBIAN_IMAGE}

# Every external program the driver runs (tests/test_manifests.py keeps this list and the
# driver's argv lists in step):
#   e2fsprogs            mkfs.ext4, e2fsck, resize2fs, dumpe2fs
#   xfsprogs             mkfs.xfs, xfs_growfs
#   util-linux           blkid, fsfreeze, nsenter
#   mount                mount, umount, losetup
#   nbdkit               the storage server's NBD data plane (file plugin, TLS-PSK)
#   libnbd-bin           nbdfuse (user-space NBD attach), nbdinfo (the volume condition's export check)
#   fuse3                fusermount3, /dev/fuse helpers
#   nbd-client           kernel NBD attach, when the node has the nbd module
#   qemu-system-common   qemu-storage-daemon (the TLS-PSK NBD client that reconnects)
#   qemu-block-extra     qemu's rbd block driver (the Ceph classes' user-space attach)
#   ceph-common          rbd (krbd map/unmap), librados/librbd and python3-rados/python3-rbd
#                        (the Ceph backend, issue 4)
#   python3.11           the interpreter (Debian 12's own)
#   ca-certificates      the Kubernetes API's CA is mounted, but keep the system store sane
# Versions are not pinned: Debian 12 ships only security fixes, and an exact pin breaks the
# build when the archive drops the superseded version.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        e2fsprogs xfsprogs util-linux mount \
        nbdkit libnbd-bin fuse3 nbd-client \
        qemu-system-common qemu-block-extra \
        ceph-common \
        python3.11 python3.11-venv \
        ca-certificates \
    && rm -rf /var/lib/apt/lists/*

# The virtualenv gets only polyvol's wheels; Ceph's Python bindings (python3-rados and
# python3-rbd, one extension module each, built for this very Python 3.11) are linked in
# through a .pth directory, as scripts/setup.sh does. Not --system-site-packages: pip would
# then take Debian's older python3-requests (a ceph-common dependency) as already installed.
COPY --from=build /wheels /wheels
ARG KUBERNETES_CLIENT_VERSION=37.0.2
RUN python3.11 -m venv /opt/polyvol \
    && /opt/polyvol/bin/pip install --no-cache-dir --disable-pip-version-check --no-index \
        --find-links /wheels polyvol "kubernetes==${KUBERNETES_CLIENT_VERSION}" \
    && rm -rf /wheels \
    && mkdir /opt/polyvol/ceph-bindings \
    && ln -s /usr/lib/python3/dist-packages/rados.cpython-311-*.so \
        /usr/lib/python3/dist-packages/rbd.cpython-311-*.so /opt/polyvol/ceph-bindings/ \
    && echo /opt/polyvol/ceph-bindings > /opt/polyvol/lib/python3.11/site-packages/polyvol-ceph.pth \
    && /opt/polyvol/bin/python -c 'import rados, rbd, kubernetes, driver.plugin' \
    && /opt/polyvol/bin/polyvol --version

# The unprivileged identity for the controller and the storage server (the manifests run
# the node plugin as root, privileged, because it mounts filesystems and drives loop devices).
RUN groupadd --system --gid 65532 polyvol \
    && useradd --system --uid 65532 --gid 65532 --home-dir /nonexistent --no-create-home \
        --shell /usr/sbin/nologin polyvol

ENV PATH="/opt/polyvol/bin:${PATH}" \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
USER 65532:65532
ENTRYPOINT ["polyvol"]
CMD ["--help"]
