"""`polyvol storage-server` and `polyvol storage certs|psk|show`."""

import argparse
import json
import sys

from ..units import parse_size
from . import DEFAULT_RECONNECT_GRACE


def _label(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"--label takes KEY=VALUE, not {text!r}")
    return key, value


def add_parsers(commands) -> None:
    server = commands.add_parser(
        "storage-server", help="serve remote-disk volumes: the control API (mTLS) and NBD (nbdkit)")
    server.add_argument("--name", required=True,
                        help="this server's name, a DNS label; it ends every volume id it holds")
    server.add_argument("--data-dir", required=True, help="where volume files and records live")
    server.add_argument("--listen", required=True, metavar="HOST:PORT", help="control API address")
    server.add_argument("--nbd-listen", required=True, metavar="HOST:PORT", help="nbdkit's address")
    server.add_argument("--nbd-advertise", default="", metavar="HOST:PORT",
                        help="the NBD address nodes dial (default: --nbd-listen; required when "
                             "that is 0.0.0.0 or [::])")
    server.add_argument("--tls-dir", required=True,
                        help="ca.crt, server.crt, server.key from `polyvol storage certs`")
    server.add_argument("--nbd-psk-file", default="",
                        help="nbdkit TLS-PSK keys (identity:hexkey lines), from `polyvol storage psk`")
    server.add_argument("--insecure-nbd", action="store_true",
                        help="serve NBD without TLS: only on a dedicated, trusted storage network")
    server.add_argument("--label", type=_label, action="append", default=[], metavar="KEY=VALUE",
                        help="a topology label such as rack=r1 or zone=a (for spread groups); repeatable")
    server.add_argument("--reserve", type=parse_size, default=0,
                        help="space on the data directory's filesystem to leave free, e.g. 10Gi")
    server.add_argument("--reconnect-grace", type=float, default=DEFAULT_RECONNECT_GRACE,
                        metavar="SECONDS",
                        help=f"after nbdkit (re)starts, refuse deletes and plain copies this long, "
                             f"while attached nodes reconnect (default {DEFAULT_RECONNECT_GRACE:g})")
    server.add_argument("--metrics-address", default="", metavar="HOST:PORT",
                        help="serve Prometheus metrics at http://HOST:PORT/metrics (default: off)")
    server.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    server.set_defaults(run=_run_server)

    storage = commands.add_parser("storage", help="certificates and NBD keys for storage servers; "
                                                  "look at one")
    verbs = storage.add_subparsers(dest="verb", required=True)
    certs = verbs.add_parser("certs", help="make a CA, the servers' and the controller's certificates")
    certs.add_argument("--dir", required=True)
    certs.add_argument("--force", action="store_true", help="replace an existing bundle")
    certs.set_defaults(run=_run_certs)

    psk = verbs.add_parser("psk", help="add (or re-key) an NBD TLS-PSK identity in a key file")
    psk.add_argument("--identity", required=True, help="e.g. the node name: one identity per node")
    psk.add_argument("--out", required=True, help="the key file; created with mode 0600")
    psk.set_defaults(run=_run_psk)

    show = verbs.add_parser("show", help="a storage server's info, capacity, volumes and snapshots")
    show.add_argument("--address", required=True, metavar="HOST:PORT")
    show.add_argument("--tls-dir", required=True, help="ca.crt, client.crt, client.key")
    show.set_defaults(run=_run_show)


def _run_server(args) -> int:
    from .. import log
    from . import server

    log.setup(args.log_level)
    server.serve(name=args.name, data_dir=args.data_dir, listen=args.listen,
                 nbd_listen=args.nbd_listen, nbd_advertise=args.nbd_advertise,
                 tls_dir=args.tls_dir, psk_file=args.nbd_psk_file, labels=dict(args.label),
                 reserve_bytes=args.reserve, insecure_nbd=args.insecure_nbd,
                 reconnect_grace=args.reconnect_grace, metrics_address=args.metrics_address)
    return 0


def _run_certs(args) -> int:
    from . import tls

    for path in tls.create_bundle(args.dir, force=args.force):
        print(path)
    return 0


def _run_psk(args) -> int:
    from .nbdkit import add_psk_identity

    add_psk_identity(args.out, args.identity)
    print(f"{args.out}: key for identity {args.identity}")
    return 0


def _run_show(args) -> int:
    from google.protobuf.json_format import MessageToDict

    from .client import StorageClient

    with StorageClient(args.address, args.tls_dir) as client:
        report = {"info": MessageToDict(client.get_info()),
                  "capacity": MessageToDict(client.get_capacity()),
                  "volumes": [MessageToDict(v) for v in client.list_volumes()],
                  "snapshots": [MessageToDict(s) for s in client.list_snapshots()]}
    json.dump(report, sys.stdout, indent=1)
    print()
    return 0
