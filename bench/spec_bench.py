"""Speculative decoding's inter-token latency (issue 17), offline on one engine.

For each setting (no speculation; n-gram with K in --ngram-k; a draft model with K in
--draft-k) and each batch size, runs B greedy requests of a self-echo workload and
prints the mean ITL beside the measured acceptance length (tokens a verify step emits
per request; 1.0 = nothing accepted). The draft model is a 1-layer model of the
target's hidden shape (random weights, like the target's with --load-format dummy).

Workload (self-echo, like quoting or editing text): for each request a random seed
prompt P of --prompt-len / 2 tokens; the target, without speculation, continues P
greedily for --output-len tokens (T); the request's prompt is P + T + P. Where the
target continues that with T again, n-gram lookup finds T in the context; whether it
does is the model's business (random weights have no induction heads): acceptance is
measured, never assumed, and `echo` reports how many tokens of T the no-speculation
output repeats before it diverges (the ceiling of what lookup can get accepted).

Workload `--workload repeat`: each prompt is a random pattern of --period tokens repeated
to --prompt-len (a repetitive input; with random weights the output of a long repetitive
context tends to settle into a run or short cycle, which lookup drafts; measured, as above).

Workload `--workload continue`: for each request a random seed S of 16 tokens; the target,
without speculation, continues S greedily for --prompt-len - 16 + --output-len tokens (G);
the request's prompt is S + G up to --prompt-len, and its expected output the rest of G.
The workload is as repetitive as the target's own greedy text: where that has fallen into
a loop (degenerate repetition), lookup drafts it. `echo` reports how many tokens of the
expected output the no-speculation run reproduces first.

`--load-format dummy-uniform` draws the random weights from U(-0.001, 0.001), as vLLM's
dummy loader does, instead of N(0, 0.02): each token's embedding then dominates the
residual stream, the next token is mostly a function of the current one, and greedy text
falls into loops, so the continue workload becomes repetitive. With N(0, 0.02) the
Llama-3.1-8B shape's greedy text did not repeat (lookup ceiling 1.00, one H100, 2026-12-07).

For each n-gram setting `ceiling` is the acceptance length lookup would reach on the
no-speculation outputs (every draft checked against them): what the drafter offers on this
workload, whatever the verify step costs.

  python -m bench.spec_bench --model tiny                      # CPU smoke run
  python -m bench.spec_bench --model llama-3.1-8b --device cuda # the GPU run (bench/spec_gpu.sh)
"""
from __future__ import annotations

import argparse
import json
import random
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine import Engine, SamplingParams
from engine.config import DUMMY_FORMATS


@dataclass(frozen=True)
class Setting:
    name: str
    options: dict[str, Any]


@dataclass(frozen=True)
class Result:
    setting: str
    batch: int
    itl_ms: float
    acceptance_length: float  # 1.0 without speculation
    tokens: int
    echo: float  # mean tokens of each request's T that its output repeats first
    ceiling: float | None = None  # n-gram settings: lookup's acceptance length on the reference outputs


def write_models(model: str, root: Path) -> tuple[Path, Path]:
    """(target, 1-layer draft) checkpoint directories for a preset or the tiny model."""
    root.mkdir(parents=True, exist_ok=True)
    if model == "tiny":
        from engine.model_path import default_model_path
        from engine.tiny import create_tiny_model
        draft = create_tiny_model(root / "tiny-draft", seed=11)
        _keep_one_layer(draft)
        return default_model_path(), draft
    from bench.presets import write_model_dir
    target = write_model_dir(model, root / model)
    draft = write_model_dir(model, root / f"{model}-draft-1layer")
    config = json.loads((draft / "config.json").read_text())
    config["num_hidden_layers"] = 1
    (draft / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return target, draft


def _keep_one_layer(directory: Path) -> None:
    from safetensors.torch import load_file, save_file
    config = json.loads((directory / "config.json").read_text())
    config["num_hidden_layers"] = 1
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    weights = load_file(str(directory / "model.safetensors"))
    kept = {k: v for k, v in weights.items() if not k.startswith("model.layers.") or k.startswith("model.layers.0.")}
    save_file(kept, str(directory / "model.safetensors"))


def seeds(count: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, min(vocab, 32000)) for _ in range(length)] for _ in range(count)]


@dataclass(frozen=True)
class Echo:
    """Prompts P + T + P and each one's T (the target's own greedy continuation of P)."""

    prompts: list[list[int]]
    continuations: list[list[int]]

    def first(self, count: int) -> Echo:
        return Echo(self.prompts[:count], self.continuations[:count])


