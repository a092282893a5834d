"""A tiny throw-away certificate authority for the lab: a CA, server and client certificates.

Made fresh for every lab or test run (never checked in). Keys are EC P-256: fast to make and
accepted by OpenSSL, aiohttp, requests and 389-DS alike.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

# Lab certificates only need to outlive a test run or a demo; backdate a little for clock skew.
VALIDITY = dt.timedelta(days=30)
BACKDATE = dt.timedelta(minutes=5)

PrivateKey = ec.EllipticCurvePrivateKey


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def new_key() -> PrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _name(common_name: str, org: str = "ca-watchdog lab") -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, org),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def key_pem(key: PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _write(path: Path, data: bytes, private: bool) -> None:
    # private keys 0600 from the start (no window where they are world-readable)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


@dataclass(frozen=True)
class Issued:
    """A certificate and its key, in memory."""

    cert: x509.Certificate
    key: PrivateKey

    def write(self, directory: str | os.PathLike[str], stem: str) -> tuple[Path, Path]:
        """Write `<stem>.pem` (certificate) and `<stem>.key` (PKCS#8, mode 0600); return both paths."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        cert_path, key_path = d / f"{stem}.pem", d / f"{stem}.key"
        _write(cert_path, cert_pem(self.cert), private=False)
        _write(key_path, key_pem(self.key), private=True)
        return cert_path, key_path


@dataclass(frozen=True)
class LabCA(Issued):
    """A self-signed CA that issues lab certificates and can sign CRLs."""

    @classmethod
    def create(cls, common_name: str = "ca-watchdog lab CA") -> LabCA:
        key = new_key()
        name = _name(common_name)
        now = _now()
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE)
            .not_valid_after(now + VALIDITY)
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
        return cls(cert, key)

    @classmethod
    def load(cls, cert_file: str | os.PathLike[str], key_file: str | os.PathLike[str]) -> LabCA:
        cert = x509.load_pem_x509_certificate(Path(cert_file).read_bytes())
        key = serialization.load_pem_private_key(Path(key_file).read_bytes(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ValueError(f"{key_file}: expected an EC private key (lab keys are P-256)")
        return cls(cert, key)

    def _leaf(self, common_name: str, sans: list[x509.GeneralName], usage: x509.ObjectIdentifier) -> Issued:
        key = new_key()
        now = _now()
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(common_name))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE)
            .not_valid_after(now + VALIDITY)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=True,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), critical=False)
        )
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        return Issued(builder.sign(self.key, hashes.SHA256()), key)

    def issue_server(
        self,
        common_name: str = "localhost",
        dns_names: Sequence[str] = ("localhost",),
        ip_addresses: Sequence[str] = ("127.0.0.1",),
    ) -> Issued:
        """A TLS server certificate; SANs default to localhost and the IP 127.0.0.1."""
        sans: list[x509.GeneralName] = [x509.DNSName(n) for n in dns_names]
        sans += [x509.IPAddress(ipaddress.ip_address(a)) for a in ip_addresses]
        return self._leaf(common_name, sans, ExtendedKeyUsageOID.SERVER_AUTH)

    def issue_client(self, common_name: str = "lab agent") -> Issued:
        """A TLS client (agent) certificate."""
        return self._leaf(common_name, [], ExtendedKeyUsageOID.CLIENT_AUTH)


@dataclass(frozen=True)
class LabPKIFiles:
    """Paths of a lab PKI written to one directory."""

    directory: Path
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path

    @classmethod
    def at(cls, directory: str | os.PathLike[str]) -> LabPKIFiles:
        """The files `write_lab_pki` writes to `directory` (a later command finds a lab's PKI so)."""
        d = Path(directory)
        return cls(d, d / "ca.pem", d / "ca.key", d / "server.pem", d / "server.key", d / "agent.pem", d / "agent.key")


def write_lab_pki(
    directory: str | os.PathLike[str],
    common_name: str = "ca-watchdog lab CA",
    server_ips: Sequence[str] = ("127.0.0.1",),
) -> LabPKIFiles:
    """Make a CA, a server cert for localhost and `server_ips` (default 127.0.0.1) and an agent client
    cert; write PEM files.

    Files: ca.pem ca.key server.pem server.key agent.pem agent.key.
    """
    d = Path(directory)
    ca = LabCA.create(common_name)
    ca.write(d, "ca")
    ca.issue_server(ip_addresses=server_ips).write(d, "server")
    ca.issue_client().write(d, "agent")
    return LabPKIFiles.at(d)
