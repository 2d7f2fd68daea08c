"""Dispatcher pieces in isolation (the whole path is in test_resilience and tests/e2e)."""
from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from proto import epd_pb2
from router.config import RouterConfig
from router.dispatch import Dispatcher, _AttemptFailed, _Silence


class _Call:
    """A decode stream whose next read the test resolves by hand."""

    def __init__(self, pending: asyncio.Future) -> None:
        self.pending = pending
        self.cancelled = False

    def read(self) -> asyncio.Future:
        return self.pending

    def cancel(self) -> None:
        """As grpc.aio does: the pending read ends with CancelledError."""
        self.cancelled = True
        self.pending.cancel()


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
        call = _Call(pending)
        task = asyncio.ensure_future(Dispatcher._read(_reader(), plan, call, _Silence(call), True, flag))
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
        call = _Call(pending)
        got = await Dispatcher._read(_reader(), SimpleNamespace(decode_id="d"), call, _Silence(call), True,
                                     SimpleNamespace(aborted=False, plan=None))
        assert list(got.chunk.token_ids) == [7]

    asyncio.run(scenario())


def _timed_reader(token_timeout: float) -> SimpleNamespace:
    return SimpleNamespace(config=RouterConfig(token_timeout=token_timeout, first_token_timeout=10 * token_timeout))


def test_a_silent_stream_fails_after_the_token_timeout() -> None:
    async def scenario() -> float:
        loop = asyncio.get_running_loop()
        call = _Call(loop.create_future())
        start = loop.time()
        # A failed attempt (not the request's end): the request migrates to another worker.
        with pytest.raises(_AttemptFailed, match="sent nothing for 0.1 s") as failed:
            await Dispatcher._read(_timed_reader(0.1), SimpleNamespace(decode_id="d"), call, _Silence(call), True,
                                   SimpleNamespace(aborted=False, plan=None))
        assert failed.value.code.name == "DEADLINE_EXCEEDED" and not failed.value.unreachable and call.cancelled
        return loop.time() - start

    assert 0.1 <= asyncio.run(scenario()) < 1.0


def test_time_between_reads_does_not_count_and_the_limit_shrinks_after_the_first_token() -> None:
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        reader, plan, flag = _timed_reader(0.2), SimpleNamespace(decode_id="d"), SimpleNamespace(aborted=False, plan=None)
        ready = loop.create_future()
        ready.set_result(epd_pb2.DecodeResponse())
        call = _Call(ready)
        silence = _Silence(call)
        await Dispatcher._read(reader, plan, call, silence, False, flag)  # first read: 2 s allowed
        await asyncio.sleep(0.5)  # the consumer is slow: not a silent worker
        await Dispatcher._read(reader, plan, call, silence, True, flag)
        assert not call.cancelled
        call.pending = loop.create_future()
        start = loop.time()
        with pytest.raises(_AttemptFailed):
            await Dispatcher._read(reader, plan, call, silence, True, flag)
        assert loop.time() - start < 1.0  # 0.2 s, not the first token's 2 s
        silence.stop()

    asyncio.run(scenario())
