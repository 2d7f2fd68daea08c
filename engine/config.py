"""Model and engine configuration.

`ModelConfig` is read from a Hugging Face `config.json`; `EngineConfig` holds the
serving knobs (page size, pool size, token budget). Both are frozen: a running engine
never changes its shape.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.errors import ConfigError

# Random weights from config.json alone (engine.loader.dummy_values draws them).
DUMMY_FORMATS = ("dummy", "dummy-uniform")
LOAD_FORMATS = ("auto", *DUMMY_FORMATS)  # "auto": the checkpoint's safetensors

if TYPE_CHECKING:
    import torch

SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "MistralForCausalLM": "llama",
}

# Names only: this module stays torch-free (the router reads model configs without torch).
DTYPE_NAMES = ("float32", "float16", "bfloat16")


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype named `name` (one of DTYPE_NAMES)."""
    import torch  # deferred: only the engine, never the router, asks for a tensor dtype

    if name not in DTYPE_NAMES:
        raise ConfigError(f"unsupported dtype {name!r}; choose one of {sorted(DTYPE_NAMES)}")
    return getattr(torch, name)


@dataclass(frozen=True)
class RopeConfig:
    theta: float = 10000.0
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class ModelConfig:
    architecture: str  # one of SUPPORTED_ARCHITECTURES' values
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    rope: RopeConfig
    tie_word_embeddings: bool
    qkv_bias: bool
    qk_norm: bool
    eos_token_ids: tuple[int, ...]
    bos_token_id: int | None
    dtype: str = "float32"

    @property
    def torch_dtype(self) -> torch.dtype:
        return torch_dtype(self.dtype)

    @property
    def num_parameters(self) -> int:
        """Parameter count (embeddings counted once when tied)."""
        h, i, v = self.hidden_size, self.intermediate_size, self.vocab_size
        q = self.num_heads * self.head_dim
        kv = self.num_kv_heads * self.head_dim
        per_layer = h * (q + 2 * kv) + q * h + 3 * h * i + 2 * h
        head = 0 if self.tie_word_embeddings else v * h
        return v * h + head + self.num_layers * per_layer + h

    @staticmethod
    def from_dict(raw: dict[str, Any], dtype: str | None = None) -> ModelConfig:
        return _parse_config(raw, dtype)

    @staticmethod
    def from_pretrained(path: str | Path, dtype: str | None = None) -> ModelConfig:
        config_path = Path(path) / "config.json"
        if not Path(path).is_dir():
            raise ConfigError(f"model directory not found: {path}")
        if not config_path.is_file():
            raise ConfigError(f"no config.json in model directory {path}")
        try:
            raw = json.loads(config_path.read_text())
        except json.JSONDecodeError as exc:
            raise ConfigError(f"malformed config.json in {path}: {exc}") from exc
        if not isinstance(raw, dict):
            raise ConfigError(f"malformed config.json in {path}: expected a JSON object")
        return _parse_config(raw, dtype)


def _require(raw: dict[str, Any], key: str, kind: type) -> Any:
    if key not in raw:
        raise ConfigError(f"config.json is missing required field {key!r}")
    value = raw[key]
    if kind is int and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
        raise ConfigError(f"config.json field {key!r} must be a positive integer, got {value!r}")
    if kind is float and not isinstance(value, (int, float)):
        raise ConfigError(f"config.json field {key!r} must be a number, got {value!r}")
    return value


def _parse_rope(raw: dict[str, Any]) -> RopeConfig:
    # transformers 5 writes `rope_parameters`; older checkpoints `rope_theta` + `rope_scaling`.
    params = dict(raw.get("rope_parameters") or {})
    scaling = raw.get("rope_scaling") or {}
    params = {**scaling, **params}
    theta = float(params.get("rope_theta", raw.get("rope_theta", 10000.0)))
    rope_type = params.get("rope_type", params.get("type", "default")) or "default"
    if rope_type not in ("default", "llama3"):
        raise ConfigError(f"unsupported rope type {rope_type!r} (supported: default, llama3)")
    if rope_type == "default":
        return RopeConfig(theta=theta)
    return RopeConfig(
        theta=theta,
        rope_type=rope_type,
        factor=float(params["factor"]),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(params["original_max_position_embeddings"]),
    )


def _eos_ids(raw: dict[str, Any]) -> tuple[int, ...]:
    eos = raw.get("eos_token_id")
    if eos is None:
        return ()
    return tuple(eos) if isinstance(eos, list) else (int(eos),)


