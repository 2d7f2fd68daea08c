"""Sessions and pins at the router, in front of fake workers: a session's turns stick to
its decode and prefill worker and move when the worker is gone; session ids come from
the body or the X-Session-Id header and bad ones are 400 (gRPC INVALID_ARGUMENT);
unknown sessions are 404 (NOT_FOUND); admin pins fan out to every worker and come back
to a worker that lost them."""
from __future__ import annotations

import grpc
import httpx
import pytest

from proto import epd_pb2, epd_pb2_grpc
from router.sessions import SessionDirectory
from tests.router.conftest import Cluster, MakeCluster, wait_until

PROMPT = list(range(10, 60))


async def complete(http: httpx.AsyncClient, cluster: Cluster, headers: dict[str, str] | None = None,
                   **fields: object) -> httpx.Response:
    body = {"model": cluster.model, "prompt": PROMPT, "max_tokens": 2, **fields}
    return await http.post("/v1/completions", json=body, headers=headers or {})


def decode_of(cluster: Cluster, session: str) -> list[str]:
    """Which fake decode worker got each turn of `session`."""
    return [d.worker_id for d in cluster.decodes for r in d.requests if r.session_id == session]


async def test_turns_stick_to_the_session_workers_and_move_when_one_is_gone(make_cluster: MakeCluster) -> None:
    cluster = await make_cluster(decode=2, prefill=2, policy="round_robin")
    async with httpx.AsyncClient(base_url=cluster.base_url) as http:
        for _ in range(4):
            assert (await complete(http, cluster, session_id="chat-1")).status_code == 200
        for _ in range(2):  # without a session, round robin alternates
            await complete(http, cluster)
        sticky = [r for d in cluster.decodes for r in d.requests if r.session_id == "chat-1"]
        assert len(sticky) == 4 and len(set(decode_of(cluster, "chat-1"))) == 1
        assert len({r.prefill[0].id for r in sticky}) == 1  # its prefill worker comes first every turn
        assert len(set(decode_of(cluster, ""))) == 2
        home = next(d for d in cluster.decodes if d.worker_id == decode_of(cluster, "chat-1")[0])
        await home.stop()
        await wait_until(lambda: home.worker_id not in [w.id for w in cluster.app.registry.healthy("decode")])
        response = await complete(http, cluster, headers={"X-Session-Id": "chat-1"})
        assert response.status_code == 200 and response.headers["X-Session-Id"] == "chat-1"
        info = (await http.get("/v1/sessions/chat-1")).json()
        assert info["decode_worker"] != home.worker_id and (info["turns"], info["moves"]) == (5, 1)
        metrics = (await http.get("/metrics")).text
        assert 'epd_router_session_moves_total{model="' in metrics and "epd_router_sessions_open" in metrics


@pytest.mark.parametrize("fields, headers, param, text", [
    ({"session_id": "x" * 129}, {}, "session_id", "at most 128"),
    ({"session_id": "a/b"}, {}, "session_id", "only ASCII"),
    ({"session_id": ""}, {}, "session_id", "must not be empty"),
    ({"session_id": 7}, {}, "session_id", "valid string"),
    ({}, {"X-Session-Id": "bad id"}, "X-Session-Id", "only ASCII"),
    ({"session_id": "a"}, {"X-Session-Id": "b"}, "session_id", "differ"),
    ({"session_id": "a", "n": 2}, {}, "n", "n must be 1"),
    ({"session_id": "a", "prompt": [[1, 2], [3, 4]]}, {}, "prompt", "one prompt"),
    ({"pin_prefix": 999}, {}, "pin_prefix", "[0, 50]"),
    ({"pin_prefix": -1}, {}, "pin_prefix", "[0, 50]"),
    ({"pin_prefix": "system"}, {}, "pin_prefix", "token count"),
])
async def test_bad_session_and_pin_fields_are_400(make_cluster: MakeCluster, fields: dict[str, object],
                                                 headers: dict[str, str], param: str, text: str) -> None:
    cluster = await make_cluster()
    async with httpx.AsyncClient(base_url=cluster.base_url) as http:
        response = await complete(http, cluster, headers, **fields)
    error = response.json()["error"]
    assert response.status_code == 400 and error["param"] == param and text in error["message"], error
    assert not cluster.decodes[0].requests


