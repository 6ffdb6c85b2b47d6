"""Certificates for the storage control API: mutual TLS between the controller and servers.

Why mutual TLS rather than a shared secret (a bearer token in call metadata): the control
API can delete any volume, so the caller must be authenticated, and the channel must be
encrypted anyway for a token not to leak. With mTLS one mechanism does both: the server
refuses the TLS handshake of any client whose certificate is not signed by the cluster's
polyvol CA, before a single request byte is read, and the client knows it talks to a real
polyvol storage server, not something that took over its address. Nothing secret travels
on the wire and nothing is compared in application code. A shared secret would need its own
constant-time check on every RPC, and still TLS underneath.

`polyvol storage certs --dir DIR` makes one bundle:
    ca.crt                   the polyvol CA (trusted by both sides)
    server.crt, server.key   for every storage server (SAN DNS name `polyvol-storage`)
    client.crt, client.key   for the controller
Servers are dialled by IP or host name and the client overrides the TLS target name to
`polyvol-storage`, so one server certificate serves every storage server and adding a
server needs no new certificate. The price: a client knows it talks to *a* polyvol
storage server, not which one (GetInfo's name says which, and the server refuses ids
that name another server). Sharing the key does not let a storage server drive the
others: its certificate carries only the serverAuth usage and gRPC refuses it as a client
certificate (tested), so only the holder of client.key can call the API.
The CA's private key is not written anywhere: nothing can mint more certificates later,
and rotating means making a new bundle and rolling it out. Keys are EC P-256; files
holding keys are mode 0600.
"""

import datetime
import os
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .. import state
from ..errors import AlreadyExists, FailedPrecondition

SERVER_NAME = "polyvol-storage"
CLIENT_NAME = "polyvol-controller"
CA, SERVER_CERT, SERVER_KEY, CLIENT_CERT, CLIENT_KEY = (
    "ca.crt", "server.crt", "server.key", "client.crt", "client.key")
BUNDLE = (CA, SERVER_CERT, SERVER_KEY, CLIENT_CERT, CLIENT_KEY)
VALID_DAYS = 3650


def create_bundle(directory: Path, force: bool = False) -> list[Path]:
    """Write a new CA, server and client certificate into `directory`; return the paths."""
    directory = Path(directory)
    existing = [name for name in BUNDLE if (directory / name).exists()]
    if existing and not force:
        raise AlreadyExists(f"{directory} already holds {', '.join(existing)}; replacing them "
                            f"cuts off every server and client using them (use --force to do it)")
    directory.mkdir(parents=True, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "polyvol CA")])
    ca_cert = _builder(ca_name, ca_name, ca_key.public_key()) \
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True) \
        .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                     key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, key_cert_sign=True, crl_sign=True,
                                     encipher_only=False, decipher_only=False), critical=True) \
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False) \
        .sign(ca_key, hashes.SHA256())
    written = [write_file_atomic(directory / CA, ca_cert.public_bytes(serialization.Encoding.PEM), 0o644)]
    for name, usage, cert_file, key_file in (
            (SERVER_NAME, ExtendedKeyUsageOID.SERVER_AUTH, SERVER_CERT, SERVER_KEY),
            (CLIENT_NAME, ExtendedKeyUsageOID.CLIENT_AUTH, CLIENT_CERT, CLIENT_KEY)):
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        cert = _builder(subject, ca_name, key.public_key()) \
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True) \
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False) \
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False) \
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                           critical=False) \
            .sign(ca_key, hashes.SHA256())
        written.append(write_file_atomic(directory / key_file, key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()), 0o600))
        written.append(write_file_atomic(directory / cert_file,
                                         cert.public_bytes(serialization.Encoding.PEM), 0o644))
    return written


def _builder(subject: x509.Name, issuer: x509.Name, public_key) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.timezone.utc)
    # Backdated a little so a server whose clock is slightly behind accepts a fresh bundle.
    return x509.CertificateBuilder().subject_name(subject).issuer_name(issuer) \
        .public_key(public_key).serial_number(x509.random_serial_number()) \
        .not_valid_before(now - datetime.timedelta(hours=1)) \
        .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))


def write_file_atomic(path: Path, data: bytes, mode: int) -> Path:
    """Write through a temporary file created with its final mode, so a key is never readable
    by others, not even for a moment, and a crash leaves the old file or the new one."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)  # left by a crash during an earlier write
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as out:
        out.write(data)
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, path)
    state.fsync_dir(path.parent)
    return path


def _read(directory: Path, name: str, role: str) -> bytes:
    try:
        return (Path(directory) / name).read_bytes()
    except FileNotFoundError:
        raise FailedPrecondition(f"{Path(directory) / name} is missing: the {role} needs "
                                 f"{name} from `polyvol storage certs`") from None


def server_credentials(directory: Path) -> grpc.ServerCredentials:
    """Credentials that make the server demand a client certificate signed by the CA."""
    return grpc.ssl_server_credentials(
        [(_read(directory, SERVER_KEY, "storage server"), _read(directory, SERVER_CERT, "storage server"))],
        root_certificates=_read(directory, CA, "storage server"), require_client_auth=True)


def channel_credentials(directory: Path) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        root_certificates=_read(directory, CA, "client"),
        private_key=_read(directory, CLIENT_KEY, "client"),
        certificate_chain=_read(directory, CLIENT_CERT, "client"))


# Servers are dialled by address; the certificate names them all `polyvol-storage`.
CHANNEL_OPTIONS = (("grpc.ssl_target_name_override", SERVER_NAME),)
