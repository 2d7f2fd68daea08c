"""Images in prompts: the pieces that router, workers and engine share.

A prompt with images holds, for each image, a run of `num_image_tokens` placeholder
tokens (the checkpoint's image token id). The model replaces those tokens' embeddings
with the image's embeddings (vision tower + projector output). An image is named by the
sha256 of its encoded bytes: the embedding caches key on it, and so does the prefix
cache, through `cache_keys`, so that the same image at the same place is a cache hit
while a different image behind the same placeholder tokens never is.

Invariant: `ImageInput`s of one prompt are in prompt order and their token ranges
[offset, offset + num_tokens) do not overlap and lie inside the prompt.
"""
from __future__ import annotations

import hashlib
import io
import json
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from engine.errors import InvalidRequestError

if TYPE_CHECKING:
    import torch
    from PIL import Image

# Prefix-cache keys of image positions live above every vocabulary (and below 2**32,
# which the radix cache's page hash packs each key into).
_KEY_BASE = 1 << 31
_KEY_MASK = (1 << 31) - 1
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP")
DEFAULT_MAX_IMAGE_PIXELS = 4096 * 4096


class InvalidImageError(InvalidRequestError):
    """An image cannot be decoded (not an image, truncated, unsupported format, too big)."""


@dataclass(frozen=True)
class ImageInput:
    """One image of a prompt. `data` (encoded bytes) is what an encoder needs;
    `embedding` ([num_tokens, hidden], the language model's dtype) replaces it once
    the image is encoded. A worker that only keeps KV (decode) needs neither."""

    hash: str
    offset: int
    num_tokens: int
    data: bytes | None = None
    embedding: torch.Tensor | None = None

    @property
    def end(self) -> int:
        return self.offset + self.num_tokens

    def with_embedding(self, embedding: torch.Tensor) -> ImageInput:
        return replace(self, embedding=embedding)


@dataclass(frozen=True)
class MultimodalInfo:
    """What the router and the workers need to know of a vision-language checkpoint."""

    image_token_id: int
    image_token: str | None  # its text in prompts (e.g. "<image>"), when the tokenizer has one
    num_image_tokens: int  # placeholder tokens per image
    hidden_size: int  # the language model's; embeddings are [num_image_tokens, hidden_size]


def image_hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
    """The decoded RGB image, or InvalidImageError naming what is wrong with `data`."""
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise InvalidImageError("the image is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            if image.format not in IMAGE_FORMATS:
                raise InvalidImageError(f"unsupported image format {image.format}; "
                                        f"supported: {', '.join(IMAGE_FORMATS)}")
            width, height = image.size
            if width * height > max_pixels:
                raise InvalidImageError(f"the image has {width}x{height} pixels; "
                                        f"at most {max_pixels} pixels are accepted")
            image.load()
    except InvalidImageError:
        raise
    except UnidentifiedImageError:
        raise InvalidImageError("the data is not an image (PNG, JPEG or WebP)") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombWarning,
            Image.DecompressionBombError) as exc:
        raise InvalidImageError(f"the image cannot be decoded (truncated or corrupt): {exc}") from None
    return image.convert("RGB")


def expand_placeholders(token_ids: Sequence[int], info: MultimodalInfo,
                        num_images: int) -> tuple[list[int], list[int]]:
    """(token ids with each image token repeated `num_image_tokens` times, the offset of
    each image's first token). The prompt must hold exactly one image token per image."""
    found = sum(1 for t in token_ids if t == info.image_token_id)
    if found != num_images:
        raise InvalidRequestError(
            f"the prompt has {found} image placeholder(s) but {num_images} image(s) were given; "
            "each image needs exactly one placeholder")
    expanded: list[int] = []
    offsets: list[int] = []
    for token in token_ids:
        if token == info.image_token_id:
            offsets.append(len(expanded))
            expanded.extend([token] * info.num_image_tokens)
        else:
            expanded.append(token)
    return expanded, offsets