async def test_session_endpoints_and_chat_pins(make_cluster: MakeCluster) -> None:
    cluster = await make_cluster()
    async with httpx.AsyncClient(base_url=cluster.base_url) as http:
        created = (await http.post("/v1/sessions")).json()
        assert created["object"] == "session" and created["turns"] == 0
        messages = [{"role": "system", "content": "You are a terse assistant."}, {"role": "user", "content": "Hi"}]
        body = {"model": cluster.model, "messages": messages, "max_tokens": 2, "session_id": created["id"],
                "pin_prefix": "system"}
        assert (await http.post("/v1/chat/completions", json=body)).status_code == 200
        sent = cluster.decodes[0].requests[-1]
        tok = cluster.tokenizer
        system = tok.encode(tok.apply_chat_template(messages[:1], add_generation_prompt=False),
                            add_special_tokens=False)
        assert sent.session_id == created["id"] and 0 < sent.pin_prefix_tokens <= len(system)
        assert list(sent.prompt_token_ids[:sent.pin_prefix_tokens]) == system[:sent.pin_prefix_tokens]
        no_system = {**body, "messages": messages[1:]}
        assert (await http.post("/v1/chat/completions", json=no_system)).status_code == 400
        deleted = await http.delete(f"/v1/sessions/{created['id']}")
        assert deleted.json() == {"id": created["id"], "object": "session", "deleted": True, "released_kv": True}
        assert cluster.decodes[0].closed_sessions == [created["id"]]
        for method in ("get", "delete"):
            missing = await getattr(http, method)(f"/v1/sessions/{created['id']}")
            assert missing.status_code == 404 and missing.json()["error"]["code"] == "session_not_found"
        bad = await http.delete("/v1/sessions/" + "y" * 200)
        assert bad.status_code == 400 and "at most 128" in bad.json()["error"]["message"]


async def test_grpc_sessions(make_cluster: MakeCluster) -> None:
    cluster = await make_cluster()
    async with grpc.aio.insecure_channel(cluster.grpc_address) as channel:
        stub = epd_pb2_grpc.RouterStub(channel)
        request = epd_pb2.GenerateRequest(token_ids=epd_pb2.TokenIds(ids=PROMPT), session_id="g-1",
                                          pin_prefix_tokens=16, sampling=epd_pb2.SamplingParams(max_tokens=2))
        assert [r async for r in stub.Generate(request)][-1].HasField("finished")
        sent = cluster.decodes[0].requests[-1]
        assert (sent.session_id, sent.pin_prefix_tokens) == ("g-1", 16)
        for message, code in ((epd_pb2.GenerateRequest(token_ids=epd_pb2.TokenIds(ids=PROMPT), session_id="a b"),
                               grpc.StatusCode.INVALID_ARGUMENT),
                              (epd_pb2.GenerateRequest(token_ids=epd_pb2.TokenIds(ids=PROMPT), pin_prefix_tokens=51),
                               grpc.StatusCode.INVALID_ARGUMENT)):
            with pytest.raises(grpc.aio.AioRpcError) as info:
                [r async for r in stub.Generate(message)]
            assert info.value.code() == code
        assert (await stub.CloseSession(epd_pb2.CloseSessionRequest(session_id="g-1"))).found
        for session, code in (("g-1", grpc.StatusCode.NOT_FOUND), ("", grpc.StatusCode.INVALID_ARGUMENT)):
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.CloseSession(epd_pb2.CloseSessionRequest(session_id=session))
            assert info.value.code() == code


async def test_admin_pins_fan_out_and_return_to_a_worker_that_lost_them(make_cluster: MakeCluster) -> None:
    cluster = await make_cluster(decode=1, prefill=1)
    prefix = list(range(100, 164))  # 4 pages of 16
    async with httpx.AsyncClient(base_url=cluster.base_url) as http:
        reply = await http.post("/admin/pins", json={"prompt": prefix})
        assert reply.status_code == 200 and {w["ok"] for w in reply.json()["workers"]} == {True}
        pin = reply.json()["id"]
        workers = [*cluster.decodes, *cluster.prefills]
        assert all(w.pinned == [tuple(prefix)] for w in workers)
        await wait_until(lambda: len((cluster.app.service.pins.describe()["data"][0]["workers"])) == 2)
        cluster.prefills[0].pinned.clear()  # as after a restart
        await wait_until(lambda: cluster.prefills[0].pinned == [tuple(prefix)], timeout=5)
        assert (await http.delete(f"/admin/pins/{pin}")).json()["deleted"]
        assert all(w.pinned == [] for w in workers)
        missing = await http.delete(f"/admin/pins/{pin}")
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "pin_not_found"
        for worker in workers:
            worker.pin_failure = grpc.StatusCode.RESOURCE_EXHAUSTED
        refused = await http.post("/admin/pins", json={"prompt": prefix})
        assert refused.status_code == 409 and refused.json()["error"]["code"] == "pin_cap_exceeded"
        assert (await http.get("/admin/pins")).json()["data"] == []
        for body in ({}, {"prompt": []}, {"prompt": [10**9]}, {"prompt": "x", "messages": []}, {"other": 1}):
            assert (await http.post("/admin/pins", json=body)).status_code == 400, body


def test_the_directory_is_bounded_and_forgets_idle_sessions() -> None:
    now = [0.0]
    directory = SessionDirectory(max_sessions=2, idle_timeout=10.0, clock=lambda: now[0])
    for name in ("a", "b", "c"):
        directory.open(name)
        now[0] += 1
    assert directory.get("a") is None and len(directory) == 2  # the least recently used went
    directory.open("b")  # b is used again at t=3
    now[0] = 12.5
    assert directory.get("c") is None and directory.get("b") is not None
    route = directory.get("b")
    assert directory.follow(route, "d0", "p0") == "" and directory.follow(route, "d1", "p0") == "d0"
    assert (route.moves, directory.moves_total) == (1, 1)
