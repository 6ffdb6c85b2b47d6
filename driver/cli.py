"""The `polyvol` command: the CSI plugin, and a client for humans to drive any CSI endpoint."""

import argparse
import os
import re
import socket
import sys

from . import DRIVER_NAME, __version__, log
from .attach.nbd import RECONNECT_DELAY
from .errors import PolyvolError
from .units import parse_size

DEFAULT_ENDPOINT = "unix:///run/polyvol/csi.sock"
DEFAULT_STATE_DIR = "/var/lib/polyvol"
DEFAULT_PUBLISH_ROOT = "/var/lib/kubelet"


def _plugin_parser(commands) -> None:
    plugin = commands.add_parser("plugin", help="serve the CSI Identity, Controller and Node services")
    plugin.add_argument("--endpoint", default=DEFAULT_ENDPOINT, help="unix:///path/csi.sock")
    plugin.add_argument("--node-id", default=socket.gethostname(),
                        help="this node's name (Kubernetes: the node name); default: hostname")
    plugin.add_argument("--state-dir", default=DEFAULT_STATE_DIR,
                        help="where local volumes and the plugin's records live")
    plugin.add_argument("--role", choices=("controller", "node", "all"), default="all",
                        help="which CSI services to serve")
    plugin.add_argument("--driver-name", default=DRIVER_NAME, type=_driver_name,
                        help=f"the CSI driver name (default {DRIVER_NAME}); a cluster runs "
                             f"local-ephemeral under a name of its own, see docs/install.md")
    plugin.add_argument("--types", default="", type=_type_list, metavar="TYPE,...",
                        help="serve only these StorageClass types (default: all)")
    plugin.add_argument("--default-type", default="",
                        help="StorageClass type to use when a request names none "
                             "(for CSI clients that send no parameters)")
    plugin.add_argument("--publish-root", action="append", dest="publish_roots",
                        help=f"a directory under which staging and target paths may lie; "
                             f"repeatable (default {DEFAULT_PUBLISH_ROOT})")
    plugin.add_argument("--max-volumes", type=int, default=256,
                        help="volumes this node can attach (reported in NodeGetInfo)")
    plugin.add_argument("--nodes", default="", metavar="kubernetes|NODE,...",
                        help="the node ids ControllerPublish accepts: 'kubernetes' to read CSINode "
                             "objects, or a list (with --role all, this node is always known)")
    plugin.add_argument("--local-reserve", type=parse_size, default=0,
                        help="space on the state directory's filesystem that local volumes "
                             "must leave free, e.g. 10Gi")
    remote = plugin.add_argument_group("remote-disk (controller)")
    remote.add_argument("--storage-servers", default="", metavar="FILE",
                        help='JSON {"servers": [{"name": "s1", "address": "host:port"}]}, re-read on change')
    remote.add_argument("--storage-server-selector", default="", metavar="LABELS",
                        help="find storage servers as ready pods with these labels (in a cluster)")
    remote.add_argument("--storage-server-namespace", default="polyvol",
                        help="namespace of the storage-server pods")
    remote.add_argument("--storage-server-port", type=int, default=9740,
                        help="control API port of discovered storage servers")
    remote.add_argument("--storage-tls-dir", default="", metavar="DIR",
                        help="ca.crt, client.crt, client.key for the storage control API (mutual TLS)")
    nbd = plugin.add_argument_group("remote-disk (node)")
    nbd.add_argument("--nbd-psk-file", default="", metavar="FILE",
                     help="TLS-PSK key file (identity:hexkey lines) for storage servers' NBD exports")
    nbd.add_argument("--nbd-psk-identity", default="polyvol",
                     help="which identity of the PSK file this node uses")
    nbd.add_argument("--nbd-attach", choices=("auto", "kernel", "userspace"), default="auto",
                     help="kernel NBD when the node has it (auto), or force one path")
    nbd.add_argument("--nbd-reconnect-delay", type=_reconnect_delay, default=RECONNECT_DELAY,
                     metavar="SECONDS",
                     help="how long I/O waits for an unreachable storage server before it fails "
                          f"(default {RECONNECT_DELAY}; applies to volumes attached from now on)")
    ceph = plugin.add_argument_group("replicated and erasure-coded (Ceph RBD)")
    ceph.add_argument("--ceph-config", default="", metavar="FILE",
                      help='JSON {"clusters": [{"clusterID": "c1", "monitors": ["10.0.0.1:6789"]}]} '
                           "(or ceph-csi's config.json list): the monitors of each StorageClass "
                           "clusterID; re-read on change. cephx keys come from the request secrets")
    ceph.add_argument("--rbd-attach", choices=("auto", "krbd", "userspace"), default="auto",
                      help="kernel RBD (krbd) when the node has it (auto), or force one path")
    plugin.add_argument("--metrics-address", default="", metavar="HOST:PORT",
                        help="serve Prometheus metrics at http://HOST:PORT/metrics (default: off)")
    plugin.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    plugin.set_defaults(run=_run_plugin)


def _driver_name(text: str) -> str:
    # CSI: a domain-name-like string of at most 63 characters, ending in a letter or digit.
    if not re.fullmatch(r"[a-z0-9]([-a-z0-9.]{0,61}[a-z0-9])?", text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a valid CSI driver name")
    return text


def _reconnect_delay(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 3600:
        raise argparse.ArgumentTypeError(f"must be a whole number of seconds from 1 to 3600, not {text!r}")
    return int(text)


def _type_list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _run_plugin(args) -> int:
    from . import plugin

    log.setup(args.log_level)
    plugin.serve(endpoint=args.endpoint, node_id=args.node_id, state_dir=args.state_dir,
                 role=args.role, default_type=args.default_type,
                 publish_roots=args.publish_roots or [DEFAULT_PUBLISH_ROOT],
                 max_volumes=args.max_volumes, local_reserve_bytes=args.local_reserve,
                 storage_servers=args.storage_servers,
                 storage_server_selector=args.storage_server_selector,
                 storage_server_namespace=args.storage_server_namespace,
                 storage_server_port=args.storage_server_port, storage_tls_dir=args.storage_tls_dir,
                 nbd_psk_file=args.nbd_psk_file, nbd_psk_identity=args.nbd_psk_identity,
                 nbd_attach=args.nbd_attach, nbd_reconnect_delay=args.nbd_reconnect_delay,
                 ceph_config=args.ceph_config,
                 rbd_attach=args.rbd_attach, driver_name=args.driver_name, types=args.types,
                 nodes=args.nodes, metrics_address=args.metrics_address)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from . import client
    from .storage.cli import add_parsers as add_storage_parsers

    parser = argparse.ArgumentParser(prog="polyvol", description=__doc__)
    parser.add_argument("--version", action="version", version=f"polyvol {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    _plugin_parser(commands)
    client.add_parsers(commands, os.environ.get("POLYVOL_ENDPOINT", DEFAULT_ENDPOINT))
    add_storage_parsers(commands)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except PolyvolError as error:
        print(f"polyvol: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
