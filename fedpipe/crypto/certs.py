"""A private CA and server certificates for the coordinator's TLS.

Devices pin the CA certificate (not the system trust store), so a coordinator needs no
public CA and a relay or a look-alike server without the CA's key is refused.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes, PublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedpipe.crypto.files import read_private_pem, write_private_bytes

__all__ = ["CertPaths", "check_server_files", "create_ca", "create_server_cert", "write_private"]

CA_DAYS, SERVER_DAYS = 3650, 825


@dataclass(frozen=True)
class CertPaths:
    """The files `fedpipe certs` writes into one folder."""

    folder: Path

    @property
    def ca_cert(self) -> Path:
        return self.folder / "ca.crt"

    @property
    def ca_key(self) -> Path:
        return self.folder / "ca.key"

    @property
    def server_cert(self) -> Path:
        return self.folder / "server.crt"

    @property
    def server_key(self) -> Path:
        return self.folder / "server.key"


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def write_private(path: Path, key: ec.EllipticCurvePrivateKey, force: bool = False) -> None:
    write_private_bytes(path, _pem_key(key), force)


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedpipe"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _san(hosts: list[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def create_ca(name: str = "fedpipe CA") -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(name))
        .issuer_name(_name(name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def create_server_cert(
    ca_cert: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey, hosts: list[str]
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A server certificate valid for every host name / IP address in `hosts`."""
    if not hosts:
        raise ValueError("a server certificate needs at least one host name or IP address")
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(hosts[0]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=SERVER_DAYS))
        .add_extension(_san(hosts), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    return cert, key


def write_certs(folder: Path, hosts: list[str], force: bool = False) -> CertPaths:
    """CA + server certificate for `hosts` into `folder`; keys 0600; refuses to overwrite."""
    paths = CertPaths(folder)
    existing = [p for p in (paths.ca_cert, paths.ca_key, paths.server_cert, paths.server_key)]
    if not force and any(p.exists() for p in existing):
        raise FileExistsError(f"{folder} already holds certificates; pass --force to replace them")
    ca_cert, ca_key = create_ca()
    cert, key = create_server_cert(ca_cert, ca_key, hosts)
    write_private(paths.ca_key, ca_key, force)
    write_private(paths.server_key, key, force)
    paths.ca_cert.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    # Chain: server first, then the CA, as TLS servers should present it.
    paths.server_cert.write_bytes(
        cert.public_bytes(serialization.Encoding.PEM)
        + ca_cert.public_bytes(serialization.Encoding.PEM)
    )
    return paths


def check_server_files(folder: Path) -> CertPaths:
    """The files a TLS coordinator serves from `folder`, checked before anything starts:
    present, PEM, private keys readable by their owner only (ca.key too, when it is there),
    and server.key the key of server.crt. Raises OSError or ValueError naming the file."""
    paths = CertPaths(folder)
    missing = [
        p.name for p in (paths.ca_cert, paths.server_cert, paths.server_key) if not p.is_file()
    ]
    if missing:
        raise FileNotFoundError(
            f"{folder} holds no {', '.join(missing)}; create them with "
            f"`fedpipe certs --out {folder} --hosts HOST ...`"
        )
    if paths.ca_key.exists():
        read_private_pem(paths.ca_key)  # refuses a CA key other users can read
    key = _load_key(paths.server_key)
    chain = _load_certs(paths.server_cert)
    _load_certs(paths.ca_cert)
    if _spki(chain[0].public_key()) != _spki(key.public_key()):
        raise ValueError(
            f"{paths.server_key} is not the key of {paths.server_cert}; "
            "re-create both with `fedpipe certs --force`"
        )
    return paths


def _load_certs(path: Path) -> list[x509.Certificate]:
    try:
        return x509.load_pem_x509_certificates(path.read_bytes())
    except ValueError as exc:
        raise ValueError(
            f"{path} is not a PEM certificate; re-create it with `fedpipe certs`"
        ) from exc


def _load_key(path: Path) -> PrivateKeyTypes:
    try:
        return serialization.load_pem_private_key(read_private_pem(path), password=None)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{path} is not an unencrypted PEM private key ({exc})") from exc


def _spki(key: PublicKeyTypes) -> bytes:
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
