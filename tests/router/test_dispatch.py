"""Dispatcher pieces in isolation (the whole path is in test_resilience and tests/e2e)."""
from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from proto import epd_pb2
from router.config import RouterConfig
from router.dispatch import Dispatcher


class _Call:
    """A decode stream whose next read the test resolves by hand."""

    def __init__(self, pending: asyncio.Future) -> None:
        self.pending = pending

    def read(self) -> asyncio.Future:
        return self.pending


def _reader() -> SimpleNamespace:
    return SimpleNamespace(config=RouterConfig())


def test_a_cancel_in_the_turn_a_token_arrives_is_not_lost() -> None:
    """The client goes away in the same loop turn as the next token arrives: reading must
    still end with the cancellation (asyncio.wait_for on 3.11 returned the token, and the
    request streamed on to its end on the decode worker)."""
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        pending = loop.create_future()
        flag = SimpleNamespace(aborted=False, plan=None)
        plan = SimpleNamespace(decode_id="decode-0")
        task = asyncio.ensure_future(Dispatcher._read(_reader(), plan, _Call(pending), True, flag))
        await asyncio.sleep(0)  # the task now waits on the read
        pending.set_result(epd_pb2.DecodeResponse())
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(scenario())


def test_a_token_that_arrives_is_returned() -> None:
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        pending = loop.create_future()
        response = epd_pb2.DecodeResponse(chunk=epd_pb2.TokenChunk(token_ids=[7]))
        pending.set_result(response)
        got = await Dispatcher._read(_reader(), SimpleNamespace(decode_id="d"), _Call(pending), True,
                                     SimpleNamespace(aborted=False, plan=None))
        assert list(got.chunk.token_ids) == [7]

    asyncio.run(scenario())
