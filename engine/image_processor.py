"""Image preprocessing as a checkpoint's `preprocessor_config.json` describes it, with
Pillow and numpy: convert to RGB, resize (shortest edge to a size keeping the aspect
ratio, CLIP-style; or to a fixed height x width, SigLIP-style) with the configured
resampling filter, center crop, rescale, normalize. The same steps in the same order and
precision as transformers' Pillow image processors (checked against them in the tests).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

from engine.errors import ConfigError

_KNOWN = {"image_processor_type", "processor_class", "do_resize", "size", "resample", "do_center_crop",
          "crop_size", "do_rescale", "rescale_factor", "do_normalize", "image_mean", "image_std",
          "do_convert_rgb", "default_to_square", "feature_extractor_type", "use_square_size"}
_IGNORABLE = {"image_seq_length", "num_image_tokens", "patch_size", "vision_feature_select_strategy",
              "disable_grouping", "data_format", "input_data_format", "return_tensors", "device",
              "do_pad", "pad_size", "processor_class", "crop_pct"}


@dataclass(frozen=True)
class ImageProcessorConfig:
    shortest_edge: int | None  # resize so the short side is this (aspect kept) ...
    resize_to: tuple[int, int] | None  # ... or to exactly (height, width)
    resample: int
    crop: tuple[int, int] | None  # center crop (height, width)
    rescale_factor: float | None
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None
    convert_rgb: bool

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ImageProcessorConfig:
        unknown = sorted(set(raw) - _KNOWN - _IGNORABLE)
        if unknown:
            raise ConfigError(f"preprocessor_config.json has unsupported fields {unknown}")
        kind = str(raw.get("image_processor_type", ""))
        if kind and not kind.startswith(("CLIPImageProcessor", "SiglipImageProcessor")):
            raise ConfigError(f"unsupported image processor {kind!r} (supported: CLIPImageProcessor, "
                              "SiglipImageProcessor)")
        size = raw.get("size", {"shortest_edge": 224}) if raw.get("do_resize", True) else None
        shortest, resize_to = None, None
        if isinstance(size, int):
            size = {"shortest_edge": size} if not raw.get("default_to_square", True) else {"height": size, "width": size}
        if size and raw.get("use_square_size") and "shortest_edge" in size:
            size = {"height": size["shortest_edge"], "width": size["shortest_edge"]}
        if size and "shortest_edge" in size:
            shortest = int(size["shortest_edge"])
        elif size and "height" in size and "width" in size:
            resize_to = (int(size["height"]), int(size["width"]))
        elif size:
            raise ConfigError(f"preprocessor_config.json size {size} needs shortest_edge or height and width")
        crop = raw.get("crop_size") if raw.get("do_center_crop", False) else None
        if isinstance(crop, int):
            crop = {"height": crop, "width": crop}
        normalize = raw.get("do_normalize", True)
        return cls(shortest_edge=shortest, resize_to=resize_to, resample=int(raw.get("resample", 3)),
                   crop=(int(crop["height"]), int(crop["width"])) if crop else None,
                   rescale_factor=float(raw.get("rescale_factor", 1 / 255)) if raw.get("do_rescale", True) else None,
                   mean=tuple(raw.get("image_mean", (0.5, 0.5, 0.5))) if normalize else None,
                   std=tuple(raw.get("image_std", (0.5, 0.5, 0.5))) if normalize else None,
                   convert_rgb=bool(raw.get("do_convert_rgb", True)))

    @classmethod
    def from_pretrained(cls, path: str | Path) -> ImageProcessorConfig:
        file = Path(path) / "preprocessor_config.json"
        if not file.is_file():
            raise ConfigError(f"no preprocessor_config.json in {path}")
        try:
            return cls.from_dict(json.loads(file.read_text()))
        except json.JSONDecodeError as exc:
            raise ConfigError(f"malformed preprocessor_config.json in {path}: {exc}") from exc


class ImageProcessor:
    def __init__(self, config: ImageProcessorConfig) -> None:
        self.config = config

    def __call__(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """float32 pixel values [N, 3, H, W]."""
        return self.normalize(torch.from_numpy(np.stack([self.geometry(image) for image in images])))

    def one(self, image: Image.Image) -> np.ndarray:
        """One image's float32 pixel values [3, H, W]."""
        return self.normalize(torch.from_numpy(self.geometry(image))[None])[0].numpy()

    def geometry(self, image: Image.Image) -> np.ndarray:
        """RGB conversion, resize and center crop: uint8 [3, H, W]. Everything after this
        is arithmetic (`normalize`), which can run batched on the encoder's device."""
        c = self.config
        if c.convert_rgb and image.mode != "RGB":
            image = image.convert("RGB")
        size = self._output_size(image.width, image.height)
        if size is not None:
            image = image.resize((size[1], size[0]), resample=c.resample)
        pixels = np.asarray(image)  # [H, W, 3] uint8
        if c.crop is not None:
            pixels = _center_crop(pixels, *c.crop)
        return np.ascontiguousarray(pixels.transpose(2, 0, 1))

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 [N, 3, H, W] (any device) to float32 pixel values: rescaled in float64
        then rounded to float32, normalized in float32, as transformers' processor does
        in numpy (so the result is the same to the bit)."""
        c = self.config
        if c.rescale_factor is not None:
            array = (pixels.to(torch.float64) * c.rescale_factor).to(torch.float32)
        else:
            array = pixels.to(torch.float32)
        if c.mean is not None and c.std is not None:
            mean = torch.tensor(c.mean, dtype=torch.float32, device=array.device)[:, None, None]
            std = torch.tensor(c.std, dtype=torch.float32, device=array.device)[:, None, None]
            array = (array - mean) / std
        return array

    def _output_size(self, width: int, height: int) -> tuple[int, int] | None:
        """(height, width) after resizing."""
        c = self.config
        if c.resize_to is not None:
            return c.resize_to
        if c.shortest_edge is None:
            return None
        short, long = (width, height) if width <= height else (height, width)
        new_long = int(c.shortest_edge * long / short)
        return (new_long, c.shortest_edge) if width <= height else (c.shortest_edge, new_long)


def _center_crop(pixels: np.ndarray, height: int, width: int) -> np.ndarray:
    """Crop [H, W, C] to the center (height, width); a smaller image is zero-padded first."""
    h, w = pixels.shape[:2]
    if h < height or w < width:
        padded = np.zeros((max(h, height), max(w, width), pixels.shape[2]), dtype=pixels.dtype)
        top, left = (padded.shape[0] - h) // 2, (padded.shape[1] - w) // 2
        padded[top:top + h, left:left + w] = pixels
        pixels, h, w = padded, padded.shape[0], padded.shape[1]
    top, left = (h - height) // 2, (w - width) // 2
    return pixels[top:top + height, left:left + width]
