"""Keys and certificates for the local cluster: a CA, the apiserver's serving certificate, client
certificates for the node's kubelet and kube-proxy, and the service-account signing key. Pure
functions over `cryptography`; nothing touches disk."""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

VALIDITY = datetime.timedelta(days=3650)


@dataclass(frozen=True)
class KeyPair:
    """A PEM certificate (or public key) and its PEM private key."""

    public_pem: bytes
    private_pem: bytes


def _private_pem(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def make_ca(common_name: str = "aar-local-ca") -> KeyPair:
    """A self-signed certificate authority."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    return KeyPair(cert.public_bytes(serialization.Encoding.PEM), _private_pem(key))


def _signed_by_ca(
    ca: KeyPair,
    subject: x509.Name,
    usage: x509.ObjectIdentifier,
    sans: list[x509.GeneralName] | None = None,
) -> KeyPair:
    """A leaf certificate with a new EC key, signed by `ca`, for one extended key usage."""
    ca_cert = x509.load_pem_x509_certificate(ca.public_pem)
    ca_key = serialization.load_pem_private_key(ca.private_pem, password=None)
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise TypeError("the CA key must be an elliptic-curve key made by make_ca()")
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + VALIDITY)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    return KeyPair(cert.public_bytes(serialization.Encoding.PEM), _private_pem(key))


def make_serving_cert(
    ca: KeyPair, common_name: str, dns_names: list[str], ip_addresses: list[str]
) -> KeyPair:
    """A TLS server certificate signed by `ca`, valid for the given names and addresses."""
    sans: list[x509.GeneralName] = [x509.DNSName(n) for n in dns_names]
    sans += [x509.IPAddress(ipaddress.ip_address(a)) for a in ip_addresses]
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    return _signed_by_ca(ca, subject, ExtendedKeyUsageOID.SERVER_AUTH, sans)


def make_client_cert(ca: KeyPair, user: str, groups: list[str] | None = None) -> KeyPair:
    """A TLS client certificate signed by `ca`: the apiserver reads the common name as the user
    and each organization as a group (`system:node:NAME` in `system:nodes` for a kubelet)."""
    attributes = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, g) for g in groups or []]
    attributes.append(x509.NameAttribute(NameOID.COMMON_NAME, user))
    return _signed_by_ca(ca, x509.Name(attributes), ExtendedKeyUsageOID.CLIENT_AUTH)


def make_service_account_key() -> KeyPair:
    """The RSA key pair that signs and verifies service-account tokens."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return KeyPair(public, _private_pem(key))