def _parse_config(raw: dict[str, Any], dtype: str | None) -> ModelConfig:
    if isinstance(raw.get("text_config"), dict) and "vision_config" in raw:
        # A vision-language (LLaVA-format) checkpoint: this is its language model; the
        # vision half is engine.vision_encoder's. The dtype lives at the top level.
        text = {"model_type": "llama", **raw["text_config"]}
        for key in ("dtype", "torch_dtype", "tie_word_embeddings"):
            if key not in text and key in raw:
                text[key] = raw[key]
        return _parse_config(text, dtype)
    archs = raw.get("architectures") or []
    model_type = raw.get("model_type")
    arch = next((SUPPORTED_ARCHITECTURES[a] for a in archs if a in SUPPORTED_ARCHITECTURES), None)
    if arch is None and model_type in ("llama", "qwen2", "qwen3", "mistral"):
        arch = "llama" if model_type == "mistral" else model_type
    if arch is None:
        raise ConfigError(
            f"unsupported architecture {archs or model_type!r}; "
            f"supported: {sorted(SUPPORTED_ARCHITECTURES)}"
        )
    hidden = _require(raw, "hidden_size", int)
    heads = _require(raw, "num_attention_heads", int)
    kv_heads = raw.get("num_key_value_heads") or heads
    if heads % kv_heads:
        raise ConfigError(f"num_attention_heads={heads} is not a multiple of num_key_value_heads={kv_heads}")
    head_dim = raw.get("head_dim") or hidden // heads
    chosen = dtype or raw.get("dtype") or raw.get("torch_dtype") or "float32"
    if chosen not in DTYPE_NAMES:
        raise ConfigError(f"unsupported dtype {chosen!r}; choose one of {sorted(DTYPE_NAMES)}")
    return ModelConfig(
        architecture=arch,
        vocab_size=_require(raw, "vocab_size", int),
        hidden_size=hidden,
        intermediate_size=_require(raw, "intermediate_size", int),
        num_layers=_require(raw, "num_hidden_layers", int),
        num_heads=heads,
        num_kv_heads=int(kv_heads),
        head_dim=int(head_dim),
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        max_position_embeddings=int(raw.get("max_position_embeddings", 4096)),
        rope=_parse_rope(raw),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        qkv_bias=arch == "qwen2" or bool(raw.get("attention_bias", False)),
        qk_norm=arch == "qwen3",
        eos_token_ids=_eos_ids(raw),
        bos_token_id=raw.get("bos_token_id"),
        dtype=chosen,
    )


