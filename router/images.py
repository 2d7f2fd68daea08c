"""Images of a request at the router: from OpenAI `image_url` parts (or the gRPC API's
bytes) to checked image bytes, and the prompt with each image placeholder expanded.

Every image is decoded once here so that a bad one is refused with a 400 before any
worker sees it; the workers decode again from the bytes (they never trust the router's
pixels, and bytes are what the embedding caches key on). http(s) URLs are fetched only
when the router allows it, with a size limit and a timeout.
"""
from __future__ import annotations

import urllib.error
import urllib.request
from typing import Sequence

from engine.errors import InvalidRequestError
from engine.multimodal import ImageInput, MultimodalInfo, build_image_inputs, decode_image, parse_data_url
from router.config import RouterConfig
from router.errors import InvalidRequest


class ImageLoader:
    def __init__(self, config: RouterConfig, info: MultimodalInfo | None) -> None:
        self.config = config
        self.info = info

    def load(self, sources: Sequence[object], param: str = "messages") -> list[bytes]:
        """The checked bytes of each image source (a URL string or raw bytes)."""
        if not sources:
            return []
        if self.info is None:
            raise InvalidRequest("this model does not take images", param=param)
        limit = self.config.max_images_per_request
        if len(sources) > limit:
            raise InvalidRequest(f"the request has {len(sources)} images; at most {limit} are accepted "
                                 "(--max-images-per-request)", param=param)
        out = []
        for index, source in enumerate(sources):
            try:
                data = self._bytes(source)
                decode_image(data, self.config.max_image_pixels)
            except InvalidRequestError as exc:
                raise InvalidRequest(f"image {index}: {exc}", param=param) from None
            out.append(data)
        return out

    def expand(self, prompt: list[int], images: Sequence[bytes],
               param: str = "messages") -> tuple[list[int], list[ImageInput]]:
        """The prompt with placeholders expanded and its images; a text-only prompt of a
        vision-language model must hold no image placeholder."""
        if self.info is None:
            return prompt, []
        if not images and self.info.image_token_id not in prompt:
            return prompt, []
        try:
            return build_image_inputs(prompt, images, self.info)
        except InvalidRequestError as exc:
            raise InvalidRequest(str(exc), param=param) from None

    def _bytes(self, source: object) -> bytes:
        max_bytes = self.config.max_image_bytes
        if isinstance(source, (bytes, bytearray)):
            if len(source) > max_bytes:
                raise InvalidRequestError(f"the image is {len(source)} bytes; the size limit is {max_bytes} bytes")
            return bytes(source)
        if not isinstance(source, str):
            raise InvalidRequestError("an image must be given as a URL")
        if source.startswith("data:"):
            return parse_data_url(source, max_bytes)
        if source.startswith(("http://", "https://")):
            if not self.config.allow_image_urls:
                raise InvalidRequestError("http(s) image URLs are disabled on this server; send the image "
                                          "as a data: URL (or start the router with --allow-image-urls)")
            return self._fetch(source, max_bytes)
        raise InvalidRequestError("the image URL must be a data: URL (or http(s) where allowed)")

    def _fetch(self, url: str, max_bytes: int) -> bytes:
        request = urllib.request.Request(url, headers={"User-Agent": "epd-serve"})
        try:
            with urllib.request.urlopen(request, timeout=self.config.image_fetch_timeout) as response:  # noqa: S310
                kind = response.headers.get_content_type()
                if not kind.startswith("image/"):
                    raise InvalidRequestError(f"the image URL returned {kind!r}, not an image")
                data = response.read(max_bytes + 1)
        except InvalidRequestError:
            raise
        except (urllib.error.URLError, OSError, ValueError) as exc:
            raise InvalidRequestError(f"the image URL could not be fetched: {exc}") from None
        if len(data) > max_bytes:
            raise InvalidRequestError(f"the image is over the size limit of {max_bytes} bytes")
        return data
