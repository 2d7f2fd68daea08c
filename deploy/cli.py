"""The `epd` command line.

    epd model create-tiny DIR           write the built-in tiny checkpoint
    epd model create-tiny-vlm DIR       write the built-in tiny vision-language checkpoint
    epd generate --prompt TEXT          quick offline generation
    epd up                              local cluster: router + prefill + decode workers
    epd router | epd worker ROLE        one component each
    epd bench --url URL                 benchmark a running router
"""
from __future__ import annotations

import argparse
import sys
from typing import Callable, Sequence

from engine.config import LOAD_FORMATS
from engine.errors import ConfigError, EngineError

Handler = Callable[[argparse.Namespace], int]


def _add_model_command(sub: argparse._SubParsersAction) -> None:
    model = sub.add_parser("model", help="model utilities")
    model_sub = model.add_subparsers(dest="model_command", required=True)
    tiny = model_sub.add_parser("create-tiny", help="write the built-in tiny model into DIR")
    tiny.add_argument("directory")
    tiny.set_defaults(handler=_create_tiny)
    vlm = model_sub.add_parser("create-tiny-vlm", help="write the built-in tiny LLaVA-format model into DIR")
    vlm.add_argument("directory")
    vlm.add_argument("--vision", choices=["clip", "siglip"], default="clip", help="vision tower")
    vlm.set_defaults(handler=_create_tiny_vlm)


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    """Options shared by every command that builds an engine."""
    parser.add_argument("--model", default=None, help="model directory (default: built-in tiny model)")
    parser.add_argument("--load-format", choices=LOAD_FORMATS, default="auto",
                        help="'dummy' builds random weights from config.json alone (N(0, 0.02)); "
                             "'dummy-uniform' draws them from U(-0.001, 0.001)")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--page-size", type=int, default=16)
    parser.add_argument("--num-pages", type=int, default=1024)
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048)
    parser.add_argument("--max-num-seqs", type=int, default=64)
    parser.add_argument("--max-model-len", type=int, default=None)
    parser.add_argument("--no-prefix-cache", action="store_true")
    parser.add_argument("--max-pinned-fraction", type=float, default=0.25,
                        help="share of the KV page pool that pinned prefixes may take")
    parser.add_argument("--attention-backend", default="torch", help="torch (reference) or triton (GPU)")
    parser.add_argument("--cuda-graphs", action="store_true",
                        help="capture decode batches in CUDA graphs (needs --device cuda --attention-backend triton)")
    parser.add_argument("--no-triton-kernels", action="store_true",
                        help="GPU: run torch's norm/rotary/activation/matmul ops instead of the Triton "
                             "kernels that --attention-backend triton on CUDA turns on (for A/B runs)")
    parser.add_argument("--overlap-schedule", action="store_true",
                        help="prepare step N+1 on the CPU while the GPU runs step N (greedy requests)")
    parser.add_argument("--tensor-parallel-size", type=int, default=1, metavar="N",
                        help="run the model on N ranks (processes; one GPU each on CUDA): attention heads, "
                             "KV heads, MLP rows and the LM head split across them")
    parser.add_argument("--tensor-parallel-timeout", type=float, default=120.0, metavar="S",
                        dest="tensor_parallel_timeout_s",
                        help="bound of every collective of a tensor-parallel step (a hung rank fails the worker)")
    parser.add_argument("--speculative", choices=["ngram", "draft"], default=None,
                        help="speculative decoding: 'ngram' (prompt lookup over the request's own tokens) or "
                             "'draft' (a smaller model with the same tokenizer, --speculative-draft-model)")
    parser.add_argument("--num-speculative-tokens", type=_positive_int, default=3, metavar="K",
                        help="drafts verified per request and step (one target forward over K+1 positions)")
    parser.add_argument("--speculative-draft-model", default=None, metavar="DIR",
                        help="the draft checkpoint of --speculative draft")
    parser.add_argument("--speculative-cuda-graphs", action=argparse.BooleanOptionalAction, default=True,
                        help="with --cuda-graphs: verify steps and draft-model rounds replay CUDA graphs too "
                             "(default on; --no-speculative-cuda-graphs runs them eagerly)")
    parser.add_argument("--speculative-ngram-max", type=_positive_int, default=3, metavar="N",
                        help="--speculative ngram: the longest suffix looked up (down to 1 token)")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def speculative_options(args: argparse.Namespace) -> dict[str, object]:
    """The speculation settings; ConfigError (printed as a CLI error) when they clash."""
    if args.speculative == "draft" and not args.speculative_draft_model:
        raise ConfigError("--speculative draft needs --speculative-draft-model DIR")
    if args.speculative_draft_model and args.speculative != "draft":
        raise ConfigError("--speculative-draft-model needs --speculative draft")
    return dict(speculative=args.speculative, num_speculative_tokens=args.num_speculative_tokens,
                speculative_draft_model=args.speculative_draft_model,
                speculative_ngram_max=args.speculative_ngram_max,
                speculative_cuda_graphs=args.speculative_cuda_graphs)


def engine_options(args: argparse.Namespace) -> dict[str, object]:
    return dict(load_format=args.load_format, dtype=args.dtype, device=args.device,
                page_size=args.page_size, num_pages=args.num_pages,
                max_num_batched_tokens=args.max_num_batched_tokens, max_num_seqs=args.max_num_seqs,
                max_model_len=args.max_model_len, enable_prefix_cache=not args.no_prefix_cache,
                max_pinned_fraction=args.max_pinned_fraction,
                attention_backend=args.attention_backend, cuda_graphs=args.cuda_graphs,
                overlap_schedule=args.overlap_schedule,
                triton_kernels=False if args.no_triton_kernels else None,
                tensor_parallel_size=args.tensor_parallel_size,
                tensor_parallel_timeout_s=args.tensor_parallel_timeout_s, **speculative_options(args))


def _add_generate_command(sub: argparse._SubParsersAction) -> None:
    gen = sub.add_parser("generate", help="generate text offline from one or more prompts")
    add_engine_arguments(gen)
    gen.add_argument("--prompt", action="append", required=True, help="prompt text (repeatable)")
    gen.add_argument("--max-tokens", type=int, default=32)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=None)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    gen.set_defaults(handler=_generate)


def _create_tiny(args: argparse.Namespace) -> int:
    from engine.tiny import create_tiny_model
    path = create_tiny_model(args.directory)
    print(f"wrote the tiny model to {path}")
    return 0


def _create_tiny_vlm(args: argparse.Namespace) -> int:
    from engine.tiny_vlm import create_tiny_vlm
    path = create_tiny_vlm(args.directory, args.vision)
    print(f"wrote the tiny {args.vision} vision-language model to {path}")
    return 0


def _generate(args: argparse.Namespace) -> int:
    from engine import LLM, SamplingParams
    llm = LLM(args.model, **engine_options(args))
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, seed=args.seed)
    prompts = args.prompt
    if args.chat:
        tok = llm.get_tokenizer()
        prompts = [tok.encode(tok.apply_chat_template([{"role": "user", "content": p}]), False)
                   for p in prompts]
    for text, result in zip(args.prompt, llm.generate(prompts, params)):
        out = result.outputs[0]
        print(f"prompt: {text!r}\noutput: {out.text!r}\ntokens: {out.token_ids}\n"
              f"finish: {out.finish_reason}\n")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="epd", description="epd-serve: disaggregated LLM serving")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_model_command(sub)
    _add_generate_command(sub)
    from deploy import cluster_cli
    cluster_cli.add_commands(sub)
    from bench.client.cli import add_bench_command
    add_bench_command(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except EngineError as exc:
        print(f"epd: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
