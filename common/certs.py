"""Certificates and keys for a deployed federation, made with ``cryptography``.

Two kinds of secrets protect a deployment:

- TLS: a private certificate authority signs the SuperLink's certificate for the host names
  and addresses sites dial. Sites and the ``flwr`` CLI trust only that CA (``ca.crt``), so
  every gRPC link is encrypted and a site talks only to the real aggregator.
- SuperNode authentication: each site owns an EC P-384 key pair. The aggregator enrols the
  public key (``flwr supernode register``); the SuperNode signs its requests with the private
  key, so only enrolled sites join. Flower reads both in OpenSSH format.

Private keys are written with mode 0600 and belong in git-ignored folders (``secrets/``).
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from common.errors import ConfigError

VALIDITY = timedelta(days=365)


@dataclass(frozen=True)
class TlsFiles:
    """The PEM files of a deployment's TLS: the CA every side trusts and the SuperLink's pair."""

    ca_certificate: Path
    server_certificate: Path
    server_key: Path

    @classmethod
    def in_folder(cls, folder: Path) -> "TlsFiles":
        return cls(folder / "ca.crt", folder / "server.pem", folder / "server.key")

    def require(self) -> "TlsFiles":
        missing = [str(path) for path in (self.ca_certificate, self.server_certificate, self.server_key)
                   if not path.is_file()]
        if missing:
            raise ConfigError(f"TLS files missing: {', '.join(missing)}; make them with `mammofl certs create`")
        return self


@dataclass(frozen=True)
class NodeKeys:
    """A site's SuperNode authentication key pair (OpenSSH format, as Flower reads it)."""

    private_key: Path
    public_key: Path

    @classmethod
    def in_folder(cls, folder: Path, site_id: str) -> "NodeKeys":
        return cls(folder / f"{site_id}.key", folder / f"{site_id}.pub")


def create_tls_files(folder: Path, hosts: list[str], *, overwrite: bool = False) -> TlsFiles:
    """A new CA and a SuperLink certificate valid for `hosts` (names or IP addresses)."""
    if not hosts:
        raise ConfigError("certs create: give at least one --host the SuperLink is reached at")
    files = TlsFiles.in_folder(folder)
    _refuse_overwrite([files.ca_certificate, files.server_certificate, files.server_key], overwrite)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mammofl federation CA")])
    ca_certificate = (
        _certificate_builder(ca_name, ca_name, ca_key.public_key())
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        .sign(ca_key, hashes.SHA384())
    )
    server_key = ec.generate_private_key(ec.SECP384R1())
    server_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])])
    server_certificate = (
        _certificate_builder(server_name, ca_name, server_key.public_key())
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName([_general_name(host) for host in hosts]), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    folder.mkdir(parents=True, exist_ok=True)
    files.ca_certificate.write_bytes(ca_certificate.public_bytes(serialization.Encoding.PEM))
    files.server_certificate.write_bytes(server_certificate.public_bytes(serialization.Encoding.PEM))
    _write_private(files.server_key, server_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    # The CA key signs nothing after this; it is kept (0600) only to issue a new server certificate.
    _write_private(folder / "ca.key", ca_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return files


def create_node_keys(folder: Path, site_id: str, *, overwrite: bool = False) -> NodeKeys:
    """A new SuperNode authentication key pair for `site_id`: EC P-384, OpenSSH encoding."""
    keys = NodeKeys.in_folder(folder, site_id)
    _refuse_overwrite([keys.private_key, keys.public_key], overwrite)
    private_key = ec.generate_private_key(ec.SECP384R1())
    folder.mkdir(parents=True, exist_ok=True)
    _write_private(keys.private_key, private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()))
    keys.public_key.write_bytes(private_key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH) + f" {site_id}\n".encode())
    return keys


def _certificate_builder(subject: x509.Name, issuer: x509.Name, public_key) -> x509.CertificateBuilder:
    now = datetime.now(timezone.utc)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + VALIDITY)
    )


def _general_name(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _refuse_overwrite(paths: list[Path], overwrite: bool) -> None:
    existing = [str(path) for path in paths if path.exists()]
    if existing and not overwrite:
        raise ConfigError(f"{', '.join(existing)} already exist; pass --overwrite to replace them")


def _write_private(path: Path, data: bytes) -> None:
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "wb") as stream:
        stream.write(data)
