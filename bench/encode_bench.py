"""Vision encode throughput: the encode worker's path (engine.vision_encoder: decode,
preprocess, vision tower + projector, batched) against transformers' image processor +
`LlavaForConditionalGeneration.get_image_features` on the same weights, in one run.

    python -m bench.encode_bench --preset tiny                # CPU, the built-in tiny VLM
    python -m bench.encode_bench --preset llava-1.5-7b --device cuda --dtype bfloat16

`llava-1.5-7b` is that checkpoint's vision side (CLIP ViT-L/14 at 336 px, 577 positions,
layer -2, a 2-layer GELU projector to 4096) with random weights; its language model is
cut to one small layer (only its hidden size matters here). Both sides get the same
encoded PNGs, batch by batch; images/s counts from bytes to embeddings. Also reports the
largest difference between the two outputs (a correctness check, not only a speed one).
"""
from __future__ import annotations

import argparse
import io
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

from engine.tiny_vlm import create_tiny_vlm, vlm_config
from engine.vision_encoder import VisionEncoder

CLIP_MEAN, CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]


def llava_15_7b_config(text_preset: str | None = None) -> dict:
    """llava-1.5-7b's vision side; the language model cut to one small layer, or the
    `text_preset` architecture of bench.presets (with the tiny tokenizer's vocabulary)."""
    config = vlm_config("clip")
    config["vision_config"] = {"model_type": "clip_vision_model", "hidden_size": 1024, "intermediate_size": 4096,
                               "num_hidden_layers": 24, "num_attention_heads": 16, "image_size": 336,
                               "patch_size": 14, "num_channels": 3, "hidden_act": "quick_gelu",
                               "layer_norm_eps": 1e-5, "attention_dropout": 0.0, "projection_dim": 768}
    text = dict(config["text_config"], hidden_size=4096, intermediate_size=256, num_hidden_layers=1,
                num_attention_heads=32, num_key_value_heads=32, head_dim=128)
    if text_preset is not None:
        from bench.presets import PRESETS
        keep = ("vocab_size", "bos_token_id", "eos_token_id", "model_type")
        text = {**{k: v for k, v in PRESETS[text_preset].items() if k not in ("architectures", "dtype")},
                **{k: config["text_config"][k] for k in keep}}
        config["dtype"] = "bfloat16"
    config.update(text_config=text, image_seq_length=576, vision_feature_select_strategy="default",
                  vision_feature_layer=-2)
    return config


def write_checkpoint(preset: str, directory: Path, text_preset: str | None = None) -> Path:
    extras = create_tiny_vlm(directory / "tiny", "clip")
    if preset == "tiny":
        return extras
    from transformers import LlavaConfig, LlavaForConditionalGeneration
    path = directory / (preset if text_preset is None else f"{preset}-{text_preset}")
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(LlavaConfig(**llava_15_7b_config(text_preset)))
    if text_preset is not None:
        model = model.to(torch.bfloat16)
    model.save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(extras / name, path / name)
    (path / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": 336},
        "resample": 3, "do_center_crop": True, "crop_size": {"height": 336, "width": 336}, "do_rescale": True,
        "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": CLIP_MEAN, "image_std": CLIP_STD,
        "do_convert_rgb": True}))
    return path


def images(count: int, size: int) -> list[bytes]:
    gen = torch.Generator().manual_seed(0)
    out = []
    for _ in range(count):
        pixels = torch.randint(0, 256, (size, size + size // 3, 3), generator=gen, dtype=torch.uint8).numpy()
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG")
        out.append(buffer.getvalue())
    return out


def timed(fn, repeats: int, device: torch.device) -> float:  # noqa: ANN001
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=["tiny", "llava-1.5-7b"], default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--batch", type=int, action="append", help="images per call (repeatable)")
    parser.add_argument("--image-size", type=int, default=256, help="height of the PNGs (width is 4/3 of it)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", help="write the rows as JSON here")
    parser.add_argument("--save-checkpoint", metavar="DIR",
                        help="only write the checkpoint under DIR (for serving runs) and exit")
    parser.add_argument("--text", default=None, help="with --save-checkpoint: the language model's "
                        "bench.presets architecture (default: one small layer)")
    args = parser.parse_args(argv)
    if args.save_checkpoint:
        print(write_checkpoint(args.preset, Path(args.save_checkpoint), args.text))
        return 0
    from transformers import AutoImageProcessor, LlavaForConditionalGeneration

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    batches = args.batch or [1, 8, 32]
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        path = write_checkpoint(args.preset, Path(scratch))
        ours = VisionEncoder.from_pretrained(path, device, dtype)
        ours.max_batch = max(batches)
        hf = LlavaForConditionalGeneration.from_pretrained(path, dtype=dtype).to(device).eval()
        processor = AutoImageProcessor.from_pretrained(path)
        for batch in batches:
            datas = images(batch, args.image_size)

            def run_ours() -> torch.Tensor:
                return torch.stack(ours.encode_images(datas))

            @torch.inference_mode()
            def run_hf() -> torch.Tensor:
                pil = [Image.open(io.BytesIO(d)).convert("RGB") for d in datas]
                pixels = processor(images=pil, return_tensors="pt")["pixel_values"].to(device, dtype)
                features = hf.get_image_features(pixel_values=pixels)
                features = getattr(features, "pooler_output", features)
                return torch.stack(list(features))

            diff = (run_ours().float() - run_hf().float()).abs().max().item()
            t_ours, t_hf = timed(run_ours, args.repeats, device), timed(run_hf, args.repeats, device)
            rows.append({"preset": args.preset, "device": str(device), "dtype": args.dtype, "batch": batch,
                         "ours_images_per_s": batch / t_ours, "transformers_images_per_s": batch / t_hf,
                         "speedup": t_hf / t_ours, "max_abs_diff": diff,
                         "tokens_per_image": ours.info.num_image_tokens,
                         "transformers_processor": type(processor).__name__})
            print(f"{args.preset} {device} {args.dtype} batch {batch:3d}: ours {batch / t_ours:9.1f} images/s, "
                  f"transformers {batch / t_hf:9.1f} images/s (x{t_hf / t_ours:.2f}); max |diff| {diff:.2e} "
                  f"({type(processor).__name__})",
                  flush=True)
    print("command: python -m bench.encode_bench " + " ".join(sys.argv[1:] if argv is None else argv))
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