def check_images(token_ids: Sequence[int], images: Sequence[ImageInput],
                 image_token_id: int | None) -> None:
    """InvalidRequestError unless every image covers placeholder tokens only, in prompt
    order, without overlap, and every placeholder token belongs to an image."""
    if not images:
        if image_token_id is not None and image_token_id in token_ids:
            raise InvalidRequestError("the prompt has image placeholders but no images were given")
        return
    if image_token_id is None:
        raise InvalidRequestError("this model does not take images")
    previous_end = 0
    for index, image in enumerate(images):
        if image.num_tokens <= 0 or image.offset < previous_end or image.end > len(token_ids):
            raise InvalidRequestError(f"image {index} covers tokens [{image.offset}, {image.end}), "
                                      "outside the prompt or overlapping the image before it")
        if any(token_ids[i] != image_token_id for i in range(image.offset, image.end)):
            raise InvalidRequestError(f"image {index}'s tokens [{image.offset}, {image.end}) "
                                      "are not all image placeholders")
        previous_end = image.end
    covered = sum(image.num_tokens for image in images)
    if sum(1 for t in token_ids if t == image_token_id) != covered:
        raise InvalidRequestError("the prompt has image placeholders that no image covers")


def image_keys(image_hash_hex: str, count: int) -> list[int]:
    """Prefix-cache keys of an image's `count` positions: 31-bit slices of its hash,
    rotating, above every vocabulary (a page of 16 keys carries 248 bits of the hash)."""
    digest = int(image_hash_hex, 16)
    slices = [_KEY_BASE | ((digest >> (31 * i)) & _KEY_MASK) for i in range(8)]
    return [slices[i % 8] for i in range(count)]


def cache_keys(token_ids: Sequence[int], images: Sequence[ImageInput]) -> list[int]:
    """`token_ids` with each image's positions replaced by keys derived from its hash:
    what the prefix cache (and the router's prefix index) see instead of the tokens."""
    keys = list(token_ids)
    for image in images:
        keys[image.offset:image.end] = image_keys(image.hash, image.num_tokens)
    return keys


