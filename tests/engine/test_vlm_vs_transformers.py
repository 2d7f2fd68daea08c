"""A LLaVA-format checkpoint saved by transformers' save_pretrained (CLIP and SigLIP
towers): the image processor, the vision tower + projector, the engine's logits and its
greedy output against transformers on the same weights (float32)."""
from __future__ import annotations

import hashlib
import io
from pathlib import Path

import pytest
import torch
from PIL import Image

from engine import LLM, Engine, SamplingParams
from engine.image_processor import ImageProcessor, ImageProcessorConfig
from engine.multimodal import build_image_inputs, read_multimodal_info
from engine.tiny_vlm import create_tiny_vlm
from engine.vision_encoder import VisionEncoder
from tests.engine.hf_models import save_hf_llava

VISIONS = ["clip", "siglip"]


def _image(width: int, height: int, seed: int, mode: str = "RGB", fmt: str = "PNG") -> bytes:
    gen = torch.Generator().manual_seed(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    pixels = torch.randint(0, 256, (height, width, channels), generator=gen, dtype=torch.uint8).numpy()
    image = Image.fromarray(pixels[..., 0] if mode == "L" else pixels, mode)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


IMAGES = [_image(40, 30, 1), _image(100, 64, 2, fmt="JPEG"), _image(64, 200, 3, "RGBA"),
          _image(64, 64, 4, "L", "JPEG"), _image(17, 90, 5, fmt="WEBP")]


@pytest.fixture(scope="module", params=VISIONS)
def checkpoint(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    vision = request.param
    return save_hf_llava(vision, tmp_path_factory.mktemp(vision) / "model", seed=VISIONS.index(vision) + 7)


@pytest.fixture(scope="module")
def hf_model(checkpoint: Path):  # noqa: ANN201
    from transformers import LlavaForConditionalGeneration
    return LlavaForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32).eval()


def _hf_pixels(checkpoint: Path, datas: list[bytes]) -> torch.Tensor:
    from transformers import AutoImageProcessor
    processor = AutoImageProcessor.from_pretrained(checkpoint)
    images = [Image.open(io.BytesIO(d)).convert("RGB") for d in datas]
    return processor(images=images, return_tensors="pt")["pixel_values"].to(torch.float32)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_image_processor_matches_transformers(checkpoint: Path) -> None:
    ours = ImageProcessor(ImageProcessorConfig.from_pretrained(checkpoint))(
        [Image.open(io.BytesIO(d)).convert("RGB") for d in IMAGES])
    theirs = _hf_pixels(checkpoint, IMAGES)
    assert ours.shape == theirs.shape
    assert (ours - theirs).abs().max().item() <= 1e-5


def test_vision_features_match_transformers(checkpoint: Path, hf_model) -> None:  # noqa: ANN001
    encoder = VisionEncoder.from_pretrained(checkpoint)
    ours = torch.stack(encoder.encode_images(IMAGES))
    with torch.no_grad():
        theirs = hf_model.get_image_features(pixel_values=_hf_pixels(checkpoint, IMAGES))
    theirs = torch.stack(list(getattr(theirs, "pooler_output", theirs)))
    assert ours.shape == theirs.shape
    assert _rel(ours, theirs) <= 1e-5


def _prompt(checkpoint: Path, images: list[bytes], text: str) -> tuple[list[int], list]:
    from engine.tokenizer import Tokenizer
    tokenizer = Tokenizer.from_pretrained(checkpoint)
    ids = tokenizer.encode(text)
    info = read_multimodal_info(checkpoint)
    assert info is not None
    return build_image_inputs(ids, images, info)


def _hf_logits(hf_model, checkpoint: Path, ids: list[int], images: list[bytes]) -> torch.Tensor:  # noqa: ANN001
    with torch.no_grad():
        out = hf_model(input_ids=torch.tensor([ids]), pixel_values=_hf_pixels(checkpoint, images))
    return out.logits[0]


def test_engine_logits_match_transformers(checkpoint: Path, hf_model) -> None:  # noqa: ANN001
    images = IMAGES[:2]
    ids, inputs = _prompt(checkpoint, images, "Compare <image> with <image> and say why.")
    theirs = _hf_logits(hf_model, checkpoint, ids, images)
    # Prompts ending at an image's last token, just after an image, and at the end: the
    # engine's logits of the last position against transformers' at that position.
    engine = Engine(checkpoint, dtype="float32", enable_prefix_cache=False)
    for end in (inputs[0].end, inputs[1].end + 1, len(ids)):
        engine.add_request(ids[:end], SamplingParams(max_tokens=1), images=[i for i in inputs if i.offset < end])
        engine.step()
        assert not engine.has_unfinished_requests()
        assert _rel(engine.last_logits[0], theirs[end - 1]) <= 1e-4, end


def test_chunked_prefill_splitting_images_matches(checkpoint: Path, hf_model) -> None:  # noqa: ANN001
    """A token budget of 5 splits every image over several steps."""
    images = IMAGES[1:4]
    ids, inputs = _prompt(checkpoint, images, "<image><image> then <image>: what changed?")
    theirs = _hf_logits(hf_model, checkpoint, ids, images)[-1]
    engine = Engine(checkpoint, dtype="float32", max_num_batched_tokens=5, enable_prefix_cache=False)
    engine.add_request(ids, SamplingParams(max_tokens=1), images=inputs)
    steps = 0
    while engine.has_unfinished_requests():
        engine.step()
        steps += 1
    assert steps >= len(ids) // 5
    assert _rel(engine.last_logits[0], theirs) <= 1e-4


def test_greedy_matches_transformers_with_cache_hits(checkpoint: Path, hf_model) -> None:  # noqa: ANN001
    llm = LLM(str(checkpoint), dtype="float32")
    cases = [("Look: <image> and tell me.", [IMAGES[0]]), ("<image> vs <image>?", [IMAGES[2], IMAGES[3]]),
             ("Look: <image> and tell me more, please.", [IMAGES[0]]),  # prefix hit through the image
             ("Look: <image> and tell me.", [IMAGES[4]])]  # same tokens, another image: no hit past it
    params = SamplingParams(max_tokens=16, temperature=0.0)
    outputs = [llm.generate({"prompt": text, "images": images}, params)[0] for text, images in cases]
    for (text, images), out in zip(cases, outputs):
        ids, _ = _prompt(checkpoint, images, text)
        with torch.no_grad():
            ref = hf_model.generate(input_ids=torch.tensor([ids]), pixel_values=_hf_pixels(checkpoint, images),
                                    attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                    max_new_tokens=16, do_sample=False)
        assert out.outputs[0].token_ids == ref[0, len(ids):].tolist(), text
    assert sum(len(out.outputs[0].token_ids) for out in outputs) >= 32  # not all stopping at once
    image_start = outputs[0].prompt_token_ids.index(read_multimodal_info(checkpoint).image_token_id)
    assert outputs[2].num_cached_tokens > image_start  # the cached pages include image positions
    assert outputs[3].num_cached_tokens <= image_start  # a different image is never a hit


@pytest.mark.parametrize("vision", VISIONS)
def test_tiny_vlm_is_byte_identical(tmp_path: Path, vision: str) -> None:
    def digest(directory: Path) -> dict[str, str]:
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}
    first = digest(create_tiny_vlm(tmp_path / "a", vision))
    assert first == digest(create_tiny_vlm(tmp_path / "b", vision))
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "preprocessor_config.json"} <= set(first)


def test_tiny_vlm_loads_in_transformers(tmp_path: Path) -> None:
    from transformers import LlavaForConditionalGeneration
    path = create_tiny_vlm(tmp_path / "m", "clip")
    model = LlavaForConditionalGeneration.from_pretrained(path, dtype=torch.float32)
    ours = torch.stack(VisionEncoder.from_pretrained(path).encode_images(IMAGES[:2]))
    with torch.no_grad():
        theirs = model.get_image_features(pixel_values=_hf_pixels(path, IMAGES[:2]))
    theirs = torch.stack(list(getattr(theirs, "pooler_output", theirs)))
    assert _rel(ours, theirs) <= 1e-5
