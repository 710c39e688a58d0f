"""Optional mutual TLS between services (`TESSERA_GRPC__TLS__*`): a real ServiceHost with TLS
on, certificates made here by a throw-away CA (the `cryptography` package).

A client with a certificate the CA signed gets through; one without a certificate, with a
certificate of another CA, speaking plaintext, or not trusting the server's CA is refused in
the handshake (UNAVAILABLE). The bearer token still applies on top of TLS.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.access.core import AccessControl
from services.access.servicer import AccessServicer
from services.shared.adapters.memory import InMemoryBus, InMemoryDocumentStore
from services.shared.auth import TokenIssuer, TokenVerifier, generate_keypair
from services.shared.events import EventEmitter
from services.shared.grpc.client import open_channel, use_tls_by_default
from services.shared.grpc.server import ServiceHost
from services.shared.outbox import Outbox
from services.shared.settings import ConfigError, ServiceSettings, TlsSettings, load_settings
from tessera.access.v1 import access_pb2, access_pb2_grpc


@dataclass(frozen=True)
class Pki:
    ca: Path
    cert: Path
    key: Path


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


class Ca:
    def __init__(self, name: str) -> None:
        self.key = _key()
        now = dt.datetime.now(dt.UTC)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(_name(name))
            .issuer_name(_name(name))
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
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
            .sign(self.key, hashes.SHA256())
        )

    def issue(self, out: Path, cn: str, *, server: bool) -> Pki:
        key = _key()
        now = dt.datetime.now(dt.UTC)
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(cn))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(
                x509.SubjectAlternativeName(
                    [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
                ),
                critical=False,
            )
        )
        cert = builder.sign(self.key, hashes.SHA256())
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{cn}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        (out / f"{cn}.key").write_bytes(_pem_key(key))
        ca = out / "ca.pem"
        ca.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))
        return Pki(ca, out / f"{cn}.pem", out / f"{cn}.key")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


PRIVATE, PUBLIC = generate_keypair()


@dataclass
class Served:
    target: str
    server: Pki
    client: Pki
    rogue_client: Pki
    rogue_ca: Path


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[Served]:
    ca, rogue = Ca("tessera-test-ca"), Ca("rogue-ca")
    server = ca.issue(tmp_path / "ca", "access", server=True)
    client = ca.issue(tmp_path / "ca", "ingestion", server=False)
    rogue_client = rogue.issue(tmp_path / "rogue", "intruder", server=False)
    (tmp_path / "issuer.pub.pem").write_bytes(PUBLIC)
    port = _free_port()
    settings = ServiceSettings(
        grpc={
            "port": port,
            "tls": {
                "enabled": True,
                "cert_file": server.cert,
                "key_file": server.key,
                "ca_file": server.ca,
            },
        },
        metrics={"port": 0},
        auth={"public_key_file": tmp_path / "issuer.pub.pem"},
    )
    docs = InMemoryDocumentStore()
    bus = InMemoryBus()
    publisher = bus.publisher()
    await publisher.start()
    core = AccessControl(
        datasets=docs.collection("datasets"),
        grants=docs.collection("grants"),
        audit=docs.collection("audit"),
        outbox=Outbox(docs.collection("outbox"), EventEmitter("access", publisher)),
    )
    host = ServiceHost(
        "access",
        settings,
        TokenVerifier(PUBLIC, "tessera", "tessera"),
        service_names=["tessera.access.v1.AccessService"],
        register=[
            lambda s: access_pb2_grpc.add_AccessServiceServicer_to_server(AccessServicer(core), s)
        ],
    )
    task = asyncio.create_task(host.run())
    # serving, as a client with a good certificate sees it (the refusal tests below would
    # otherwise also pass against a server not yet listening)
    target = f"127.0.0.1:{port}"
    deadline = asyncio.get_running_loop().time() + 30
    serving = False
    while not serving and not task.done() and asyncio.get_running_loop().time() < deadline:
        if host.bound_port:
            ok = await _health(open_channel(target, tls=_tls(client)))
            serving = ok == grpc.StatusCode.OK
        if not serving:
            await asyncio.sleep(0.05)
    assert serving, "the service did not start serving over mutual TLS"
    assert host.bound_port == port
    try:
        yield Served(target, server, client, rogue_client, rogue_client.ca)
    finally:
        host.request_stop()
        await asyncio.wait_for(task, 30)
        use_tls_by_default(None)


async def _health(channel: aio.Channel) -> grpc.StatusCode:
    async with channel:
        try:
            r = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=5, wait_for_ready=False
            )
        except aio.AioRpcError as exc:
            return exc.code()
        assert r.status == health_pb2.HealthCheckResponse.SERVING
        return grpc.StatusCode.OK


def _tls(pki: Pki, ca: Path | None = None) -> TlsSettings:
    return TlsSettings(enabled=True, cert_file=pki.cert, key_file=pki.key, ca_file=ca or pki.ca)


async def test_client_with_a_ca_signed_certificate_gets_through(served: Served) -> None:
    assert await _health(open_channel(served.target, tls=_tls(served.client))) == grpc.StatusCode.OK


async def test_client_without_a_certificate_is_refused(served: Served) -> None:
    creds = grpc.ssl_channel_credentials(root_certificates=served.server.ca.read_bytes())
    code = await _health(aio.secure_channel(served.target, creds))
    assert code == grpc.StatusCode.UNAVAILABLE


async def test_client_with_a_certificate_of_another_ca_is_refused(served: Served) -> None:
    # trusts the right server CA, but presents a certificate the server's CA never signed
    tls = _tls(served.rogue_client, ca=served.server.ca)
    code = await _health(open_channel(served.target, tls=tls))
    assert code == grpc.StatusCode.UNAVAILABLE


async def test_plaintext_client_is_refused(served: Served) -> None:
    code = await _health(aio.insecure_channel(served.target))
    assert code == grpc.StatusCode.UNAVAILABLE


async def test_client_that_does_not_trust_the_server_ca_refuses_it(served: Served) -> None:
    tls = _tls(served.client, ca=served.rogue_ca)
    code = await _health(open_channel(served.target, tls=tls))
    assert code == grpc.StatusCode.UNAVAILABLE


async def test_process_default_tls_carries_the_bearer_token(served: Served) -> None:
    """Service-to-service channels opened without an explicit `tls` use the process default
    (set by the composition root from `grpc.tls`); the token still decides what is allowed."""
    use_tls_by_default(_tls(served.client))
    token = TokenIssuer(PRIVATE).issue("svc:ingestion", ["service"])
    async with open_channel(served.target, lambda: token) as ch:
        stub = access_pb2_grpc.AccessServiceStub(ch)
        with pytest.raises(aio.AioRpcError) as err:
            await stub.GetDataset(access_pb2.GetDatasetRequest(dataset_id="nope"), timeout=5)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND  # reached the servicer
    async with open_channel(served.target) as ch:  # TLS without a token: still refused
        with pytest.raises(aio.AioRpcError) as err:
            await access_pb2_grpc.AccessServiceStub(ch).GetDataset(
                access_pb2.GetDatasetRequest(dataset_id="nope"), timeout=5
            )
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_tls_enabled_without_files_stops_start_up(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TESSERA_GRPC__PORT", "50051")
    monkeypatch.setenv("TESSERA_METRICS__PORT", "0")
    monkeypatch.setenv("TESSERA_AUTH__PUBLIC_KEY_FILE", "/dev/null")
    monkeypatch.setenv("TESSERA_GRPC__TLS__ENABLED", "true")
    monkeypatch.setenv("TESSERA_GRPC__TLS__CERT_FILE", "/tmp/cert.pem")
    with pytest.raises(ConfigError) as err:
        load_settings(ServiceSettings)
    text = str(err.value)
    assert "TESSERA_GRPC__TLS" in text
    assert "key_file" in text and "ca_file" in text
