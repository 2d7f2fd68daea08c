"""Images to embeddings for a LLaVA-format checkpoint: decode, preprocess, vision tower,
projector. The encode worker runs one; so does an engine that encodes its own images
(aggregated encode on prefill or decode, and the offline `LLM`)."""
from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch
from safetensors import safe_open

from engine.config import torch_dtype
from engine.errors import ConfigError
from engine.image_processor import ImageProcessor, ImageProcessorConfig
from engine.loader import safetensors_files
from engine.models.vision import LlavaVision, VisionConfig, checkpoint_name
from engine.multimodal import DEFAULT_MAX_IMAGE_PIXELS, InvalidImageError, MultimodalInfo, decode_image, read_multimodal_info

if TYPE_CHECKING:
    from PIL import Image


class VisionEncoder:
    def __init__(self, model: LlavaVision, processor: ImageProcessor, info: MultimodalInfo,
                 max_batch: int = 32) -> None:
        self.model = model
        self.processor = processor
        self.info = info
        self.max_batch = max_batch
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device = "cpu",
                        dtype: str | torch.dtype | None = None) -> VisionEncoder:
        path = Path(path)
        raw = json.loads((path / "config.json").read_text())
        config = VisionConfig.from_llava(raw)
        info = read_multimodal_info(path)
        if info is None:
            raise ConfigError(f"{path} is not a vision-language checkpoint (no vision_config / image token)")
        if info.num_image_tokens != config.num_image_tokens:
            raise ConfigError(f"image token count mismatch: {info.num_image_tokens} vs {config.num_image_tokens}")
        torch_dtype = _resolve_dtype(dtype, raw)
        with torch.device("meta"):
            model = LlavaVision(config)
        model = model.to_empty(device=torch.device(device))
        _load(model, path)
        model = model.to(dtype=torch_dtype).eval()
        return cls(model, ImageProcessor(ImageProcessorConfig.from_pretrained(path)), info)

    @property
    def embedding_bytes(self) -> int:
        return self.info.num_image_tokens * self.info.hidden_size * self.dtype.itemsize

    def decode(self, datas: Sequence[bytes],
               max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> list[Image.Image | InvalidImageError]:
        """Each image decoded, or the InvalidImageError saying why not; in parallel
        (Pillow releases the GIL while it decodes)."""
        def one(data: bytes) -> Image.Image | InvalidImageError:
            try:
                return decode_image(data, max_pixels)
            except InvalidImageError as exc:
                return exc
        return list(_map(one, datas))

    def preprocess(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """uint8 pixels [N, 3, H, W] on the CPU (resized and cropped, in parallel);
        `encode` normalizes them on the device."""
        arrays = list(_map(self.processor.geometry, images))
        pixels = torch.from_numpy(np.stack(arrays))
        return pixels.pin_memory() if self.device.type == "cuda" else pixels

    @torch.inference_mode()
    def encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[N, num_image_tokens, hidden] in the language model's dtype, on the device,
        from `preprocess`'s uint8 pixels (or already normalized float pixels)."""
        pixels = pixel_values.to(self.device, non_blocking=True)
        if pixels.dtype == torch.uint8:
            pixels = self.processor.normalize(pixels)
        pixels = pixels.to(self.dtype)
        chunks = [self.model(part) for part in pixels.split(self.max_batch)]
        return torch.cat(chunks) if len(chunks) > 1 else chunks[0]

    def encode_images(self, datas: Sequence[bytes],
                      max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> list[torch.Tensor]:
        """Each image's embeddings [num_image_tokens, hidden]; InvalidImageError names
        the first bad image by its index."""
        images = self.decode(datas, max_pixels)
        for index, image in enumerate(images):
            if isinstance(image, InvalidImageError):
                raise InvalidImageError(f"image {index}: {image}") from None
        if not images:
            return []
        return list(self.encode(self.preprocess(images)).unbind(0))  # type: ignore[arg-type]


_POOL: ThreadPoolExecutor | None = None


def _map(fn, items: Sequence):  # noqa: ANN001, ANN202 - a typed map over a shared pool
    """`map(fn, items)` on a process-wide pool of image threads (inline for one item)."""
    global _POOL
    if len(items) <= 1:
        return [fn(item) for item in items]
    if _POOL is None:
        _POOL = ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1), thread_name_prefix="epd-image")
    return _POOL.map(fn, items)


def _resolve_dtype(dtype: str | torch.dtype | None, raw: dict) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    text = raw.get("text_config") or {}
    name = dtype or text.get("dtype") or text.get("torch_dtype") or raw.get("dtype") or raw.get("torch_dtype") \
        or "float32"
    return torch_dtype(name)


def _load(model: LlavaVision, path: Path) -> None:
    """Copy the vision tower's and projector's tensors by name; tensors of layers past
    the deepest feature layer, the post-layernorm and pooling heads are not needed."""
    params = dict(model.named_parameters())
    filled: set[str] = set()
    for file in safetensors_files(path):
        with safe_open(str(file), framework="pt", device="cpu") as handle:
            for hf_name in handle.keys():
                name = checkpoint_name(hf_name)
                if name is None or name not in params:
                    if name is not None and not _unused(name, model.config.num_layers):
                        raise ConfigError(f"unexpected vision tensor {hf_name!r} in {file.name}")
                    continue
                tensor = handle.get_tensor(hf_name)
                if tuple(tensor.shape) != tuple(params[name].shape):
                    raise ConfigError(f"tensor {hf_name!r} has shape {tuple(tensor.shape)}, "
                                      f"model expects {tuple(params[name].shape)}")
                params[name].data.copy_(tensor.to(params[name].dtype))
                filled.add(name)
    missing = sorted(set(params) - filled)
    if missing:
        raise ConfigError(f"checkpoint {path} lacks vision weights for: {', '.join(missing[:8])}")


def _unused(name: str, built_layers: int) -> bool:
    parts = name.split(".")
    if name.startswith("vision_tower.encoder.layers.") and int(parts[3]) >= built_layers:
        return True
    return name.startswith(("vision_tower.post_layernorm.", "vision_tower.head.")) or name.endswith("position_ids")
