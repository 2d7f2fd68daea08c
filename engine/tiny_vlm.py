"""The built-in tiny vision-language model: a LLaVA-format checkpoint with seeded random
weights (a tiny CLIP or SigLIP tower, the projector, the tiny Llama text model), the tiny
tokenizer plus an `<image>` token, a chat template that renders image content parts as
`<image>`, and a preprocessor config; written byte-identically each time. Each image
becomes 16 image tokens (64x64 pixels in 16x16 patches)."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from engine.tiny import SPECIAL_TOKENS, TINY_CONFIG, VOCAB_SIZE, _weights, build_tokenizer

IMAGE_TOKEN = "<image>"
IMAGE_TOKEN_ID = VOCAB_SIZE  # appended after the tiny vocabulary
CLIP_MEAN, CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
_VISION = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
           "image_size": 64, "patch_size": 16, "num_channels": 3, "attention_dropout": 0.0}
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
    "{% if message['content'] is string %}{{ message['content'] | trim }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


def vlm_config(vision: str) -> dict:
    if vision not in ("clip", "siglip"):
        raise ValueError(f"vision tower must be 'clip' or 'siglip', got {vision!r}")
    text = {k: v for k, v in TINY_CONFIG.items() if k not in ("architectures", "dtype")}
    text["vocab_size"] = VOCAB_SIZE + 1
    tower = dict(_VISION, model_type=f"{vision}_vision_model",
                 hidden_act="quick_gelu" if vision == "clip" else "gelu_pytorch_tanh",
                 layer_norm_eps=1e-5 if vision == "clip" else 1e-6)
    return {"architectures": ["LlavaForConditionalGeneration"], "model_type": "llava", "dtype": "float32",
            "image_token_index": IMAGE_TOKEN_ID, "image_seq_length": 16, "projector_hidden_act": "gelu",
            "multimodal_projector_bias": True, "vision_feature_layer": -2,
            # CLIP drops its class token ("default"); SigLIP has none and keeps all 16 patches.
            "vision_feature_select_strategy": "default" if vision == "clip" else "full",
            "tie_word_embeddings": False, "text_config": text, "vision_config": tower}


def _vision_weights(config: dict, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed + 1)
    vision, hidden = config["vision_config"], config["vision_config"]["hidden_size"]
    inter, text_hidden = vision["intermediate_size"], config["text_config"]["hidden_size"]
    patches = (vision["image_size"] // vision["patch_size"]) ** 2
    clip = vision["model_type"] == "clip_vision_model"

    def mat(*shape: int) -> torch.Tensor:
        fan_in = 1
        for dim in shape[1:]:
            fan_in *= dim
        return torch.randn(*shape, generator=gen) / fan_in**0.5

    def small(n: int) -> torch.Tensor:
        return 0.1 * torch.randn(n, generator=gen)

    t = {"vision_tower.embeddings.patch_embedding.weight": mat(hidden, 3, vision["patch_size"], vision["patch_size"]),
         "vision_tower.embeddings.position_embedding.weight": torch.randn(patches + clip, hidden, generator=gen)}
    if clip:
        t["vision_tower.embeddings.class_embedding"] = torch.randn(hidden, generator=gen)
        t["vision_tower.pre_layrnorm.weight"], t["vision_tower.pre_layrnorm.bias"] = torch.ones(hidden), small(hidden)
    else:
        t["vision_tower.embeddings.patch_embedding.bias"] = small(hidden)
    for i in range(vision["num_hidden_layers"]):
        p = f"vision_tower.encoder.layers.{i}."
        for norm in ("layer_norm1", "layer_norm2"):
            t[p + norm + ".weight"], t[p + norm + ".bias"] = torch.ones(hidden), small(hidden)
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            t[p + f"self_attn.{proj}.weight"], t[p + f"self_attn.{proj}.bias"] = mat(hidden, hidden), small(hidden)
        t[p + "mlp.fc1.weight"], t[p + "mlp.fc1.bias"] = mat(inter, hidden), small(inter)
        t[p + "mlp.fc2.weight"], t[p + "mlp.fc2.bias"] = mat(hidden, inter), small(hidden)
    t["vision_tower.post_layernorm.weight"], t["vision_tower.post_layernorm.bias"] = torch.ones(hidden), small(hidden)
    # Projected embeddings on the scale of the text embeddings (unit variance per entry).
    t["multi_modal_projector.linear_1.weight"], t["multi_modal_projector.linear_1.bias"] = (
        mat(text_hidden, hidden) * 2.0, small(text_hidden))
    t["multi_modal_projector.linear_2.weight"], t["multi_modal_projector.linear_2.bias"] = (
        mat(text_hidden, text_hidden) * 2.0, small(text_hidden))
    return t


def _weights_of(config: dict, seed: int) -> dict[str, torch.Tensor]:
    """transformers' own LLaVA layout: `language_model.model.*`, `language_model.lm_head`."""
    text = {**config["text_config"]}
    tensors = {"language_model." + k: v for k, v in _weights(text, seed).items()}
    tensors.update(_vision_weights(config, seed))
    return {k: v.contiguous() for k, v in sorted(tensors.items())}


def _preprocessor(vision: str) -> dict:
    if vision == "clip":
        return {"image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": 64},
                "resample": 3, "do_center_crop": True, "crop_size": {"height": 64, "width": 64},
                "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": CLIP_MEAN,
                "image_std": CLIP_STD, "do_convert_rgb": True}
    return {"image_processor_type": "SiglipImageProcessor", "do_resize": True, "size": {"height": 64, "width": 64},
            "resample": 3, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
            "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "do_convert_rgb": True}


def _dump(path: Path, value: dict) -> None:
    path.write_text(json.dumps(value, indent=2, sort_keys=True) + "\n")


def create_tiny_vlm(directory: str | Path, vision: str = "clip", seed: int = 0) -> Path:
    """Write the tiny VLM into `directory` (created; existing files replaced)."""
    directory = Path(directory)
    config = vlm_config(vision)
    directory.mkdir(parents=True, exist_ok=True)
    _dump(directory / "config.json", config)
    save_file(_weights_of(config, seed), str(directory / "model.safetensors"))
    tokenizer = build_tokenizer()
    tokenizer.add_special_tokens([IMAGE_TOKEN])
    assert tokenizer.token_to_id(IMAGE_TOKEN) == IMAGE_TOKEN_ID
    tokenizer.save(str(directory / "tokenizer.json"))
    _dump(directory / "tokenizer_config.json", {
        "bos_token": SPECIAL_TOKENS[0], "eos_token": "<|eot_id|>", "pad_token": "<|end_of_text|>",
        "chat_template": CHAT_TEMPLATE, "model_max_length": TINY_CONFIG["max_position_embeddings"],
        "tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
        "image_token": IMAGE_TOKEN})
    _dump(directory / "generation_config.json", {"bos_token_id": TINY_CONFIG["bos_token_id"],
                                                 "eos_token_id": TINY_CONFIG["eos_token_id"]})
    _dump(directory / "preprocessor_config.json", _preprocessor(vision))
    return directory
