"""TLS on the router's HTTP and gRPC ports, with a self-signed certificate made here."""
from __future__ import annotations

import shutil
import ssl
import subprocess
from pathlib import Path

import grpc
import httpx
import pytest

from proto import epd_pb2 as pb
from proto import epd_pb2_grpc as pb_grpc
from tests.router.conftest import Cluster, MakeCluster


def self_signed(directory: Path) -> tuple[Path, Path]:
    """(certificate, key) for 127.0.0.1 and localhost: `cryptography` if installed,
    else the openssl command."""
    cert, key = directory / "cert.pem", directory / "key.pem"
    try:
        _with_cryptography(cert, key)
    except ImportError:
        if shutil.which("openssl") is None:
            pytest.skip("neither the cryptography package nor openssl is available")
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
                        "-out", str(cert), "-days", "1", "-subj", "/CN=localhost",
                        "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
                       check=True, capture_output=True, timeout=60)
    return cert, key


def _with_cryptography(cert_path: Path, key_path: Path) -> None:
    import datetime
    import ipaddress
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    san = x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now)
            .not_valid_after(now + datetime.timedelta(days=1)).add_extension(san, critical=False)
            .sign(key, hashes.SHA256()))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))


@pytest.fixture
async def tls_cluster(make_cluster: MakeCluster, tmp_path: Path) -> tuple[Cluster, Path]:
    cert, key = self_signed(tmp_path)
    return await make_cluster(tls_cert=str(cert), tls_key=str(key), api_keys=("sk-tls",)), cert


async def test_https_serves_verified_clients_only(tls_cluster: tuple[Cluster, Path]) -> None:
    cluster, cert = tls_cluster
    url = f"https://127.0.0.1:{cluster.app.http_port}"
    context = ssl.create_default_context(cafile=str(cert))
    async with httpx.AsyncClient(base_url=url, verify=context, timeout=10.0) as http:
        assert (await http.get("/health")).status_code == 200
        body = {"model": cluster.model, "prompt": "hi", "max_tokens": 2}
        response = await http.post("/v1/completions", json=body, headers={"authorization": "Bearer sk-tls"})
        assert response.status_code == 200, response.text
    async with httpx.AsyncClient(base_url=url, timeout=10.0) as http:  # the system CAs do not know it
        with pytest.raises(httpx.ConnectError):
            await http.get("/health")
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{cluster.app.http_port}", timeout=10.0) as http:
        with pytest.raises(httpx.HTTPError):  # plaintext on the TLS port is no request
            (await http.get("/health")).raise_for_status()


async def test_grpc_over_tls(tls_cluster: tuple[Cluster, Path]) -> None:
    cluster, cert = tls_cluster
    credentials = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
    async with grpc.aio.secure_channel(cluster.grpc_address, credentials) as channel:
        stub = pb_grpc.RouterStub(channel)
        assert (await stub.Health(pb.HealthRequest(), timeout=10.0)).ready
        models = await stub.ListModels(pb.ListModelsRequest(), metadata=(("authorization", "Bearer sk-tls"),),
                                       timeout=10.0)
        assert models.models[0].id == cluster.model
    async with grpc.aio.insecure_channel(cluster.grpc_address) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await pb_grpc.RouterStub(channel).Health(pb.HealthRequest(), timeout=3.0)
        assert info.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