def repeat_workload(count: int, prompt_len: int, period: int, vocab: int, seed: int) -> Echo:
    """`count` repetitive requests: a random pattern of `period` tokens repeated to
    `prompt_len` (no continuation to echo: the output is the model's business)."""
    patterns = seeds(count, period, vocab, seed)
    return Echo([(p * (prompt_len // period + 1))[:prompt_len] for p in patterns], [[] for _ in patterns])


def continue_workload(engine: Engine, count: int, prompt_len: int, output_len: int, seed: int,
                      seed_len: int = 16) -> Echo:
    """`count` requests continuing the target's own greedy text (module docstring);
    `engine` must not speculate."""
    assert engine.speculation is None
    seed_len = min(seed_len, prompt_len)
    starts = seeds(count, seed_len, engine.model_config.vocab_size, seed)
    texts, _ = run_batch(engine, starts, prompt_len - seed_len + output_len)
    return Echo([s + g[:prompt_len - seed_len] for s, g in zip(starts, texts)],
                [g[prompt_len - seed_len:] for g in texts])


def lookup_ceiling(prompts: list[list[int]], outputs: list[list[int]], max_n: int, k: int) -> float:
    """Mean tokens per verify step that n-gram lookup (K drafts, suffixes up to max_n)
    would get accepted if the verified output were `outputs` (greedy: a draft token is
    accepted while it equals the output's next token; each step adds one more)."""
    import numpy as np

    from engine.spec.ngram import lookup
    steps = emitted = 0
    for prompt, output in zip(prompts, outputs):
        done = 0
        while done < len(output):
            context = np.asarray(prompt + output[:done], dtype=np.int64)
            drafts = lookup(context, max_n, min(k, len(output) - done - 1))
            accepted = 0
            while accepted < len(drafts) and drafts[accepted] == output[done + accepted]:
                accepted += 1
            steps += 1
            emitted += accepted + 1
            done += accepted + 1
    return emitted / max(1, steps)


def echo_workload(engine: Engine, count: int, prompt_len: int, output_len: int, seed: int) -> Echo:
    """`count` self-echo requests (module docstring); `engine` must not speculate."""
    assert engine.speculation is None
    starts = seeds(count, max(1, prompt_len // 2), engine.model_config.vocab_size, seed)
    continuations, _ = run_batch(engine, starts, output_len)
    return Echo([p + t + p for p, t in zip(starts, continuations)], continuations)


def run_batch(engine: Engine, prompts: list[list[int]], output_len: int) -> tuple[list[list[int]], float]:
    """(each request's output, mean ITL in s over the requests: (last token time -
    first token time) / (tokens - 1))."""
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    ids = [engine.add_request(p, params) for p in prompts]
    first: dict[str, float] = {}
    last: dict[str, float] = {}
    outputs: dict[str, list[int]] = {r: [] for r in ids}
    while engine.has_unfinished_requests():
        step = engine.step()
        now = time.perf_counter()
        for out in step:
            if out.new_token_ids:
                first.setdefault(out.request_id, now)
                last[out.request_id] = now
                outputs[out.request_id] += out.new_token_ids
    itls = [(last[r] - first[r]) / (len(outputs[r]) - 1) for r in ids if len(outputs[r]) > 1]
    return [outputs[r] for r in ids], sum(itls) / max(1, len(itls))


def echoed(outputs: list[list[int]], continuations: list[list[int]]) -> float:
    """Mean length of the common prefix of each output and its request's T."""
    lengths = []
    for out, cont in zip(outputs, continuations):
        n = 0
        while n < min(len(out), len(cont)) and out[n] == cont[n]:
            n += 1
        lengths.append(n)
    return sum(lengths) / max(1, len(lengths))


def measure(engine: Engine, name: str, args: argparse.Namespace, batches: list[int], echo: Echo,
            reference: dict[int, list[list[int]]]) -> list[Result]:
    """One setting at each batch size; the no-speculation setting fills `reference` (each
    batch's outputs), against which an n-gram setting's lookup ceiling is computed."""
    run_batch(engine, echo.prompts[:max(batches)], 8)  # warm-up
    results = []
    for batch in batches:
        stats = engine.speculation.stats if engine.speculation is not None else None
        before = (stats.accepted_tokens_total, stats.verify_steps_total) if stats else (0, 0)
        work = echo.first(batch)
        outputs, itl = run_batch(engine, work.prompts, args.output_len)
        length = 1.0
        if stats is not None and stats.verify_steps_total > before[1]:
            steps = stats.verify_steps_total - before[1]
            length = (stats.accepted_tokens_total - before[0] + steps) / steps
        if engine.speculation is None:
            reference[batch] = outputs
        ceiling = None
        config = engine.config
        if config.speculative == "ngram" and batch in reference:
            ceiling = lookup_ceiling(work.prompts, reference[batch], config.speculative_ngram_max,
                                     config.num_speculative_tokens)
        results.append(Result(name, batch, itl * 1e3, length, sum(map(len, outputs)),
                              echoed(outputs, work.continuations), ceiling))
    engine.check_page_invariants()
    return results


def run_setting(target: Path, setting: Setting, args: argparse.Namespace, batches: list[int],
                echo: Echo | None, reference: dict[int, list[list[int]]]) -> tuple[list[Result], Echo]:
    """Measure one setting on its own engine; the first (no speculation, echo None)
    also builds the workload."""
    engine = Engine(target, **engine_options(args), **setting.options)
    try:
        if echo is None and args.workload == "repeat":
            echo = repeat_workload(max(batches), args.prompt_len, args.period, engine.model_config.vocab_size, seed=99)
        elif echo is None and args.workload == "continue":
            echo = continue_workload(engine, max(batches), args.prompt_len, args.output_len, seed=99)
        elif echo is None:
            echo = echo_workload(engine, max(batches), args.prompt_len, args.output_len, seed=99)
        return measure(engine, setting.name, args, batches, echo, reference), echo
    finally:
        engine.close()
        del engine
        _empty_cuda_cache()


def _empty_cuda_cache() -> None:
    """Give the engine's memory back before the next one loads: its parts refer to each
    other (runner, graphs, drafter), so only a collection frees them."""
    import gc

    import torch
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def engine_options(args: argparse.Namespace) -> dict[str, Any]:
    options: dict[str, Any] = dict(device=args.device, num_pages=args.num_pages, max_model_len=args.max_model_len,
                                   max_num_seqs=max(16, max(int(b) for b in args.batches.split(","))))
    if args.model != "tiny":
        options.update(load_format=args.load_format)
    if args.device.startswith("cuda"):
        options.update(attention_backend="triton", dtype=args.dtype, cuda_graphs=not args.no_cuda_graphs,
                       overlap_schedule=not args.no_overlap,
                       speculative_cuda_graphs=args.speculative_cuda_graphs)
    return options


def settings(args: argparse.Namespace, draft: Path) -> list[Setting]:
    out = [Setting("none", {})]
    out += [Setting(f"ngram-k{k}", {"speculative": "ngram", "num_speculative_tokens": k}) for k in _ints(args.ngram_k)]
    out += [Setting(f"draft-k{k}", {"speculative": "draft", "num_speculative_tokens": k,
                                    "speculative_draft_model": str(draft)}) for k in _ints(args.draft_k)]
    return out


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def report(results: list[Result]) -> None:
    base = {r.batch: r.itl_ms for r in results if r.setting == "none"}
    print(f"{'setting':<12} {'batch':>5} {'ITL ms':>9} {'speedup':>8} {'accept len':>10} {'ceiling':>8} "
          f"{'tokens':>7} {'echo':>6}")
    for r in results:
        speedup = base[r.batch] / r.itl_ms if r.batch in base and r.itl_ms > 0 else float("nan")
        ceiling = "" if r.ceiling is None else f"{r.ceiling:.2f}"
        print(f"{r.setting:<12} {r.batch:>5} {r.itl_ms:>9.3f} {speedup:>7.2f}x {r.acceptance_length:>10.2f} "
              f"{ceiling:>8} {r.tokens:>7} {r.echo:>6.1f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama-3.1-8b", help="'tiny' or a bench.presets name")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--speculative-cuda-graphs", action=argparse.BooleanOptionalAction, default=True,
                        help="verify steps and draft rounds replay CUDA graphs (the engine's default)")
    parser.add_argument("--ngram-k", default="3,5")
    parser.add_argument("--draft-k", default="3")
    parser.add_argument("--workload", choices=("echo", "repeat", "continue"), default="echo",
                        help="echo: prompts P + T + P (module docstring); repeat: a random pattern of "
                             "--period tokens repeated to --prompt-len; continue: the target's own greedy text")
    parser.add_argument("--period", type=int, default=8)
    parser.add_argument("--load-format", choices=DUMMY_FORMATS, default="dummy",
                        help="the random weights of a preset model: N(0, 0.02), or U(-0.001, 0.001) as vLLM's "
                             "dummy loader draws (its greedy text falls into loops)")
    parser.add_argument("--prompt-len", type=int, default=256,
                        help="echo: the prompt is P + T + P with P of half this and T of --output-len tokens")
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--num-pages", type=int, default=4096)
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--no-cuda-graphs", action="store_true")
    parser.add_argument("--no-overlap", action="store_true")
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/spec-bench"))
    parser.add_argument("--out", type=Path, help="also write the results as JSON here")
    args = parser.parse_args(argv)
    print("command:", shlex.join([sys.executable, "-m", "bench.spec_bench", *(argv if argv is not None else sys.argv[1:])]))
    target, draft = write_models(args.model, args.work_dir)
    batches = _ints(args.batches)
    shape = {"echo": f"self-echo prompts of {2 * (args.prompt_len // 2)} + {args.output_len} tokens",
             "repeat": f"prompts of a {args.period}-token pattern repeated to {args.prompt_len} tokens",
             "continue": f"prompts of {args.prompt_len} tokens of the target's own greedy text"}[args.workload]
    print(f"model {args.model} on {args.device}; options {engine_options(args)}; {shape}, output {args.output_len}",
          flush=True)
    results: list[Result] = []
    echo: Echo | None = None
    reference: dict[int, list[list[int]]] = {}
    for setting in settings(args, draft):  # "none" first: it builds the workload and the reference outputs
        measured, echo = run_setting(target, setting, args, batches, echo, reference)
        for r in measured:  # as they come: a later setting's failure loses none of these
            print(f"measured: {r}", flush=True)
        results += measured
    report(results)
    if args.out:
        args.out.write_text(json.dumps([r.__dict__ for r in results], indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
