"""The engine: one model, one KV cache, a scheduler and a sampler, stepped by its owner.

`step()` schedules one batch, runs it, samples a token for every request whose known
tokens are now all computed, and reports what changed. The offline `LLM` and the
workers both drive it.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, Sequence

import torch

from engine.attention import create_attention_backend
from engine.batch import Batch
from engine.config import EngineConfig, ModelConfig
from engine.errors import ConfigError, InvalidRequestError
from engine.kv_cache import KVCache
from engine.loader import load_model
from engine.model_path import resolve_model_path
from engine.model_runner import ModelRunner
from engine.models.llama import CausalLM
from engine.multimodal import ImageInput, MultimodalInfo, cache_keys, check_images, read_multimodal_info
from engine.parallel.layout import TPLayout
from engine.radix_cache import PinError
from engine.request import Request, RequestStatus, TokenLogprob
from engine.sampler import Sampler
from engine.sampling_params import SamplingParams
from engine.scheduler import PageAccounting, Scheduler
from engine.sessions import check_session_id
from engine.spec.drafter import DrafterSetup
from engine.tokenizer import Tokenizer

if TYPE_CHECKING:
    from engine.overlap import OverlapScheduler
    from engine.parallel.launch import TensorParallel
    from engine.spec.speculation import Speculation, Verified
    from engine.vision_encoder import VisionEncoder


@dataclass
class EngineCounters:
    requests_total: int = 0
    prefill_tokens_total: int = 0  # prompt tokens computed here (cache hits excluded)
    generated_tokens_total: int = 0
    images_encoded_total: int = 0  # images this engine's own vision tower encoded


class RemoteReservation(NamedTuple):
    """Pages reserved for a prompt whose KV another worker computes: tokens
    [start_page * page_size, prompt_len) go into `page_ids`, in order."""

    request_id: str
    start_page: int
    page_ids: list[int]


@dataclass
class StepOutput:
    """What one step changed for one request."""

    request_id: str
    new_token_ids: list[int]
    new_logprobs: list[TokenLogprob]
    finished: bool
    finish_reason: str | None
    request: Request | None = field(repr=False)  # None only for synthetic outputs (abort)


class Engine:
    def __init__(self, model: str | Path | None = None, config: EngineConfig | None = None,
                 **overrides: Any) -> None:
        config = (config or EngineConfig()).with_overrides(**overrides)
        config.validate()
        self.model_path = resolve_model_path(model)
        self.model_config = ModelConfig.from_pretrained(self.model_path, config.dtype)
        max_len = config.max_model_len or self.model_config.max_position_embeddings
        self.config = config.with_overrides(max_model_len=max_len)
        self._context_limit: int = max_len  # = max_model_len, read by every stop check
        self.device = torch.device(config.device)
        self.tokenizer = Tokenizer.from_pretrained(self.model_path)
        torch.manual_seed(config.seed)
        # Tensor parallelism (engine/parallel/): None at size 1, where none of it runs.
        self.tp: TensorParallel | None = None
        if config.tensor_parallel_size == 1:
            model_module = load_model(self.model_path, self.model_config, self.device, config.load_format, config.seed)
            self.kv_cache = KVCache(self.model_config, config.num_pages, config.page_size,
                                    self.device, self.model_config.torch_dtype)
        else:
            model_module = self._start_tensor_parallel()
        model_module.rotary.build_table(self.config.max_model_len, self.model_config.torch_dtype)
        backend = create_attention_backend(config.attention_backend)
        attention = backend(self.kv_cache, self.model_config.head_dim**-0.5)
        if config.uses_triton_kernels:
            from engine.kernels.ops import TRITON_OPS  # needs triton: imported only when asked
            model_module.use_ops(TRITON_OPS)
        if config.attention_backend == "triton" and self.device.type == "cuda" and self.tp is None:
            from engine.kernels import decode_attention  # mixed steps run it eagerly, any split count
            decode_attention.warm_up(*self.kv_cache.layer_views(0), self.model_config.num_heads,
                                     self.model_config.torch_dtype)
        graphs = verify_graphs = None
        if config.cuda_graphs:
            from engine.cuda_graph import DecodeGraphs
            pool = torch.cuda.graph_pool_handle()  # one pool: the graphs never run at once
            if config.speculative is not None and config.speculative_cuda_graphs:  # 1 + K tokens per request
                verify_graphs = DecodeGraphs.build(self.config, model_module, attention,
                                                   1 + config.num_speculative_tokens, pool)
            graphs = DecodeGraphs.build(self.config, model_module, attention, pool=pool)
        if self.tp is None:
            self.runner = ModelRunner(model_module, attention, self.device, graphs, verify_graphs)
        else:
            from engine.parallel.runner import ParallelModelRunner
            assert self.tp.group is not None
            self.runner = ParallelModelRunner(model_module, attention, self.device, self.tp.group)
        self.scheduler = Scheduler(self.config)
        self.sampler = Sampler(config.seed)
        # Speculative decoding (engine/spec/): None when off.
        self.speculation: Speculation | None = None
        if config.speculative is not None:
            from engine.spec.speculation import Speculation
            self.speculation = Speculation(
                DrafterSetup(self.config, self.model_config, self.model_path, self.tokenizer, self.device),
                self.sampler, self._context_limit)
        self.requests: dict[str, Request] = {}
        self._arrivals = itertools.count()
        self.eos_token_ids = set(self.model_config.eos_token_ids)
        if self.tokenizer.eos_token_id is not None:
            self.eos_token_ids.add(self.tokenizer.eos_token_id)
        self.last_logits: torch.Tensor | None = None  # of the last step, for inspection
        self.last_batch: Batch | None = None
        self.counters = EngineCounters()
        # Image settings of a vision-language checkpoint (None: text only) and its vision
        # tower, loaded on first use (an engine whose images arrive encoded never needs it).
        self.multimodal: MultimodalInfo | None = read_multimodal_info(self.model_path)
        self._vision: VisionEncoder | None = None
        # Set only with overlap_schedule; then step() returns the previous step's tokens.
        self.overlap: OverlapScheduler | None = None
        if config.overlap_schedule:
            from engine.overlap import OverlapScheduler  # imports this module
            self.overlap = OverlapScheduler(self)

    def _start_tensor_parallel(self) -> CausalLM:
        """Start ranks 1..N-1, load rank 0's shard and KV cache meanwhile, and wait for
        the others to be ready; the ranks are stopped again if any of it fails."""
        from engine.parallel.launch import TensorParallel
        create_attention_backend(self.config.attention_backend)  # a bad name fails before any rank starts
        self.tp = TensorParallel(self.model_path, self.model_config, self.config)
        try:
            model = self.tp.load_model(self.model_path, self.config.load_format, self.config.seed)
            self.kv_cache = KVCache(self.tp.local_config, self.config.num_pages, self.config.page_size,
                                    self.device, self.model_config.torch_dtype)
            self.tp.wait_ready()
        except BaseException:
            self.tp.close()
            raise
        return model

    def close(self) -> None:
        """Stop the tensor-parallel ranks (nothing to do at size 1). Idempotent; a
        tensor-parallel engine cannot step afterwards."""
        if self.tp is not None:
            self.tp.close()

    @property
    def tp_layout(self) -> TPLayout:
        """Which KV heads each rank holds (one rank holding all of them at size 1)."""
        return TPLayout.of(self.model_config, self.config.tensor_parallel_size)

    def kv_buffers(self) -> list[torch.Tensor]:
        """Every rank's KV cache tensor as this process sees it, in rank order (rank 0's
        is kv_cache.buffer). Other ranks' caches are visible here only on CPU."""
        if self.tp is None:
            return [self.kv_cache.buffer]
        if len(self.tp.follower_kv) != self.tp.layout.size - 1:
            raise ConfigError("on CUDA the other tensor-parallel ranks' KV pages are not mapped into rank 0: "
                              "KV transfer with tensor_parallel_size > 1 needs device 'cpu' for now")
        return [self.kv_cache.buffer, *self.tp.follower_kv]

    @property
    def max_model_len(self) -> int:
        assert self.config.max_model_len is not None
        return self.config.max_model_len

    # -- requests ----------------------------------------------------------------------

    def tokenize_prompt(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidRequestError("prompt is empty")
            return self.tokenizer.encode(prompt)
        if not isinstance(prompt, (list, tuple)) or any(
                isinstance(t, bool) or not isinstance(t, int) for t in prompt):
            raise InvalidRequestError("prompt must be a string or a list of integer token ids")
        return list(prompt)

    def validate(self, token_ids: list[int], params: SamplingParams) -> None:
        if not token_ids:
            raise InvalidRequestError("prompt is empty")
        vocab = self.model_config.vocab_size
        bad = [t for t in token_ids if not 0 <= t < vocab]
        if bad:
            raise InvalidRequestError(f"token id {bad[0]} is outside the vocabulary [0, {vocab})")
        if len(token_ids) >= self.max_model_len:
            raise InvalidRequestError(
                f"prompt has {len(token_ids)} tokens; the context length is {self.max_model_len} "
                "and at least one token must be generated")
        if not isinstance(params, SamplingParams):
            raise InvalidRequestError("params must be SamplingParams")
        longest = min(len(token_ids) + params.max_tokens, self.max_model_len)
        if -(-longest // self.config.page_size) > self.config.num_pages:
            raise InvalidRequestError(
                f"request may need {longest} tokens of KV cache; the page pool holds "
                f"{self.config.num_pages * self.config.page_size}")

    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                    request_id: str | None = None, hold_pages: bool = False,
                    images: Sequence[ImageInput] = (), output_token_ids: Sequence[int] = (),
                    session_id: str = "") -> str:
        """Validate and queue a request; raises InvalidRequestError and queues nothing
        when the input is bad. `hold_pages`: keep the pages after finishing until
        `release_held` (the prefill role ships them first). `images`: the prompt's
        images over its (already expanded) placeholder tokens; those without an
        embedding are encoded here by this engine's vision tower. `output_token_ids`:
        a migrated request's output so far; the engine computes prompt + output and
        continues with output token number len(output_token_ids) (`resumed_finish`
        first: an output that already ends the request is refused here). `session_id`:
        start from that session's kept KV, and keep this turn's for the next one."""
        session_id = check_session_id(session_id) if session_id else ""
        request = self._new_request(prompt, params, request_id, images, encode=True, output_token_ids=output_token_ids)
        request.session_id = session_id
        request.hold_pages = hold_pages
        self.scheduler.add(request)
        return request.request_id

    @property
    def vision(self) -> VisionEncoder:
        """The checkpoint's vision tower + projector on this engine's device and dtype."""
        if self._vision is None:
            if self.multimodal is None:
                raise InvalidRequestError("this model does not take images")
            from engine.vision_encoder import VisionEncoder
            self._vision = VisionEncoder.from_pretrained(self.model_path, self.device,
                                                         self.model_config.torch_dtype)
        return self._vision

    def check_images(self, token_ids: list[int], images: Sequence[ImageInput]) -> None:
        info = self.multimodal
        check_images(token_ids, images, info.image_token_id if info else None)
        for index, image in enumerate(images):
            if image.embedding is not None and tuple(image.embedding.shape) != (
                    image.num_tokens, self.model_config.hidden_size):
                raise InvalidRequestError(
                    f"image {index}'s embedding has shape {tuple(image.embedding.shape)}; "
                    f"expected ({image.num_tokens}, {self.model_config.hidden_size})")

    def encode_images(self, images: Sequence[ImageInput]) -> list[ImageInput]:
        """`images` with every missing embedding computed from the image's bytes;
        InvalidImageError names a bad image."""
        todo = [i for i, image in enumerate(images) if image.embedding is None]
        if not todo:
            return list(images)
        if any(images[i].data is None for i in todo):
            raise InvalidRequestError("an image has neither bytes nor an embedding")
        embeddings = self.vision.encode_images([images[i].data for i in todo])  # type: ignore[misc]
        self.counters.images_encoded_total += len(todo)
        result = list(images)
        for i, embedding in zip(todo, embeddings):
            result[i] = result[i].with_embedding(embedding)
        return result

    def validate_resume(self, token_ids: list[int], params: SamplingParams, output_token_ids: Sequence[int]) -> None:
        """A migrated request's output so far must fit its vocabulary, max_tokens and
        the context, with room for at least one more token."""
        if not output_token_ids:
            return
        vocab = self.model_config.vocab_size
        bad = [t for t in output_token_ids if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab]
        if bad:
            raise InvalidRequestError(f"resumed token id {bad[0]!r} is outside the vocabulary [0, {vocab})")
        if len(output_token_ids) >= params.max_tokens:
            raise InvalidRequestError(f"{len(output_token_ids)} resumed tokens leave nothing to generate "
                                      f"(max_tokens {params.max_tokens})")
        if len(token_ids) + len(output_token_ids) >= self.max_model_len:
            raise InvalidRequestError(f"prompt + resumed tokens ({len(token_ids) + len(output_token_ids)}) "
                                      f"leave no room in the context length {self.max_model_len}")

    def resumed_finish(self, request_id: str, prompt: list[int], params: SamplingParams,
                       output_token_ids: Sequence[int]) -> StepOutput | None:
        """The finish a migrated request's output already reached (its last token is a
        stop token or EOS, completes a stop string, or fills max_tokens or the context),
        as a StepOutput without new tokens; None when it goes on. Nothing is queued."""
        if not output_token_ids:
            return None
        request = Request(request_id, list(prompt), params, output_token_ids=list(output_token_ids))
        reason = self._check_stop(request, request.output_token_ids[-1])
        if reason is None:
            return None
        request.finish_reason, request.status = reason, RequestStatus.FINISHED
        return StepOutput(request_id, [], [], True, reason, request)

    def _new_request(self, prompt: str | list[int], params: SamplingParams | None,
                     request_id: str | None, images: Sequence[ImageInput] = (),
                     encode: bool = False, output_token_ids: Sequence[int] = ()) -> Request:
        params = params or SamplingParams()
        token_ids = self.tokenize_prompt(prompt)
        self.validate(token_ids, params)
        self.validate_resume(token_ids, params, output_token_ids)
        self.check_images(token_ids, images)
        request_id = request_id or f"req-{next(self._arrivals)}"
        if request_id in self.requests or request_id in self.scheduler.parked:
            raise InvalidRequestError(f"request id {request_id!r} is already in use")
        if encode and images:
            images = self.encode_images(images)
        request = Request(request_id, token_ids, params, arrival=next(self._arrivals), images=tuple(images),
                          output_token_ids=list(output_token_ids), num_resumed_tokens=len(output_token_ids))
        self.requests[request_id] = request
        self.counters.requests_total += 1
        return request

    def reserve_remote(self, prompt: list[int], params: SamplingParams, request_id: str,
                       images: Sequence[ImageInput] = (), output_token_ids: Sequence[int] = (),
                       session_id: str = "") -> RemoteReservation | None:
        """Reserve pages for a prompt prefilled elsewhere; None when pages are short now
        (nothing is kept then: try again later). `images` key the prefix cache; they
        need no embeddings (those are encoded only if a recompute ever needs them).
        `output_token_ids` (a migrated request): their KV comes from elsewhere too.
        `session_id`: the session's kept KV is restored first; only the rest is reserved."""
        session_id = check_session_id(session_id) if session_id else ""
        request = self._new_request(prompt, params, request_id, images, output_token_ids=output_token_ids)
        request.session_id = session_id
        if not self.scheduler.reserve_prompt(request):
            self.requests.pop(request_id)
            self.counters.requests_total -= 1
            return None
        start = request.num_computed_tokens // self.config.page_size
        return RemoteReservation(request_id, start, request.pages[start:])

    def resume_remote(self, request_id: str, first_token: int,
                      logprob: TokenLogprob | None = None) -> StepOutput:
        """The prompt's KV (and a resumed request's output's) has landed and prefill
        sampled `first_token`: the request continues decoding here from there."""
        request = self.scheduler.parked[request_id]
        request.num_computed_tokens = request.num_tokens
        self.scheduler.resume(request)
        return self._append_token(request, first_token, logprob)

    def cached_prefix_tokens(self, prompt: list[int], images: Sequence[ImageInput] = (),
                             session_id: str = "") -> int:
        """Prompt tokens the local prefix cache (or the session's kept KV) would serve
        (nothing is held)."""
        cache, sessions = self.scheduler.cache, self.scheduler.sessions
        if cache is None:
            return 0
        keys = cache_keys(prompt, images) if images else prompt
        restored = sessions.restored_tokens(session_id, keys) if session_id and sessions is not None else None
        if restored is not None:
            return restored
        match = cache.match(keys[:-1])
        cache.unlock(match.nodes)
        return match.num_pages * self.config.page_size

    def release_held(self, request_id: str) -> None:
        """Give back the pages of a finished request that held them (prefill role)."""
        request = self.scheduler.parked.get(request_id)
        if request is not None:
            self.scheduler.finish(request)

    def request_pages(self, request_id: str) -> list[int]:
        request = self.requests.get(request_id) or self.scheduler.parked.get(request_id)
        return list(request.pages) if request is not None else []

    def abort_request(self, request_id: str) -> bool:
        request = self.requests.pop(request_id, None) or self.scheduler.parked.get(request_id)
        if request is None:
            return False
        request.finish_reason = "abort"
        self.scheduler.finish(request)
        if self.speculation is not None:
            self.speculation.release(request)
        return True

    # -- sessions and pinned prefixes -------------------------------------------------

    def close_session(self, session_id: str) -> bool:
        """Release a session's kept KV; False if it kept none here."""
        sessions = self.scheduler.sessions
        return sessions is not None and sessions.close(check_session_id(session_id))

    def expire_sessions(self) -> int:
        """Release the sessions idle for longer than `session_idle_timeout_s`."""
        sessions = self.scheduler.sessions
        return sessions.expire() if sessions is not None else 0

    def pin_prefix(self, token_ids: list[int]) -> int:
        """Pin the full pages of `token_ids` in the prefix cache (now, or as they land);
        returns the pages the pin adds. PinError: over the cap, or under a page."""
        cache = self.scheduler.cache
        if cache is None:
            raise PinError("the prefix cache is off on this worker: nothing can be pinned")
        tokens = self.tokenize_prompt(token_ids)
        vocab = self.model_config.vocab_size
        bad = next((t for t in tokens if not 0 <= t < vocab), None)
        if bad is not None:
            raise InvalidRequestError(f"token id {bad} is outside the vocabulary [0, {vocab})")
        return cache.pin(tokens)

    def unpin_prefix(self, token_ids: list[int]) -> bool:
        """Drop the pin of exactly this prefix; False if there was none."""
        cache = self.scheduler.cache
        return cache is not None and cache.unpin(self.tokenize_prompt(token_ids))

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_work() or (self.overlap is not None and self.overlap.busy)

    # -- stepping ----------------------------------------------------------------------

    def step(self) -> list[StepOutput]:
        if self.overlap is not None:
            return self.overlap.step()
        if self.speculation is not None:
            self.speculation.propose(self.scheduler.running)
        batch = self.scheduler.schedule()
        self.last_batch = batch
        if not batch.scheduled:
            return []
        self.ensure_embeddings(batch)
        logits = self.runner.execute(batch)
        self.last_logits = logits
        return self._process(batch, logits)

    def ensure_embeddings(self, batch: Batch) -> None:
        """Encode the images of requests that compute image positions this step without
        their embeddings (KV that came from elsewhere, then preempted and evicted)."""
        for item in batch.scheduled:
            request = item.request
            if request.num_computed_tokens < request.images_end and any(
                    image.embedding is None for image in request.images):
                request.images = tuple(self.encode_images(request.images))

    def _process(self, batch: Batch, logits: torch.Tensor) -> list[StepOutput]:
        sampling = [s.request for s in batch.scheduled if s.completes_prompt]
        for item in batch.scheduled:
            request = item.request
            start = request.num_computed_tokens
            self.counters.prefill_tokens_total += max(
                0, min(start + item.num_new_tokens, request.num_prompt_tokens) - start)
            request.num_computed_tokens += item.num_new_tokens
        if self.speculation is not None:
            return [self._append_verified(v) for v in self.speculation.verify(batch, logits)]
        samples = self.sampler.sample(logits, sampling)
        return [self._append_token(r, token, lp) for r, (token, lp) in zip(sampling, samples)]

    def _append_verified(self, verified: Verified) -> StepOutput:
        """Append a step's tokens up to the first that stops the request, then roll the
        computed count back to num_tokens - 1: the KV of rejected drafts (and of tokens
        past a stop) is no longer the request's (speculation.py states why that is safe)."""
        request, emitted, reason = verified.request, [], None
        for index, token in enumerate(verified.token_ids):
            request.output_token_ids.append(token)
            emitted.append(token)
            if verified.logprobs:
                request.logprobs.append(verified.logprobs[index])
            reason = self._check_stop(request, token)
            if reason is not None:
                break
        self.counters.generated_tokens_total += len(emitted)
        request.num_computed_tokens = min(request.num_computed_tokens, request.num_tokens - 1)
        request.draft_token_ids = []
        if reason is not None:
            self._finish(request, reason)
        return StepOutput(request.request_id, emitted, list(verified.logprobs[:len(emitted)]),
                          reason is not None, reason, request)

    def _append_token(self, request: Request, token: int, logprob: TokenLogprob | None) -> StepOutput:
        request.output_token_ids.append(token)
        self.counters.generated_tokens_total += 1
        if logprob is not None:
            request.logprobs.append(logprob)
        reason = self._check_stop(request, token)
        if reason is not None:
            self._finish(request, reason)
        return StepOutput(request.request_id, [token], [logprob] if logprob else [],
                          reason is not None, reason, request)

    def _finish(self, request: Request, reason: str) -> None:
        request.finish_reason = reason
        self.requests.pop(request.request_id, None)
        if self.speculation is not None:
            self.speculation.release(request)
        if request.hold_pages:  # prefill role: pages stay until release_held
            self.scheduler.park(request)
            request.status = RequestStatus.FINISHED
        else:
            self.scheduler.finish(request)

    def _check_stop(self, request: Request, token: int, num_outputs: int | None = None) -> str | None:
        """Why the request stops on `token`, its output token number `num_outputs` (by
        default the last in its list; the overlap scheduler reads a token while a newer
        placeholder may follow it), or None. Stop strings decode the whole list: the
        caller makes it end at `token` when the request has any."""
        params = request.params
        if num_outputs is None:
            num_outputs = len(request.output_token_ids)
        if token in params.stop_token_ids:
            request.stop_reason = token
            return "stop"
        if token in self.eos_token_ids and not params.ignore_eos:
            request.stop_reason = token
            return "stop"
        if params.stop and self._hit_stop_string(request):
            return "stop"
        if num_outputs >= params.max_tokens or len(request.prompt_token_ids) + num_outputs >= self._context_limit:
            return "length"
        return None

    def _hit_stop_string(self, request: Request) -> bool:
        """Whether the output text now contains a stop string; cuts the text before the
        first one. Each step decodes only a window of recent tokens (enough for the
        longest stop string: a character spans at most 4 byte-level tokens, plus slack
        for how a window's first token decodes); only a hit there is confirmed on the
        whole text, so a request's stop checks cost O(output length), not its square."""
        params, tokens = request.params, request.output_token_ids
        window = 4 * max(len(s) for s in params.stop) + 8
        if len(tokens) > window:
            tail = self.tokenizer.decode(tokens[-window:], params.skip_special_tokens)
            if not any(s in tail for s in params.stop):
                return False
        text = self.tokenizer.decode(tokens, params.skip_special_tokens)
        hits = [(text.find(s), s) for s in params.stop if s in text]
        if not hits:
            return False
        position, stop = min(hits)
        request.output_text = text[:position]
        request.stop_reason = stop
        return True

    def output_text(self, request: Request) -> str:
        if isinstance(request.stop_reason, str):
            return request.output_text
        return self.tokenizer.decode(request.output_token_ids, request.params.skip_special_tokens)

    # -- accounting --------------------------------------------------------------------

    def page_accounting(self) -> PageAccounting:
        return self.scheduler.accounting()

    def check_page_invariants(self) -> PageAccounting:
        """Every page is exactly one of: free, cached, held by one running request, or
        held by one session (its partial last page)."""
        acct = self.scheduler.accounting()
        if acct.free + acct.cached + acct.held_by_requests + acct.held_by_sessions != acct.total:
            raise AssertionError(f"page accounting broken: {acct}")
        return acct

    def free_cache(self) -> int:
        return self.scheduler.free_cache()
