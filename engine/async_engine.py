"""Drives an Engine from asyncio: one engine thread, many coroutine callers.

Every touch of the engine (steps, adding, aborting, reserving) runs on one worker
thread, so the engine itself needs no locks; the event loop stays free for gRPC while a
step computes. After each step an optional hook runs before the next step starts (the
prefill role ships KV there, so pages it reads cannot be rewritten meanwhile). (Running
several steps per hop to the loop measured slower in the serving bench, 2,511 against
2,978 output tokens/s on one H200, BENCHMARKS.md, so each step returns to the loop.) One
executor call per step both checks for work and steps: each hop to the engine thread and
back costs tens of microseconds, paid on every token at low load.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, AsyncIterator, Awaitable, Callable, TypeVar

from engine.engine import Engine, StepOutput
from engine.sampling_params import SamplingParams

T = TypeVar("T")
logger = logging.getLogger(__name__)
StepHook = Callable[[list[StepOutput]], Awaitable[None]]
STATS_LOG_INTERVAL_S = 30.0


class LoopStats:
    """Where the engine thread's time goes between steps, logged while steps run: `gap` is
    the time from one step's end to the next one's start (the event loop's turn: publishing
    outputs, the servers' per-token work, and the hop back), the serving path's overhead
    per step on top of the step itself."""

    def __init__(self) -> None:
        self.steps = 0
        self.step_s = 0.0
        self.gap_s = 0.0
        self.max_step_s = 0.0  # the tails say more than the means about ITL under load
        self.max_gap_s = 0.0
        self._last_end: float | None = None
        self._logged_at = time.monotonic()

    def record(self, start: float, end: float) -> None:
        if self._last_end is not None:
            self.gap_s += start - self._last_end
            self.max_gap_s = max(self.max_gap_s, start - self._last_end)
        self._last_end = end
        self.steps += 1
        self.step_s += end - start
        self.max_step_s = max(self.max_step_s, end - start)
        if time.monotonic() - self._logged_at >= STATS_LOG_INTERVAL_S:
            self.log(time.monotonic())

    def idle(self) -> None:
        """The engine ran out of work: the wait for the next request is no gap."""
        self._last_end = None

    def log(self, now: float) -> None:
        if self.steps > 1:
            logger.info("engine loop: %d steps, step %.3f ms mean (max %.1f), gap between steps %.3f ms mean "
                        "(max %.1f)", self.steps, self.step_s / self.steps * 1e3, self.max_step_s * 1e3,
                        self.gap_s / (self.steps - 1) * 1e3, self.max_gap_s * 1e3)
        self.steps, self.step_s, self.gap_s, self._logged_at = 0, 0.0, 0.0, now
        self.max_step_s = self.max_gap_s = 0.0


def merge_outputs(first: StepOutput, then: StepOutput) -> StepOutput:
    """Two consecutive outputs of one request as one."""
    return StepOutput(first.request_id, first.new_token_ids + then.new_token_ids,
                      first.new_logprobs + then.new_logprobs, then.finished, then.finish_reason,
                      then.request if then.request is not None else first.request)


class _Sink:
    """A subscription that forwards each output at once (`AsyncEngine.redirect`)."""

    __slots__ = ("put_nowait",)

    def __init__(self, sink: Callable[[StepOutput], None]) -> None:
        self.put_nowait = sink


class AsyncEngine:
    def __init__(self, engine: Engine, after_step: StepHook | None = None) -> None:
        self.engine = engine
        self._after_step = after_step
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")
        self._queues: dict[str, asyncio.Queue[StepOutput]] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.step_error: BaseException | None = None
        self.stats = LoopStats()

    async def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="engine-loop")

    async def stop(self) -> None:
        self.stats.log(time.monotonic())
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._executor.shutdown(wait=True, cancel_futures=True)

    async def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run `fn` on the engine thread, between steps."""
        loop = asyncio.get_running_loop()
        result = await loop.run_in_executor(self._executor, lambda: fn(*args, **kwargs))
        self._wake.set()
        return result

    def subscribe(self, request_id: str) -> asyncio.Queue[StepOutput]:
        queue: asyncio.Queue[StepOutput] = asyncio.Queue()
        self._queues[request_id] = queue
        return queue

    def redirect(self, request_id: str, queue: asyncio.Queue[StepOutput], sink: Callable[[StepOutput], None]) -> bool:
        """From now on hand this request's outputs to `sink`, called in `publish` (on the
        loop, right after the step), instead of queueing them for a task to take: a
        consumer that only forwards them saves a task wake-up per request per step.
        Outputs already in `queue` go to the sink first, in order. False (nothing
        changed) when `queue` is no longer this request's subscription."""
        if self._queues.get(request_id) is not queue:
            return False
        while not queue.empty():
            sink(queue.get_nowait())
        self._queues[request_id] = _Sink(sink)  # type: ignore[assignment]
        return True

    def subscribed(self, request_id: str) -> bool:
        """Whether a caller streams this request's outputs now (its id is in use here)."""
        return request_id in self._queues

    def unsubscribe(self, request_id: str) -> None:
        self._queues.pop(request_id, None)

    async def generate(self, prompt: list[int], params: SamplingParams, request_id: str,
                       **options: Any) -> AsyncIterator[StepOutput]:
        """Add a request and yield its step outputs until it finishes. Leaving the
        iteration early (client gone) aborts the request."""
        queue = self.subscribe(request_id)
        try:
            await self.run(self.engine.add_request, prompt, params, request_id, **options)
            async for out in self.stream(queue):
                yield out
        finally:
            await self.finish_stream(request_id)

    async def stream(self, queue: asyncio.Queue[StepOutput]) -> AsyncIterator[StepOutput]:
        while True:
            out = await queue.get()
            yield out
            if out.finished:
                return

    async def stream_merged(self, queue: asyncio.Queue[StepOutput]) -> AsyncIterator[StepOutput]:
        """As `stream`, but outputs already queued behind the one taken (a consumer that
        fell behind the steps) come as one output of all their tokens: one message per
        turn of the consumer instead of one per token. At low load nothing waits, so
        every token still goes out alone, as soon as its step ends."""
        while True:
            out = await queue.get()
            while not out.finished and not queue.empty():
                out = merge_outputs(out, queue.get_nowait())
            yield out
            if out.finished:
                return

    async def finish_stream(self, request_id: str, finished: bool = False) -> None:
        """Drop the subscription; abort the request if it is still live (`finished`: its
        last output was taken, so the engine holds nothing of it and no hop is needed)."""
        self.unsubscribe(request_id)
        if not finished and await self.run(self.engine.abort_request, request_id):
            logger.info("request %s aborted: its stream closed before it finished", request_id)

    def publish(self, outputs: list[StepOutput]) -> None:
        for out in outputs:
            queue = self._queues.get(out.request_id)
            if queue is not None:
                queue.put_nowait(out)

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                outputs = await loop.run_in_executor(self._executor, self._step_if_work)
            except Exception as exc:  # noqa: BLE001 - fail the live requests, keep serving
                logger.exception("engine step failed")
                self.step_error = exc
                outputs = await self.run(self._fail_all, f"engine step failed: {exc}")
            if outputs is None:  # nothing to do: sleep until a caller adds work
                self._wake.clear()
                await self._wake.wait()
                continue
            self.publish(outputs)
            if self._after_step is not None:
                try:
                    await self._after_step(outputs)
                except Exception:  # noqa: BLE001 - a failing hook must not stop every later step
                    logger.exception("after-step hook failed")
            await asyncio.sleep(0)  # let callers queue work between steps

    def _step_if_work(self) -> list[StepOutput] | None:
        """On the engine thread: one step, or None when there is no work."""
        if not self.engine.has_unfinished_requests():
            self.stats.idle()
            return None
        start = time.perf_counter()
        outputs = self.engine.step()
        self.stats.record(start, time.perf_counter())
        return outputs

    def _fail_all(self, message: str) -> list[StepOutput]:
        outputs = []
        for request_id in list(self.engine.requests):
            request = self.engine.requests[request_id]
            self.engine.abort_request(request_id)
            request.finish_reason = "error"
            request.stop_reason = message
            outputs.append(StepOutput(request_id, [], [], True, "error", request))
        return outputs
