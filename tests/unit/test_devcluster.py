"""The local control plane's pure parts: certificates, kubeconfig, binary lookup."""

from __future__ import annotations

import base64
import ipaddress
from pathlib import Path

import pytest
import yaml
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.hashes import SHA256

from aar_devcluster import pki
from aar_devcluster.controlplane import advertise_address, kubeconfig
from aar_devcluster.paths import BinariesMissingError, binary


def test_serving_certificate_is_issued_by_the_ca_for_the_given_names() -> None:
    ca = pki.make_ca()
    serving = pki.make_serving_cert(ca, "kube-apiserver", ["localhost"], ["127.0.0.1", "10.0.0.1"])

    ca_cert = x509.load_pem_x509_certificate(ca.public_pem)
    cert = x509.load_pem_x509_certificate(serving.public_pem)
    cert.verify_directly_issued_by(ca_cert)  # raises when the signature does not check out
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["localhost"]
    assert names.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("10.0.0.1"),
    ]
    assert ca_cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca


def test_a_serving_certificate_does_not_verify_against_another_ca() -> None:
    serving = pki.make_serving_cert(pki.make_ca(), "kube-apiserver", ["localhost"], [])
    other_ca = x509.load_pem_x509_certificate(pki.make_ca().public_pem)

    with pytest.raises(InvalidSignature):
        x509.load_pem_x509_certificate(serving.public_pem).verify_directly_issued_by(other_ca)


def test_service_account_key_pair_signs_and_verifies() -> None:
    pair = pki.make_service_account_key()
    private = serialization.load_pem_private_key(pair.private_pem, password=None)
    public = serialization.load_pem_public_key(pair.public_pem)
    assert isinstance(private, rsa.RSAPrivateKey)
    assert isinstance(public, rsa.RSAPublicKey)

    signature = private.sign(b"token", padding.PKCS1v15(), SHA256())

    public.verify(signature, b"token", padding.PKCS1v15(), SHA256())


def test_kubeconfig_names_server_ca_and_admin_token() -> None:
    ca = pki.make_ca()

    config = yaml.safe_load(
        yaml.safe_dump(kubeconfig("https://127.0.0.1:6443", ca.public_pem, "t0k"))
    )

    cluster = config["clusters"][0]["cluster"]
    assert cluster["server"] == "https://127.0.0.1:6443"
    assert base64.b64decode(cluster["certificate-authority-data"]) == ca.public_pem
    assert config["users"][0]["user"] == {"token": "t0k"}
    assert config["current-context"] == config["contexts"][0]["name"]


def test_advertise_address_is_not_loopback() -> None:
    assert not ipaddress.ip_address(advertise_address()).is_loopback


def test_missing_binary_error_says_how_to_install(tmp_path: Path) -> None:
    with pytest.raises(
        BinariesMissingError, match=r"kube-apiserver is not installed .*`make tools`"
    ):
        binary("kube-apiserver", tmp_path)
