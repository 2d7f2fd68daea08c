"""Issue 14 acceptance 4 on a real cluster (separate processes): with keys configured,
requests without or with a wrong key get 401, admin endpoints refuse a user key, a
worker without the cluster token cannot register, and every worker refuses calls
without the token while the cluster (router → decode → prefill) serves correct output."""
from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest

from deploy.local import LocalCluster
from engine import LLM, SamplingParams
from proto import epd_pb2 as pb
from proto import epd_pb2_grpc as pb_grpc
from proto.auth import CLUSTER_TOKEN_KEY
from tests.e2e.cluster import by_role, make_cluster, run, wait_for
from worker.config import free_port

pytestmark = pytest.mark.timeout(300)
USER, ADMIN, TOKEN = "sk-e2e-user", "sk-e2e-admin", "e2e-cluster-token"
PROMPTS = [[5, 17, 99, 3, 250, 41, 7, 8], list(range(20, 60))]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    tmp = tmp_path_factory.mktemp("security")
    local = make_cluster(tmp, num_prefill=1, num_decode=1, local_prefill_threshold=1, cluster_token=TOKEN,
                         api_keys=(USER,), admin_key=ADMIN, router_args=("--metrics-auth", "admin"))
    with local:
        yield local


def bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


def complete(cluster: LocalCluster, prompt: list[int], headers: dict[str, str]) -> httpx.Response:
    body = {"prompt": prompt, "max_tokens": 8, "temperature": 0}
    return httpx.post(f"{cluster.http_url}/v1/completions", json=body, headers=headers, timeout=60.0)


def offline(tiny_model_path: Path) -> list[list[int]]:
    results = LLM(tiny_model_path).generate(PROMPTS, SamplingParams(temperature=0, max_tokens=8))
    return [r.outputs[0].token_ids for r in results]


def test_keys_over_http(cluster: LocalCluster, tiny_model_path: Path) -> None:
    for headers in ({}, bearer("sk-wrong"), bearer(TOKEN), {"authorization": USER}):
        response = complete(cluster, PROMPTS[0], headers)
        assert response.status_code == 401, response.text
        assert response.json()["error"]["type"] == "authentication_error"
    outputs = []
    for prompt in PROMPTS:
        response = complete(cluster, prompt, bearer(USER))
        assert response.status_code == 200, response.text
        outputs.append(response.json()["choices"][0]["text"])
    tokenizer = LLM(tiny_model_path).get_tokenizer()
    assert outputs == [tokenizer.decode(ids) for ids in offline(tiny_model_path)]
    # decode handed the prompts to prefill (local threshold 1): decode → prefill carried the token.
    # (/cluster shows each worker's last Status poll, every 0.5 s.)
    wait_for(lambda: _prefilled(cluster) >= sum(map(len, PROMPTS)) - 1, timeout_s=10.0, interval_s=0.2)


def _prefilled(cluster: LocalCluster) -> int:
    status = httpx.get(f"{cluster.http_url}/cluster", headers=bearer(USER), timeout=10.0).json()
    return int(by_role(status, "prefill")[0]["prefill_tokens_total"])


def test_admin_endpoint_refuses_a_user_key(cluster: LocalCluster) -> None:
    url = f"{cluster.http_url}/metrics"
    assert httpx.get(url, timeout=10.0).status_code == 401
    response = httpx.get(url, headers=bearer(USER), timeout=10.0)
    assert response.status_code == 403 and response.json()["error"]["type"] == "permission_error"
    assert httpx.get(url, headers=bearer(ADMIN), timeout=10.0).status_code == 200
    assert httpx.get(f"{cluster.http_url}/health", timeout=10.0).status_code == 200


async def _generate(address: str, metadata: tuple[tuple[str, str], ...]) -> list[int]:
    async with grpc.aio.insecure_channel(address) as channel:
        request = pb.GenerateRequest(sampling=pb.SamplingParams(max_tokens=8, temperature=0.0))
        request.token_ids.ids.extend(PROMPTS[1])
        tokens: list[int] = []
        async for response in pb_grpc.RouterStub(channel).Generate(request, metadata=metadata, timeout=60.0):
            tokens.extend(response.chunk.token_ids)
        return tokens


def test_keys_over_grpc(cluster: LocalCluster, tiny_model_path: Path) -> None:
    for metadata in ((), (("authorization", "Bearer sk-wrong"),), ((CLUSTER_TOKEN_KEY, TOKEN),)):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            run(_generate(cluster.grpc_address, metadata))
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert run(_generate(cluster.grpc_address, (("authorization", f"Bearer {USER}"),))) == offline(tiny_model_path)[1]


async def _status(name: str, address: str, metadata: tuple[tuple[str, str], ...]) -> pb.WorkerStatus:
    stub_class = pb_grpc.PrefillWorkerStub if name.startswith("prefill") else pb_grpc.DecodeWorkerStub
    async with grpc.aio.insecure_channel(address) as channel:
        return await stub_class(channel).Status(pb.StatusRequest(), metadata=metadata, timeout=10.0)


def test_workers_refuse_calls_without_the_token(cluster: LocalCluster) -> None:
    for name, address in cluster.worker_addresses.items():
        for metadata in ((), ((CLUSTER_TOKEN_KEY, "wrong"),), (("authorization", f"Bearer {ADMIN}"),)):
            with pytest.raises(grpc.aio.AioRpcError) as info:
                run(_status(name, address, metadata))
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED, name
        assert run(_status(name, address, ((CLUSTER_TOKEN_KEY, TOKEN),))).id == name


def _spawn_worker(cluster: LocalCluster, name: str, token: str | None, log: Path) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if k != "EPD_CLUSTER_TOKEN"}
    if token is not None:
        env["EPD_CLUSTER_TOKEN"] = token
    args = [sys.executable, "-m", "deploy.cli", "worker", "decode", "--transfer", "none", "--worker-id", name,
            "--port", str(free_port()), "--router", cluster.grpc_address]
    return subprocess.Popen(args, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT)


def _registered(cluster: LocalCluster) -> set[str]:
    status = httpx.get(f"{cluster.http_url}/cluster", headers=bearer(USER), timeout=10.0).json()
    return {entry["id"] for entry in status}


def test_a_worker_without_the_token_cannot_register(cluster: LocalCluster, tmp_path: Path) -> None:
    workers = [_spawn_worker(cluster, "intruder", None, tmp_path / "intruder.log"),
               _spawn_worker(cluster, "wrong-token", "not-the-token", tmp_path / "wrong.log"),
               _spawn_worker(cluster, "member", TOKEN, tmp_path / "member.log")]
    try:
        # The member registers; the others had as long (heartbeats every second) and never do.
        wait_for(lambda: "member" in _registered(cluster), timeout_s=120.0, interval_s=0.5)
        wait_for(lambda: next(e for e in httpx.get(f"{cluster.http_url}/cluster", headers=bearer(USER),
                                                   timeout=10.0).json() if e["id"] == "member")["healthy"],
                 timeout_s=30.0, interval_s=0.5)
        assert not {"intruder", "wrong-token"} & _registered(cluster)
        assert all(worker.poll() is None for worker in workers)  # refused, not crashed
    finally:
        for worker in workers:
            worker.terminate()
        for worker in workers:
            try:
                worker.wait(timeout=10)
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.wait(timeout=10)
