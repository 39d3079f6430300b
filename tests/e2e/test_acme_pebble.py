"""A real ACME CA (Debian's ``pebble``) issues a certificate for two MX host names.

Standard http-01 as pebble does it (resolving the names through ``-dnsserver`` = the in-process
DNS server), served by our responder on 127.0.0.2/3; before answering each challenge, our own
validator checks the same token as ``client-mx-http-01`` for the domain whose Client MX lists
both hosts — the same files satisfy both, which is the point of the draft.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from acme import challenges, client, crypto_util, messages
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from fixtures_acme import MxHosts
from josepy.jwa import ES256
from josepy.jwk import JWKEC
from support.ports import free_port

from mtls_milter.acme.results import Status

pytestmark = pytest.mark.e2e

PEBBLE = shutil.which("pebble") or "/usr/bin/pebble"
HOSTS = {"mx1.pebble.test": "127.0.0.2", "mx2.pebble.test": "127.0.0.3"}


def _self_signed(directory: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pebble test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "wfe.crt", directory / "wfe.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


@pytest.fixture
def pebble(tmp_path: Path, mx_hosts: MxHosts) -> Iterator[tuple[str, Path]]:
    if not os.path.exists(PEBBLE):
        pytest.skip("pebble is not installed (apt-get install pebble)")
    cert, key = _self_signed(tmp_path)
    port = free_port()
    config = {
        "pebble": {
            "listenAddress": f"127.0.0.1:{port}",
            "managementListenAddress": f"127.0.0.1:{free_port()}",
            "certificate": str(cert),
            "privateKey": str(key),
            "httpPort": mx_hosts.port,
            "tlsPort": free_port(),
            "ocspResponderURL": "",
            "externalAccountBindingRequired": False,
        }
    }
    path = tmp_path / "pebble.json"
    path.write_text(json.dumps(config))
    env = {**os.environ, "PEBBLE_VA_NOSLEEP": "1", "PEBBLE_WFE_NONCEREJECT": "0"}
    log = (tmp_path / "pebble.log").open("w")
    proc = subprocess.Popen(
        [PEBBLE, "-config", str(path), "-dnsserver", mx_hosts.dns.nameserver],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError((tmp_path / "pebble.log").read_text()) from None
                time.sleep(0.05)
        yield f"https://127.0.0.1:{port}/dir", cert
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()


def test_pebble_issues_through_our_responder(
    pebble: tuple[str, Path], mx_hosts: MxHosts, tmp_path: Path
) -> None:
    directory_url, wfe_cert = pebble
    dns = mx_hosts.dns
    dns.add("pebble.test", 265, *(f"{10 * i} {h}." for i, h in enumerate(HOSTS, 1)))
    for host, address in HOSTS.items():
        dns.add(host, "A", address)
    dirs = [mx_hosts.responder(address, {}) for address in HOSTS.values()]

    account_key = JWKEC(key=ec.generate_private_key(ec.SECP256R1()))
    net = client.ClientNetwork(account_key, alg=ES256, user_agent="mtls-milter-test")
    net.verify_ssl = str(wfe_cert)  # type: ignore[assignment]  # requests takes a CA path
    net.session.trust_env = False  # no proxy variables
    acme = client.ClientV2(client.ClientV2.get_directory(directory_url, net), net)
    acme.new_account(messages.NewRegistration.from_data(terms_of_service_agreed=True))

    cert_key = ec.generate_private_key(ec.SECP256R1())
    key_pem = cert_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    order = acme.new_order(crypto_util.make_csr(key_pem, list(HOSTS)))
    for authz in order.authorizations:
        challb = next(c for c in authz.body.challenges if isinstance(c.chall, challenges.HTTP01))
        response, validation = challb.chall.response_and_validation(account_key)
        token = challb.chall.encode("token")
        for directory in dirs:
            (directory / token).write_text(validation)
        thumbprint = validation.split(".")[1]
        ours = mx_hosts.validate("client-mx-http-01", "pebble.test", token, thumbprint)
        assert ours.status is Status.VALID, ours.reason
        acme.answer_challenge(challb, response)
    deadline = datetime.datetime.now() + datetime.timedelta(seconds=60)
    final = acme.poll_and_finalize(order, deadline)
    leaf = x509.load_pem_x509_certificates(final.fullchain_pem.encode())[0]
    names = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sorted(names.get_values_for_type(x509.DNSName)) == sorted(HOSTS)
