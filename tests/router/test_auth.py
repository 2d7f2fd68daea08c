"""API keys, the admin key and the cluster token on a real router (in-process, real
sockets) in front of fake workers; the policy's rules on their own."""
from __future__ import annotations

import time
from typing import Any

import grpc
import httpx
import pytest
from fastapi import Depends, FastAPI

from proto import epd_pb2 as pb
from proto import epd_pb2_grpc as pb_grpc
from proto.auth import CLUSTER_TOKEN_KEY, secret_matches
from router.auth import AccessPolicy, install, is_loopback, require_admin
from router.config import parse_config
from router.errors import PermissionDenied, Unauthenticated
from tests.router.conftest import Cluster, MakeCluster

USER, OTHER_USER, ADMIN, TOKEN = "sk-user-1", "sk-user-2", "sk-admin", "cluster-secret"


def bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


@pytest.fixture
async def cluster(make_cluster: MakeCluster) -> Cluster:
    return await make_cluster(api_keys=(USER, OTHER_USER), admin_key=ADMIN, cluster_token=TOKEN,
                              metrics_auth="admin")


async def complete(cluster: Cluster, headers: dict[str, str]) -> httpx.Response:
    async with httpx.AsyncClient(base_url=cluster.base_url, timeout=10.0) as http:
        return await http.post("/v1/completions", json={"model": cluster.model, "prompt": "hi", "max_tokens": 2},
                               headers=headers)


def assert_error(response: httpx.Response, status: int, error_type: str) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["type"] == error_type and error["message"]


@pytest.mark.parametrize("headers", [{}, bearer("sk-wrong"), bearer(USER + "x"), {"authorization": USER},
                                     {"authorization": "Basic " + USER}, bearer(TOKEN)])
async def test_http_without_a_valid_key_is_401(cluster: Cluster, headers: dict[str, str]) -> None:
    response = await complete(cluster, headers)
    assert_error(response, 401, "authentication_error")
    assert response.headers["www-authenticate"] == "Bearer"
    assert cluster.decodes[0].requests == []  # refused before anything reached a worker


async def test_http_with_a_valid_key_is_served(cluster: Cluster) -> None:
    for key in (USER, OTHER_USER, ADMIN):  # the admin key may use the user API too
        assert (await complete(cluster, bearer(key))).status_code == 200
    assert (await complete(cluster, {"authorization": f"bearer   {USER}"})).status_code == 200


async def test_open_and_guarded_routes(cluster: Cluster) -> None:
    async with httpx.AsyncClient(base_url=cluster.base_url, timeout=10.0) as http:
        assert (await http.get("/health")).status_code == 200  # probes need no key
        assert (await http.get("/openapi.json")).status_code == 200
        assert (await http.get("/v1/models")).status_code == 401
        assert (await http.get("/cluster")).status_code == 401
        assert (await http.get("/v1/models", headers=bearer(USER))).status_code == 200
        assert (await http.get("/cluster", headers=bearer(USER))).status_code == 200
        # The live page and its data are guarded like /cluster.
        assert (await http.get("/dashboard")).status_code == 401
        assert (await http.get("/cluster?view=overview")).status_code == 401
        page = await http.get("/dashboard", headers=bearer(USER))
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert (await http.get("/cluster?view=overview", headers=bearer(USER))).json()["workers"]
        # --metrics-auth admin: /metrics is an admin endpoint here.
        assert_error(await http.get("/metrics"), 401, "authentication_error")
        assert_error(await http.get("/metrics", headers=bearer(USER)), 403, "permission_error")
        assert (await http.get("/metrics", headers=bearer(ADMIN))).status_code == 200


async def grpc_call(cluster: Cluster, metadata: tuple[tuple[str, str], ...]) -> grpc.StatusCode:
    async with grpc.aio.insecure_channel(cluster.grpc_address) as channel:
        request = pb.GenerateRequest(text="hi", sampling=pb.SamplingParams(max_tokens=2))
        try:
            async for _ in pb_grpc.RouterStub(channel).Generate(request, metadata=metadata, timeout=10.0):
                pass
        except grpc.aio.AioRpcError as exc:
            return exc.code()
        return grpc.StatusCode.OK


async def test_grpc_router_service_needs_a_key(cluster: Cluster) -> None:
    assert await grpc_call(cluster, ()) == grpc.StatusCode.UNAUTHENTICATED
    assert await grpc_call(cluster, (("authorization", "Bearer nope"),)) == grpc.StatusCode.UNAUTHENTICATED
    assert await grpc_call(cluster, ((CLUSTER_TOKEN_KEY, TOKEN),)) == grpc.StatusCode.UNAUTHENTICATED
    assert await grpc_call(cluster, (("authorization", f"Bearer {USER}"),)) == grpc.StatusCode.OK
    async with grpc.aio.insecure_channel(cluster.grpc_address) as channel:
        stub = pb_grpc.RouterStub(channel)
        assert (await stub.Health(pb.HealthRequest(), timeout=5.0)).ready  # open, like /health
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.ClusterStatus(pb.ClusterStatusRequest(), timeout=5.0)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def register(cluster: Cluster, metadata: tuple[tuple[str, str], ...], worker_id: str) -> Any:
    async with grpc.aio.insecure_channel(cluster.grpc_address) as channel:
        stub = pb_grpc.RegistryStub(channel)
        request = pb.RegisterRequest(role="decode", id=worker_id, address="127.0.0.1:1")
        return await stub.Register(request, metadata=metadata, timeout=5.0)


