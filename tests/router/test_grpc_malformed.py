"""Request bodies that do not parse: INVALID_ARGUMENT, not gRPC's own INTERNAL
("Exception deserializing request!"), which the fuzz test found on every method."""
from __future__ import annotations

import grpc
import pytest

from proto import epd_pb2 as pb
from proto import epd_pb2_grpc as pb_grpc
from tests.router.conftest import Cluster, MakeCluster

CORRUPT = [b"\xff", b"\x0a\x05ab", b"\x08\x80\x80\x80\x80\x80\x80\x80\x80\x80\x80", b"\x0a"]


@pytest.fixture
async def cluster(make_cluster: MakeCluster) -> Cluster:
    return await make_cluster()


async def call(cluster: Cluster, method: str, body: bytes, streaming: bool) -> grpc.StatusCode:
    async with grpc.aio.insecure_channel(cluster.grpc_address) as channel:
        try:
            if streaming:
                async for _ in channel.unary_stream(method)(body, timeout=10.0):
                    pass
            else:
                await channel.unary_unary(method)(body, timeout=10.0)
        except grpc.aio.AioRpcError as exc:
            return exc.code()
    return grpc.StatusCode.OK


@pytest.mark.parametrize("body", CORRUPT)
@pytest.mark.parametrize("method, streaming", [("/epd.v1.Router/Generate", True), ("/epd.v1.Router/ListModels", False),
                                               ("/epd.v1.Registry/Register", False)])
async def test_corrupt_bodies_are_invalid_argument(cluster: Cluster, method: str, streaming: bool,
                                                   body: bytes) -> None:
    assert await call(cluster, method, body, streaming) == grpc.StatusCode.INVALID_ARGUMENT


async def test_parsed_requests_still_work(cluster: Cluster) -> None:
    request = pb.GenerateRequest(text="hi", sampling=pb.SamplingParams(max_tokens=2)).SerializeToString()
    assert await call(cluster, "/epd.v1.Router/Generate", request, True) == grpc.StatusCode.OK
    async with grpc.aio.insecure_channel(cluster.grpc_address) as channel:
        models = await pb_grpc.RouterStub(channel).ListModels(pb.ListModelsRequest(), timeout=10.0)
    assert models.models[0].id == cluster.model
