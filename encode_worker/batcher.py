"""Batches images of concurrent requests into few vision-tower forwards.

Requests add images; one task takes everything pending (up to `max_batch`) whenever the
encoder is free and runs it on the encoder's own thread. Under load the batch grows by
itself: images that arrive during a forward make up the next one. Two requests for the
same image while it is queued or running share one encode.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from engine.multimodal import DEFAULT_MAX_IMAGE_PIXELS, InvalidImageError

if TYPE_CHECKING:
    from engine.vision_encoder import VisionEncoder

logger = logging.getLogger(__name__)


@dataclass
class _Job:
    key: str
    data: bytes
    future: asyncio.Future[torch.Tensor]


class EncodeBatcher:
    def __init__(self, encoder: VisionEncoder, max_batch: int,
                 max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> None:
        if max_batch < 1:
            raise ValueError("--encode-max-batch must be >= 1")
        self.encoder = encoder
        self.max_batch = max_batch
        self.max_pixels = max_pixels
        self.images_encoded_total = 0
        self.batches_total = 0
        self.running = 0  # images in the forward now
        self._pending: list[_Job] = []
        self._by_key: dict[str, asyncio.Future[torch.Tensor]] = {}
        self._wake = asyncio.Event()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="encoder")
        self._task: asyncio.Task[None] | None = None

    @property
    def queued(self) -> int:
        """Images accepted and not yet encoded (waiting or in the forward now)."""
        return len(self._pending) + self.running

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for job in self._pending:
            job.future.cancel()
        self._executor.shutdown(wait=True)

    async def encode(self, key: str, data: bytes) -> torch.Tensor:
        """The image's embeddings [num_image_tokens, hidden] (on the encoder's device).
        Raises InvalidImageError for bytes that are not a usable image."""
        future = self._by_key.get(key)
        if future is None:
            future = asyncio.get_running_loop().create_future()
            future.add_done_callback(lambda f: f.cancelled() or f.exception())  # read by someone else
            self._by_key[key] = future
            self._pending.append(_Job(key, data, future))
            self._wake.set()
        return await asyncio.shield(future)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._pending:
                jobs, self._pending = self._pending[:self.max_batch], self._pending[self.max_batch:]
                self.running = len(jobs)
                try:
                    results = await loop.run_in_executor(self._executor, self._encode, [j.data for j in jobs])
                except Exception as exc:  # noqa: BLE001 - fail these images, keep serving
                    logger.exception("vision encoder failed on a batch of %d image(s)", len(jobs))
                    results = [RuntimeError(f"vision encoder failed: {exc!r}")] * len(jobs)
                finally:
                    self.running = 0
                for job, result in zip(jobs, results):
                    self._by_key.pop(job.key, None)
                    if job.future.done():
                        continue
                    if isinstance(result, BaseException):
                        job.future.set_exception(result)
                    else:
                        job.future.set_result(result)

    def _encode(self, datas: list[bytes]) -> list[torch.Tensor | BaseException]:
        """Encoder thread: decode each image (a bad one fails alone), one forward for the rest."""
        results: list[torch.Tensor | BaseException] = []
        images = []
        for image in self.encoder.decode(datas, self.max_pixels):
            if isinstance(image, InvalidImageError):
                results.append(image)
            else:
                images.append(image)
                results.append(torch.empty(0))  # filled below
        if images:
            with torch.inference_mode():
                pixels = self.encoder.preprocess(images)
                embeddings = self.encoder.encode(pixels)  # [N, num_image_tokens, hidden]
            good = iter(embeddings.unbind(0))
            results = [r if isinstance(r, BaseException) else next(good).clone() for r in results]
            if embeddings.device.type == "cuda":
                torch.cuda.current_stream(embeddings.device).synchronize()
            self.images_encoded_total += len(images)
            self.batches_total += 1
        return results
