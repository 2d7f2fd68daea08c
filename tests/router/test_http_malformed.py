"""Bodies that once got a bare 500: a lone surrogate in a string, non-finite numbers,
nesting deeper than the JSON decoder's stack, an integer past int()'s digit limit."""
from __future__ import annotations

import pytest

from tests.router.conftest import Cluster, MakeCluster
from tests.router.test_http_errors import error_of, post

BODIES = [
    b'{"model": "\\ud800", "prompt": "x", "max_tokens": 2}',
    b'{"prompt": "\\udfff hi", "max_tokens": 2}',
    b'{"prompt": "x", "max_tokens": 2, "presence_penalty": -Infinity}',
    b'{"prompt": "x", "max_tokens": 2, "temperature": Infinity}',
    b'{"prompt": "x", "max_tokens": 2, "top_p": NaN}',
    b'{"messages": [{"role": "user", "content": "\\ud83d"}], "max_tokens": 2}',
    b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b', "max_tokens": 2}',
    b'{"prompt": "x", "user": ' + b'{"a": ' * 5000 + b"1" + b"}" * 5000 + b"}",
    b'{"prompt": "x", "max_tokens": ' + b"9" * 5000 + b"}",
    b'{"prompt": "\\ud800", "user": ' + b"[" * 900 + b"]" * 900 + b"}",
]


@pytest.fixture
async def cluster(make_cluster: MakeCluster) -> Cluster:
    return await make_cluster()


@pytest.mark.parametrize("body", BODIES)
async def test_malformed_bodies_are_400(cluster: Cluster, body: bytes) -> None:
    path = "/v1/chat/completions" if b"messages" in body else "/v1/completions"
    response = await post(cluster, path, content=body)
    error_of(response, 400)
    assert (await post(cluster, "/v1/completions", {"model": cluster.model, "prompt": "ok", "max_tokens": 2})
            ).status_code == 200