@pytest.mark.parametrize("metadata", [(), ((CLUSTER_TOKEN_KEY, "wrong"),), (("authorization", f"Bearer {ADMIN}"),)])
async def test_registry_refuses_a_caller_without_the_cluster_token(
        cluster: Cluster, metadata: tuple[tuple[str, str], ...]) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await register(cluster, metadata, "intruder")
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert cluster.app.registry.get("intruder") is None


async def test_registry_accepts_the_cluster_token(cluster: Cluster) -> None:
    assert (await register(cluster, ((CLUSTER_TOKEN_KEY, TOKEN),), "d-new")).accepted
    assert cluster.app.registry.get("d-new") is not None


async def test_no_keys_configured_leaves_the_api_open(make_cluster: MakeCluster) -> None:
    cluster = await make_cluster()
    assert (await complete(cluster, {})).status_code == 200
    assert (await register(cluster, (), "d-any")).accepted
    async with httpx.AsyncClient(base_url=cluster.base_url) as http:
        assert (await http.get("/metrics")).status_code == 200


# -- the policy's rules ----------------------------------------------------------------


def test_admin_routes_without_an_admin_key() -> None:
    local = AccessPolicy(api_keys=(USER,), loopback=True)
    local.check_admin(USER)  # loopback: guarded like user routes
    with pytest.raises(Unauthenticated):
        local.check_admin(None)
    AccessPolicy(loopback=True).check_admin(None)  # loopback, no keys at all: open
    exposed = AccessPolicy(api_keys=(USER,), loopback=False)
    for token in (None, USER):
        with pytest.raises(PermissionDenied, match="--admin-key"):
            exposed.check_admin(token)
    with pytest.raises(PermissionDenied):
        AccessPolicy(loopback=False).check_admin(None)


def test_admin_key_refuses_user_keys() -> None:
    policy = AccessPolicy(api_keys=(USER,), admin_key=ADMIN, loopback=False)
    policy.check_admin(ADMIN)
    with pytest.raises(PermissionDenied):
        policy.check_admin(USER)
    for token in (None, "", "sk-admin ", ADMIN.upper()):
        with pytest.raises(Unauthenticated):
            policy.check_admin(token)
    AccessPolicy(admin_key=ADMIN).check_user(None)  # an admin key alone leaves the user API open


def test_require_admin_on_a_new_route() -> None:
    """How the lead's /admin/* routes use it: a dependency on an app that `install` set up."""
    from fastapi.testclient import TestClient
    app = FastAPI()
    install(app, AccessPolicy(api_keys=(USER,), admin_key=ADMIN, loopback=False))

    @app.post("/admin/thing", dependencies=[Depends(require_admin)])
    async def thing() -> dict[str, bool]:
        return {"done": True}

    with TestClient(app) as http:
        assert http.post("/admin/thing", headers=bearer(ADMIN)).json() == {"done": True}
        assert http.post("/admin/thing", headers=bearer(USER)).status_code == 403
        response = http.post("/admin/thing")
        assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"


def test_is_loopback() -> None:
    assert all(map(is_loopback, ["127.0.0.1", "127.3.2.1", "::1", "[::1]", "localhost"]))
    assert not any(map(is_loopback, ["0.0.0.0", "::", "10.0.0.1", "example.org", ""]))


def test_secret_matches_compares_every_key() -> None:
    assert secret_matches("b", ["a", "b"]) and not secret_matches("c", ["a", "b"])
    assert not secret_matches(None, ["a"]) and not secret_matches("\udcff", ["a"])
    long_key = "k" * 4096
    start = time.perf_counter()
    for _ in range(200):
        secret_matches("x", [long_key])
    assert time.perf_counter() - start < 1.0


def test_keys_from_flags_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EPD_API_KEY", " env-1 ,env-2,")
    monkeypatch.setenv("EPD_ADMIN_KEY", "env-admin")
    monkeypatch.setenv("EPD_CLUSTER_TOKEN", "env-token")
    config = parse_config(["--api-key", "flag-1"])
    assert config.api_keys == ("flag-1", "env-1", "env-2")
    assert (config.admin_key, config.cluster_token) == ("env-admin", "env-token")
    assert parse_config(["--admin-key", "flag-admin"]).admin_key == "flag-admin"
    assert "env-1" not in repr(config) and "env-token" not in repr(config)
    for argv in (["--api-key", "has space"], ["--api-key", "env-admin"], ["--tls-cert", "c.pem"],
                 ["--admin-key", "é"]):
        with pytest.raises(ValueError):
            parse_config(argv)
