"""The built-in tiny model: a Llama-architecture checkpoint with seeded random weights
and a byte-level BPE tokenizer with a chat template, written byte-identically each time.

Weights are scaled so logits are well separated (greedy decoding is stable under the
rounding differences between batch shapes), which random N(0, 0.02) weights are not.
"""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

SPECIAL_TOKENS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                  "<|end_header_id|>", "<|eot_id|>"]
VOCAB_SIZE = 512
TINY_CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": VOCAB_SIZE,
    "hidden_size": 64, "intermediate_size": 192, "num_hidden_layers": 4,
    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
    "max_position_embeddings": 1024, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
    "tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False,
    "hidden_act": "silu", "dtype": "float32",
    "bos_token_id": VOCAB_SIZE - len(SPECIAL_TOKENS), "eos_token_id": VOCAB_SIZE - 1,
}
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
    "{{ message['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
_CORPUS = """
The quick brown fox jumps over the lazy dog. A serving cluster splits inference into
encode, prefill and decode pools behind one router. Each pool scales on its own, and
the key value cache moves between pools through a pluggable transfer layer. Hello world!
What is the capital of France? The capital of France is Paris. Tell me a story about a
robot who learns to paint. Once upon a time there was a little robot that wanted to see
the colors of the sky. It worked every day and every night, and the people of the town
came to watch. def main(): print("hello") return 0 for i in range(10): x = x + i
Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000. Questions, answers, requests and responses;
tokens, pages, prompts and completions. The model generates text one token at a time.
"""

def _learn_merges(text: str, count: int) -> list[tuple[str, str]]:
    """Deterministic byte-level BPE: most frequent pair first, ties by the pair itself."""
    pre = pre_tokenizers.ByteLevel(add_prefix_space=False)
    words = Counter(tuple(w) for w, _ in pre.pre_tokenize_str(text))
    merges: list[tuple[str, str]] = []
    while len(merges) < count:
        pairs: Counter[tuple[str, str]] = Counter()
        for word, freq in words.items():
            for pair in zip(word, word[1:]):
                pairs[pair] += freq
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        words = Counter({_merge(w, best): f for w, f in words.items()})
    return merges

def _merge(word: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    out, i = [], 0
    while i < len(word):
        if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
            out.append(word[i] + word[i + 1])
            i += 2
        else:
            out.append(word[i])
            i += 1
    return tuple(out)

def build_tokenizer() -> Tokenizer:
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    merges = _learn_merges(_CORPUS, VOCAB_SIZE - len(alphabet) - len(SPECIAL_TOKENS))
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(SPECIAL_TOKENS)
    bos = SPECIAL_TOKENS[0]
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tokenizer.token_to_id(bos))])
    return tokenizer

def _weights(config: dict, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    q = config["num_attention_heads"] * config["head_dim"]
    kv = config["num_key_value_heads"] * config["head_dim"]

    def mat(rows: int, cols: int, gain: float = 1.0) -> torch.Tensor:
        return torch.randn(rows, cols, generator=gen) * (gain / cols**0.5)

    tensors = {"model.embed_tokens.weight": torch.randn(config["vocab_size"], hidden, generator=gen)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        tensors.update({
            p + "input_layernorm.weight": torch.ones(hidden),
            p + "post_attention_layernorm.weight": torch.ones(hidden),
            p + "self_attn.q_proj.weight": mat(q, hidden, 2.0),
            p + "self_attn.k_proj.weight": mat(kv, hidden, 2.0),
            p + "self_attn.v_proj.weight": mat(kv, hidden),
            p + "self_attn.o_proj.weight": mat(hidden, q),
            p + "mlp.gate_proj.weight": mat(inter, hidden),
            p + "mlp.up_proj.weight": mat(inter, hidden),
            p + "mlp.down_proj.weight": mat(hidden, inter),
        })
    tensors["model.norm.weight"] = torch.ones(hidden)
    tensors["lm_head.weight"] = mat(config["vocab_size"], hidden, 4.0)
    return {k: v.contiguous() for k, v in tensors.items()}

def create_tiny_model(directory: str | Path, seed: int = 0) -> Path:
    """Write the tiny checkpoint into `directory` (created; existing files replaced)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(TINY_CONFIG, indent=2, sort_keys=True) + "\n")
    save_file(_weights(TINY_CONFIG, seed), str(directory / "model.safetensors"))
    build_tokenizer().save(str(directory / "tokenizer.json"))
    tokenizer_config = {
        "bos_token": SPECIAL_TOKENS[0], "eos_token": "<|eot_id|>", "pad_token": "<|end_of_text|>",
        "chat_template": CHAT_TEMPLATE, "model_max_length": TINY_CONFIG["max_position_embeddings"],
        "tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2, sort_keys=True) + "\n")
    (directory / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": TINY_CONFIG["bos_token_id"], "eos_token_id": TINY_CONFIG["eos_token_id"]},
        indent=2, sort_keys=True) + "\n")
    return directory
