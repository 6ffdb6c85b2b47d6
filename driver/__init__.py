"""polyvol: a CSI driver offering local, single-copy remote and Ceph-backed volumes."""

__version__ = "0.1.0"
DRIVER_NAME = "polyvol.csi.io"
