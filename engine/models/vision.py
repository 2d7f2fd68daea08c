"""The vision half of a LLaVA-format checkpoint: a CLIP or SigLIP vision tower and the
multimodal projector that maps its features into the language model's embedding space.

Module names mirror the checkpoint's (`vision_tower.embeddings.patch_embedding`, ...,
`multi_modal_projector.linear_1`), so loading is a copy by name. Only the encoder layers
up to the deepest feature layer are built: LLaVA reads an inner layer (-2 by default),
and later layers, the post-layernorm and any pooling head would be dead weight.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from engine.errors import ConfigError

_ACTIVATIONS = {
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_fast": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
}
_TOWERS = {"clip_vision_model": "clip", "siglip_vision_model": "siglip"}


def activation(name: str) -> Any:
    if name not in _ACTIVATIONS:
        raise ConfigError(f"unsupported activation {name!r}; supported: {sorted(_ACTIVATIONS)}")
    return _ACTIVATIONS[name]


@dataclass(frozen=True)
class VisionConfig:
    kind: str  # "clip" (class token, pre-layernorm, no patch bias) or "siglip"
    hidden_size: int
    intermediate_size: int
    num_layers: int  # built: the deepest feature layer
    num_heads: int
    image_size: int
    patch_size: int
    num_channels: int
    layer_norm_eps: float
    hidden_act: str
    feature_layers: tuple[int, ...]  # indices into [embeddings, layer 1, ..., layer L]
    drop_first: bool  # the "default" select strategy drops output position 0
    projector_act: str
    projector_bias: bool
    text_hidden_size: int

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def num_positions(self) -> int:
        return self.num_patches + (1 if self.kind == "clip" else 0)

    @property
    def num_image_tokens(self) -> int:
        return self.num_positions - int(self.drop_first)

    @classmethod
    def from_llava(cls, raw: dict[str, Any]) -> VisionConfig:
        vision = raw.get("vision_config")
        if not isinstance(vision, dict):
            raise ConfigError("config.json has no vision_config: not a vision-language checkpoint")
        kind = _TOWERS.get(vision.get("model_type", "clip_vision_model"))
        if kind is None:
            raise ConfigError(f"unsupported vision tower {vision.get('model_type')!r}; supported: {sorted(_TOWERS)}")
        total = int(vision.get("num_hidden_layers", 12))
        layers = raw.get("vision_feature_layer", -2)
        layers = [layers] if isinstance(layers, int) else list(layers)
        # hidden_states has total + 1 entries: the embeddings, then each layer's output.
        resolved = tuple(layer + total + 1 if layer < 0 else layer for layer in layers)
        if not all(0 <= layer <= total for layer in resolved):
            raise ConfigError(f"vision_feature_layer {layers} is outside the tower's {total} layers")
        strategy = raw.get("vision_feature_select_strategy", "default")
        if strategy not in ("default", "full"):
            raise ConfigError(f"unsupported vision_feature_select_strategy {strategy!r}")
        text = raw.get("text_config") or {}
        default_act = "quick_gelu" if kind == "clip" else "gelu_pytorch_tanh"
        return cls(kind=kind, hidden_size=int(vision.get("hidden_size", 768)),
                   intermediate_size=int(vision.get("intermediate_size", 3072)), num_layers=max(resolved),
                   num_heads=int(vision.get("num_attention_heads", 12)), image_size=int(vision.get("image_size", 224)),
                   patch_size=int(vision.get("patch_size", 16)), num_channels=int(vision.get("num_channels", 3)),
                   layer_norm_eps=float(vision.get("layer_norm_eps", 1e-5 if kind == "clip" else 1e-6)),
                   hidden_act=str(vision.get("hidden_act", default_act)), feature_layers=resolved,
                   drop_first=strategy == "default", projector_act=str(raw.get("projector_hidden_act", "gelu")),
                   projector_bias=bool(raw.get("multimodal_projector_bias", True)),
                   text_hidden_size=int(text.get("hidden_size", 4096)))


class Embeddings(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.kind = config.kind
        self.patch_embedding = nn.Conv2d(config.num_channels, config.hidden_size, config.patch_size,
                                         stride=config.patch_size, bias=config.kind == "siglip")
        if config.kind == "clip":
            self.class_embedding = nn.Parameter(torch.zeros(config.hidden_size))
        self.position_embedding = nn.Embedding(config.num_positions, config.hidden_size)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embedding(pixels.to(self.patch_embedding.weight.dtype))  # [N, D, H/P, W/P]
        x = patches.flatten(2).transpose(1, 2)  # [N, patches, D]
        if self.kind == "clip":
            x = torch.cat([self.class_embedding.expand(x.shape[0], 1, -1), x], dim=1)
        return x + self.position_embedding.weight  # [N, positions, D]


class SelfAttention(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        dim = config.hidden_size
        self.num_heads = config.num_heads
        self.head_dim = dim // config.num_heads
        self.q_proj, self.k_proj = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.v_proj, self.out_proj = nn.Linear(dim, dim), nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, positions, dim = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:  # [N, S, D] -> [N, heads, S, head_dim]
            return t.view(n, positions, self.num_heads, self.head_dim).transpose(1, 2)

        out = F.scaled_dot_product_attention(heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x)),
                                             scale=1.0 / math.sqrt(self.head_dim))  # bidirectional
        return self.out_proj(out.transpose(1, 2).reshape(n, positions, dim))


class MLP(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)
        self.act = activation(config.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class EncoderLayer(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = SelfAttention(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class Encoder(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(config) for _ in range(config.num_layers))


class VisionTower(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = Embeddings(config)
        self.pre_layrnorm = (nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
                             if config.kind == "clip" else None)
        self.encoder = Encoder(config)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """The selected features [N, image tokens, hidden * len(feature_layers)]."""
        x = self.embeddings(pixels)
        if self.pre_layrnorm is not None:
            x = self.pre_layrnorm(x)
        states = [x]
        for layer in self.encoder.layers:
            states.append(layer(states[-1]))
        features = [states[i] for i in self.config.feature_layers]
        if self.config.drop_first:
            features = [f[:, 1:] for f in features]
        return torch.cat(features, dim=-1)


class Projector(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        width = config.hidden_size * len(config.feature_layers)
        self.linear_1 = nn.Linear(width, config.text_hidden_size, bias=config.projector_bias)
        self.linear_2 = nn.Linear(config.text_hidden_size, config.text_hidden_size, bias=config.projector_bias)
        self.act = activation(config.projector_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(x)))


class LlavaVision(nn.Module):
    """Pixels [N, C, H, W] -> image embeddings [N, image tokens, text hidden]."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.config = config
        self.vision_tower = VisionTower(config)
        self.multi_modal_projector = Projector(config)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.multi_modal_projector(self.vision_tower(pixels))


def checkpoint_name(hf_name: str) -> str | None:
    """Our parameter name for a checkpoint tensor of the vision half; None for a tensor
    of the language model. Accepts transformers' layouts (`vision_tower.embeddings...`,
    `model.vision_tower...`) and the published one (`vision_tower.vision_model...`)."""
    name = hf_name.removeprefix("model.")
    if name.startswith("vision_tower."):
        return "vision_tower." + name.removeprefix("vision_tower.").removeprefix("vision_model.")
    if name.startswith("multi_modal_projector."):
        return name
    return None
