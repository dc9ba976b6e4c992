"""The local metro's own certificate authority.

Created once in the state directory; the TLS edge presents a leaf certificate it issued for
`*.{app_domain}` and `{app_domain}`. Clients trust `cert_path` and nothing else
(`openssl s_client -CAfile`, `curl --cacert`), so the edge can be verified strictly although
it is offline.

Files in the directory: `ca.pem` (public), `ca.key` (0600), `edge.pem` (leaf + CA chain) and
`edge.key` (0600). The leaf is re-issued when the app domain changes or it nears expiry.
"""

from __future__ import annotations

import datetime
import os
import ssl
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from reconciler._util.atomic import write_atomic
from reconciler.errors import LocalMetroError

__all__ = ["CertificateAuthority"]

_CA_DAYS = 3650
_LEAF_DAYS = 397
# why: re-issue the leaf well before it expires, so a long-lived daemon never serves a stale one
_RENEW_BEFORE = datetime.timedelta(days=30)


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _not_after(cert: x509.Certificate) -> datetime.datetime:
    # why: Debian's python3-cryptography (38) predates `not_valid_after_utc`
    aware = getattr(cert, "not_valid_after_utc", None)
    if isinstance(aware, datetime.datetime):
        return aware
    return cert.not_valid_after.replace(tzinfo=datetime.UTC)


def _write_private(path: Path, data: bytes) -> None:
    """Write a secret atomically with mode 0600 from the first byte on."""
    write_atomic(path, data, mode=0o600)


def _write_public(path: Path, data: bytes) -> None:
    write_atomic(path, data, mode=0o644)
    # why: readable by every client of the metro, whatever the daemon's umask
    os.chmod(path, 0o644)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


class CertificateAuthority:
    """A self-signed EC P-256 CA plus the edge's leaf certificate, kept in one directory."""

    def __init__(
        self,
        directory: Path,
        app_domain: str,
        ca_cert: x509.Certificate,
        ca_key: ec.EllipticCurvePrivateKey,
    ) -> None:
        self.directory = directory
        self.app_domain = app_domain
        self.cert_path = directory / "ca.pem"
        self.key_path = directory / "ca.key"
        self.leaf_cert_path = directory / "edge.pem"
        self.leaf_key_path = directory / "edge.key"
        self._ca_cert = ca_cert
        self._ca_key = ca_key

    @classmethod
    def load_or_create(cls, directory: Path, app_domain: str) -> CertificateAuthority:
        """Load the CA from `directory` (creating it on first use) and make sure the leaf fits."""
        directory.mkdir(parents=True, exist_ok=True)
        cert_path = directory / "ca.pem"
        key_path = directory / "ca.key"
        try:
            if cert_path.exists() and key_path.exists():
                ca_cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
                loaded = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
                if not isinstance(loaded, ec.EllipticCurvePrivateKey):
                    raise LocalMetroError(f"ca key {key_path} is not an ec key")
                ca_key = loaded
            else:
                ca_key = ec.generate_private_key(ec.SECP256R1())
                ca_cert = cls._issue_ca(ca_key)
                _write_private(key_path, _key_pem(ca_key))
                _write_public(cert_path, ca_cert.public_bytes(serialization.Encoding.PEM))
        except (OSError, ValueError) as exc:
            raise LocalMetroError(f"ca in {directory} unusable: {type(exc).__name__}") from None
        ca = cls(directory, app_domain, ca_cert, ca_key)
        ca._ensure_leaf()
        return ca

    @staticmethod
    def _issue_ca(key: ec.EllipticCurvePrivateKey) -> x509.Certificate:
        name = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "ukc local metro"),
                x509.NameAttribute(NameOID.COMMON_NAME, "ukc local metro CA"),
            ]
        )
        now = _now()
        ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        return (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=_CA_DAYS))
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
            .add_extension(ski, critical=False)
            .sign(key, hashes.SHA256())
        )

    def _leaf_names(self) -> list[str]:
        return [f"*.{self.app_domain}", self.app_domain]

    def _leaf_is_current(self) -> bool:
        if not (self.leaf_cert_path.exists() and self.leaf_key_path.exists()):
            return False
        try:
            leaf = x509.load_pem_x509_certificate(self.leaf_cert_path.read_bytes())
            san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except (ValueError, x509.ExtensionNotFound):
            return False
        return (
            leaf.issuer == self._ca_cert.subject
            and sorted(san.get_values_for_type(x509.DNSName)) == sorted(self._leaf_names())
            and _not_after(leaf) - _RENEW_BEFORE > _now()
        )

    def _ensure_leaf(self) -> None:
        if self._leaf_is_current():
            return
        key = ec.generate_private_key(ec.SECP256R1())
        now = _now()
        ca_ski = self._ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        leaf = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, self.app_domain)]))
            .issuer_name(self._ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=_LEAF_DAYS))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(
                x509.SubjectAlternativeName([x509.DNSName(n) for n in self._leaf_names()]),
                critical=False,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
                critical=False,
            )
            .sign(self._ca_key, hashes.SHA256())
        )
        _write_private(self.leaf_key_path, _key_pem(key))
        chain = leaf.public_bytes(serialization.Encoding.PEM) + self._ca_cert.public_bytes(
            serialization.Encoding.PEM
        )
        _write_public(self.leaf_cert_path, chain)

    def server_context(self) -> ssl.SSLContext:
        """A fresh TLS 1.2+ server context presenting the leaf (free to set `sni_callback` on)."""
        self._ensure_leaf()
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(self.leaf_cert_path, self.leaf_key_path)
        return ctx