@dataclass(frozen=True)
class EngineConfig:
    """Serving knobs. Defaults suit the CPU tiny model; GPU deployments raise them."""

    page_size: int = 16
    num_pages: int = 1024
    max_num_batched_tokens: int = 2048  # token budget of one step (chunked prefill)
    max_num_seqs: int = 64  # running requests at most
    max_model_len: int | None = None  # defaults to the model's max_position_embeddings
    enable_prefix_cache: bool = True
    # Pinned prefixes (system prompts, tool definitions) may take at most this share of
    # the page pool; sessions (engine/sessions.py) keep at most max_sessions turns' KV,
    # each for session_idle_timeout_s without a new turn. Both need the prefix cache.
    max_pinned_fraction: float = 0.25
    max_sessions: int = 1024
    session_idle_timeout_s: float = 300.0
    device: str = "cpu"
    dtype: str | None = None  # overrides config.json's dtype
    # "auto" (safetensors), "dummy" (random weights, N(0, 0.02)) or "dummy-uniform"
    # (U(-0.001, 0.001), as vLLM's dummy loader: degenerate, looping greedy text)
    load_format: str = "auto"
    seed: int = 0
    attention_backend: str = "torch"
    # GPU path (issue 5): Triton norm/rotary/activation/skinny-matmul kernels, CUDA graphs
    # for decode batches (padded up to the next captured size), and overlap scheduling
    # (the CPU prepares step N+1 while the GPU runs step N). triton_kernels None: on
    # exactly when the device is CUDA and the attention backend is Triton (before, the
    # served workers never turned them on and ran the torch ops: issue 13).
    triton_kernels: bool | None = None
    cuda_graphs: bool = False
    cuda_graph_batch_sizes: tuple[int, ...] = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)
    overlap_schedule: bool = False
    # Tensor parallelism (issue 18, engine/parallel/): ranks of one engine, rank 0 in this
    # process and the others as child processes; 1 builds none of it. The timeout bounds
    # every collective of a step (and the ranks' start-up handshake).
    tensor_parallel_size: int = 1
    tensor_parallel_timeout_s: float = 120.0
    # Speculative decoding (issue 17, engine/spec/): None (off) or a drafter's registry
    # name ("ngram": prompt lookup over the request's own tokens; "draft": a smaller
    # checkpoint with the same tokenizer, `speculative_draft_model`). Each decode step
    # verifies up to num_speculative_tokens drafts per request in one target forward.
    speculative: str | None = None
    num_speculative_tokens: int = 3
    speculative_draft_model: str | None = None
    speculative_ngram_max: int = 3  # longest suffix n-gram looked up (down to 1)
    # With cuda_graphs: verify steps (1 + K tokens per row) and the draft model's rounds
    # replay CUDA graphs of their own (off: they run eagerly; decode steps keep their
    # graphs). On one H100 (2026-12-07) n-gram speculation at batch 1 gave 1.67 ms ITL
    # with them against 5.51 ms eager (bench.spec_bench, BENCHMARKS.md).
    speculative_cuda_graphs: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    def with_overrides(self, **changes: Any) -> EngineConfig:
        return replace(self, **changes)

    @property
    def uses_triton_kernels(self) -> bool:
        if self.triton_kernels is not None:
            return self.triton_kernels
        return self.device.startswith("cuda") and self.attention_backend == "triton"

    def validate(self) -> None:
        for name in ("page_size", "num_pages", "max_num_batched_tokens", "max_num_seqs"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(self.max_pinned_fraction, (int, float)) or not 0 <= self.max_pinned_fraction <= 1:
            raise ConfigError(f"max_pinned_fraction must be in [0, 1], got {self.max_pinned_fraction!r}")
        if not isinstance(self.max_sessions, int) or self.max_sessions < 0:
            raise ConfigError(f"max_sessions must be a non-negative integer, got {self.max_sessions!r}")
        if not self.session_idle_timeout_s > 0:
            raise ConfigError(f"session_idle_timeout_s must be > 0, got {self.session_idle_timeout_s!r}")
        if self.load_format not in LOAD_FORMATS:
            raise ConfigError(f"load_format must be one of {', '.join(LOAD_FORMATS)}, got {self.load_format!r}")
        if self.cuda_graphs and (not self.device.startswith("cuda") or self.attention_backend != "triton"):
            raise ConfigError("cuda_graphs needs device 'cuda' and attention_backend 'triton'")
        self._validate_tensor_parallel()
        self._validate_speculative()

    def _validate_speculative(self) -> None:
        """What can be checked without loading anything (engine/spec/draft_model.py
        checks the draft checkpoint's vocabulary against the target's)."""
        if self.speculative is None:
            return
        from engine.spec.drafter import drafter_names  # deferred: the router reads configs without torch
        if self.speculative not in drafter_names():
            raise ConfigError(f"unknown speculative method {self.speculative!r}; available: {drafter_names()}")
        k = self.num_speculative_tokens
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ConfigError(f"num_speculative_tokens must be a positive integer, got {k!r}")
        n = self.speculative_ngram_max
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ConfigError(f"speculative_ngram_max must be a positive integer, got {n!r}")
        if self.speculative == "draft" and not self.speculative_draft_model:
            raise ConfigError("speculative 'draft' needs speculative_draft_model (a checkpoint directory)")
        if self.speculative != "draft" and self.speculative_draft_model:
            raise ConfigError(f"speculative_draft_model is set but speculative is {self.speculative!r}, not 'draft'")

    def _validate_tensor_parallel(self) -> None:
        """What can be checked without the model (engine.parallel.layout checks the
        model's heads and widths)."""
        size = self.tensor_parallel_size
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ConfigError(f"tensor_parallel_size must be a positive integer, got {size!r}")
        if not self.tensor_parallel_timeout_s > 0:
            raise ConfigError(f"tensor_parallel_timeout_s must be > 0, got {self.tensor_parallel_timeout_s!r}")
        if size > 1 and (self.cuda_graphs or self.overlap_schedule):
            raise ConfigError("tensor_parallel_size > 1 does not run with cuda_graphs or overlap_schedule yet")