def read_multimodal_info(model_path: str | Path) -> MultimodalInfo | None:
    """The image settings of a LLaVA-format checkpoint; None for a text-only model."""
    path = Path(model_path)
    try:
        raw = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if not isinstance(raw, dict) or "vision_config" not in raw:
        return None
    token_id = raw.get("image_token_index", raw.get("image_token_id"))
    if not isinstance(token_id, int):
        return None
    vision = raw["vision_config"]
    patches = (int(vision.get("image_size", 224)) // int(vision.get("patch_size", 14))) ** 2
    # LLaVA's "default" strategy drops the tower's first output position (CLIP's class
    # token; SigLIP has none, so there it drops a patch); "full" keeps every position.
    has_class_token = vision.get("model_type", "clip_vision_model") == "clip_vision_model"
    dropped = 1 if raw.get("vision_feature_select_strategy", "default") == "default" else 0
    count = patches + int(has_class_token) - dropped
    text = raw.get("text_config") or {}
    return MultimodalInfo(token_id, _token_text(path, token_id), count, int(text.get("hidden_size", 0)))


def _token_text(path: Path, token_id: int) -> str | None:
    try:
        from tokenizers import Tokenizer
        return Tokenizer.from_file(str(path / "tokenizer.json")).id_to_token(token_id)
    except Exception:  # noqa: BLE001 - tokenizers raises plain Exception; no text then
        return None


def build_image_inputs(token_ids: Sequence[int], images: Sequence[bytes],
                       info: MultimodalInfo) -> tuple[list[int], list[ImageInput]]:
    """(the prompt with each image placeholder expanded, one ImageInput per image with
    its bytes and hash): what the router and the offline API make of a prompt and its
    images. The bytes are not decoded here (`decode_image` checks them)."""
    expanded, offsets = expand_placeholders(token_ids, info, len(images))
    inputs = [ImageInput(image_hash(data), offset, info.num_image_tokens, data=data)
              for data, offset in zip(images, offsets)]
    return expanded, inputs


DATA_URL_MEDIA_TYPES = ("image/png", "image/jpeg", "image/jpg", "image/webp")


def parse_data_url(url: str, max_bytes: int) -> bytes:
    """The bytes of a base64 `data:image/...` URL; InvalidImageError says what is wrong
    (not a data URL, a media type that is not an image, bad base64, too big)."""
    import base64
    import binascii

    if not url.startswith("data:"):
        raise InvalidImageError("the image URL is not a data: URL")
    header, comma, payload = url[5:].partition(",")
    if not comma:
        raise InvalidImageError("the data URL has no ',' before its data")
    fields = [f.strip().lower() for f in header.split(";")]
    media_type = fields[0]
    if media_type not in DATA_URL_MEDIA_TYPES:
        raise InvalidImageError(f"the data URL's media type is {media_type or 'missing'!r}; "
                                f"images must be one of {', '.join(DATA_URL_MEDIA_TYPES)}")
    if "base64" not in fields[1:]:
        raise InvalidImageError("the data URL is not base64-encoded (';base64' is missing)")
    # Base64 is 4 characters per 3 bytes: refuse an oversized image before decoding it.
    if len(payload) > 4 * (-(-max_bytes // 3)) + 4:
        raise InvalidImageError(f"the image is over the size limit of {max_bytes} bytes")
    try:
        data = base64.b64decode(payload.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise InvalidImageError("the data URL's base64 data is malformed") from None
    if len(data) > max_bytes:
        raise InvalidImageError(f"the image is {len(data)} bytes; the size limit is {max_bytes} bytes")
    return data


def split_chat_images(messages: Sequence[dict]) -> tuple[list[dict], list[object]]:
    """(messages for a chat template, each image's source in prompt order). An
    `image_url` part (OpenAI) or `image` part becomes `{"type": "image"}`, which the
    template renders as the image placeholder; its source is the URL string or the
    part's `image` value. Content without images is joined into one string, as for
    text-only models. Raises InvalidRequestError for a malformed part."""
    out: list[dict] = []
    sources: list[object] = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise InvalidRequestError(f"messages[{index}] must be an object with a role and content")
        content = message.get("content")
        entry = dict(message)
        if isinstance(content, list):
            parts: list[dict] = []
            for part in content:
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "text" and isinstance(part.get("text"), str):
                    parts.append({"type": "text", "text": part["text"]})
                elif kind == "image_url":
                    url = part.get("image_url")
                    url = url.get("url") if isinstance(url, dict) else url
                    if not isinstance(url, str) or not url:
                        raise InvalidRequestError(f"messages[{index}]: an image_url part needs a url")
                    sources.append(url)
                    parts.append({"type": "image"})
                elif kind == "image" and part.get("image") is not None:
                    sources.append(part["image"])
                    parts.append({"type": "image"})
                else:
                    raise InvalidRequestError(f"messages[{index}]: unsupported content part {kind!r}; "
                                              "use text, image_url or image parts")
            if any(p["type"] == "image" for p in parts):
                entry["content"] = parts
            else:
                entry["content"] = "".join(p["text"] for p in parts)
        out.append(entry)
    return out, sources


def image_bytes(source: object, max_bytes: int = 20 << 20) -> bytes:
    """Encoded image bytes of an offline image input: bytes, a PIL image (saved as
    PNG), a `data:` URL, or a local file path. Remote URLs are the router's business."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source)
    if isinstance(source, str) and source.startswith("data:"):
        return parse_data_url(source, max_bytes)
    if isinstance(source, str) and source.startswith(("http://", "https://")):
        raise InvalidImageError("the offline API does not fetch remote image URLs; pass bytes or a path")
    if isinstance(source, (str, Path)):
        path = Path(source).expanduser()
        if not path.is_file():
            raise InvalidImageError(f"image file not found: {source}")
        return path.read_bytes()
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - Pillow is a dependency
        Image = None  # type: ignore[assignment]
    if Image is not None and isinstance(source, Image.Image):
        buffer = io.BytesIO()
        source.save(buffer, format="PNG")
        return buffer.getvalue()
    raise InvalidImageError(f"an image must be bytes, a PIL image, a data: URL or a path, "
                            f"not {type(source).__name__}")
