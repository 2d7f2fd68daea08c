"""A draft model: a smaller checkpoint with the target's tokenizer, run in the same
engine (the decode worker under PD) with its own KV cache and page pool.

Per target request the drafter keeps a mirror `Request` (its page list and computed
count over the draft's KV). Invariant: the mirror's first `num_computed_tokens` tokens
equal the target request's, so their draft KV is valid; `_sync` re-establishes that
before each proposal by cutting the mirror back to the longest common prefix (rejected
drafts are what gets cut: the draft's rollback). The draft's prefill is just the first
catch-up: a request resumed after a remote prefill has no draft KV, and its first
proposal computes the whole prompt on the draft model here (PD: the draft KV is made on
decode, never shipped).

Speed (the draft is small, so a proposal's host overhead is most of its cost): with
`cuda_graphs` the drafter captures its own graphs, T = 1 for the rounds that feed one
draft each and T = 2 for the first round, which catches the mirror up (in steady state
1 or 2 tokens: the last emitted token, plus the bonus token's predecessor when every
draft was accepted); a catch-up of more (a fresh mirror: the whole prompt) runs eagerly.
When every request drafts greedily, round r + 1's inputs are round r's argmaxes taken
on the device (`CarriedTokens`, as the overlap scheduler carries sampled tokens): the
host reads all drafts once, after the last round, instead of once per round. Until then
the mirrors hold placeholders for them (never read: every round overwrites its carried
inputs on the device).
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from engine.attention import create_attention_backend
from engine.attention.base import AttentionBackend
from engine.batch import Batch, ScheduledRequest
from engine.config import ModelConfig
from engine.errors import ConfigError
from engine.kv_cache import KVCache
from engine.loader import load_model
from engine.model_runner import CarriedTokens, ModelRunner
from engine.models.llama import CausalLM
from engine.page_pool import PagePool
from engine.request import Request, RequestStatus
from engine.sampler import filter_logits, seeded_generator
from engine.sessions import common_prefix
from engine.spec.drafter import NO_DRAFTS, Drafter, Drafts, DrafterSetup, register_drafter
from engine.tokenizer import Tokenizer

if TYPE_CHECKING:
    from engine.cuda_graph import DecodeGraphs

_DRAFT_STREAM = 1  # seeded draws of drafts never share a generator with the verifier's (stream 0)
_PLACEHOLDER = 0  # a greedy draft not read to the host yet (see the module docstring)


def check_draft_compatible(setup: DrafterSetup, path: Path, draft: ModelConfig) -> None:
    """The draft must speak the target's token ids: same vocabulary size and tokenizer."""
    target = setup.model_config
    if draft.vocab_size != target.vocab_size:
        raise ConfigError(f"draft model {path} has vocab_size {draft.vocab_size}; the target model has "
                          f"{target.vocab_size} (speculation needs the same tokenizer)")
    vocab = Tokenizer.from_pretrained(path).vocab()
    if vocab != setup.tokenizer.vocab():
        differing = sorted(set(vocab.items()) ^ set(setup.tokenizer.vocab().items()))[:3]
        raise ConfigError(f"draft model {path} has a different tokenizer than the target model "
                          f"(e.g. {differing}); speculation needs the same tokenizer")


@register_drafter
class DraftModelDrafter(Drafter):
    name = "draft"

    def __init__(self, setup: DrafterSetup) -> None:
        super().__init__(setup)
        config = setup.config
        path = Path(str(config.speculative_draft_model))
        if not path.is_dir():
            raise ConfigError(f"draft model directory not found: {path}")
        self.model_config = ModelConfig.from_pretrained(path, config.dtype or setup.model_config.dtype)
        check_draft_compatible(setup, path, self.model_config)
        model = load_model(path, self.model_config, setup.device, config.load_format, config.seed + 1)
        assert config.max_model_len is not None
        model.rotary.build_table(config.max_model_len + config.num_speculative_tokens, self.model_config.torch_dtype)
        if config.uses_triton_kernels:
            from engine.kernels.ops import TRITON_OPS
            model.use_ops(TRITON_OPS)
        self.kv_cache = KVCache(self.model_config, config.num_pages, config.page_size, setup.device,
                                self.model_config.torch_dtype)
        attention = create_attention_backend(config.attention_backend)(self.kv_cache, self.model_config.head_dim**-0.5)
        self.runner = ModelRunner(model, attention, setup.device, *self._graphs(model, attention))
        self.pool = PagePool(config.num_pages)
        self.page_size = config.page_size
        self.mirrors: dict[Request, Request] = {}  # target request -> its mirror
        self._generator = torch.Generator().manual_seed(config.seed + 2)

    def _graphs(self, model: CausalLM, attention: AttentionBackend) -> tuple[DecodeGraphs | None, DecodeGraphs | None]:
        """(rounds of one token, catch-up rounds of up to 2) graphs; none without cuda_graphs
        and speculative_cuda_graphs."""
        config = self.setup.config
        if not (config.cuda_graphs and config.speculative_cuda_graphs):
            return None, None
        from engine.cuda_graph import DecodeGraphs
        pool = torch.cuda.graph_pool_handle()  # the draft's own: its logits outlive no target replay
        catch_up = DecodeGraphs.build(config, model, attention, 2, pool)
        return DecodeGraphs.build(config, model, attention, pool=pool), catch_up

    def free_pages(self) -> int | None:
        return self.pool.free_pages

    def total_pages(self) -> int | None:
        return self.pool.total_pages

    def release(self, request: Request) -> None:
        mirror = self.mirrors.pop(request, None)
        if mirror is not None:
            self.pool.free(mirror.pages)
            mirror.pages, mirror.num_computed_tokens = [], 0
            mirror.status = RequestStatus.FINISHED  # the runner's page rows drop it

    def propose(self, requests: list[Request], limits: list[int]) -> list[Drafts]:
        for target in [t for t in self.mirrors if t.finished]:  # finished without a release call
            self.release(target)
        mirrors = [self._sync(target, limit) for target, limit in zip(requests, limits)]
        if all(target.params.greedy for target in requests):
            return self._propose_greedy(mirrors, limits)
        drafts: list[list[int]] = [[] for _ in requests]
        probs: list[list[torch.Tensor]] = [[] for _ in requests]
        active = [i for i, m in enumerate(mirrors) if m is not None]
        while active:
            items = [ScheduledRequest.of(mirrors[i], mirrors[i].num_tokens - mirrors[i].num_computed_tokens)
                     for i in active]  # type: ignore[union-attr]
            logits = self.runner.execute(Batch(items))
            for row, (i, item) in enumerate(zip(active, items)):
                mirror, target = item.request, requests[i]
                mirror.num_computed_tokens += item.num_new_tokens
                token, q = self._draw(logits[row], target, len(target.output_token_ids) + len(drafts[i]))
                drafts[i].append(token)
                mirror.output_token_ids.append(token)  # fed next round, if there is one
                if q is not None:
                    probs[i].append(q)
            active = [i for i in active if len(drafts[i]) < limits[i]]
        return [Drafts(d, torch.stack(p) if p else None) if d else NO_DRAFTS for d, p in zip(drafts, probs)]

    def _propose_greedy(self, mirrors: list[Request | None], limits: list[int]) -> list[Drafts]:
        """Every request drafts its argmaxes: the rounds chain on the device and the host
        reads the drafts once (see the module docstring)."""
        active = [i for i, m in enumerate(mirrors) if m is not None]
        rounds: list[tuple[list[int], list[int], torch.Tensor]] = []  # (requests, placeholder indices, tokens)
        carried: CarriedTokens | None = None
        while active:
            items = [ScheduledRequest.of(mirrors[i], mirrors[i].num_tokens - mirrors[i].num_computed_tokens)
                     for i in active]  # type: ignore[union-attr]
            tokens = self.runner.execute(Batch(items), carried).argmax(dim=-1)
            indices = []
            for item in items:
                mirror = item.request
                mirror.num_computed_tokens += item.num_new_tokens
                mirror.output_token_ids.append(_PLACEHOLDER)  # fed next round, if there is one
                indices.append(len(mirror.output_token_ids) - 1)
            rounds.append((active, indices, tokens))
            carried = CarriedTokens({item.request: row for row, item in enumerate(items)}, tokens)
            active = [i for i in active if len(rounds) < limits[i]]
        drafts: list[list[int]] = [[] for _ in mirrors]
        if rounds:
            host = torch.cat([tokens for _, _, tokens in rounds]).tolist()  # the one wait for the GPU
            offset = 0
            for requests, indices, _ in rounds:
                for i, index, token in zip(requests, indices, host[offset:offset + len(requests)]):
                    mirrors[i].output_token_ids[index] = token  # type: ignore[union-attr]
                    drafts[i].append(token)
                offset += len(requests)
        return [Drafts(d) if d else NO_DRAFTS for d in drafts]

    def _sync(self, target: Request, limit: int) -> Request | None:
        """The target's mirror, cut back to their common tokens and extended with the
        target's, with pages for the proposal; None (and no state) when pages are short."""
        mirror = self.mirrors.get(target)
        if mirror is None:
            mirror = Request(target.request_id, list(target.prompt_token_ids), target.params,
                             status=RequestStatus.RUNNING)
            self.mirrors[target] = mirror
        outputs, target_outputs = mirror.output_token_ids, target.output_token_ids
        same = common_prefix(outputs, target_outputs, min(len(outputs), len(target_outputs)))
        del outputs[same:]
        outputs.extend(target_outputs[same:])
        # KV is valid for common tokens only; at least the last token is fed again.
        mirror.num_computed_tokens = min(mirror.num_computed_tokens, mirror.num_prompt_tokens + same,
                                         mirror.num_tokens - 1)
        # The proposal computes the known tokens and all but the last draft.
        needed = -(-(mirror.num_tokens + limit - 1) // self.page_size) - len(mirror.pages)
        if needed > self.pool.free_pages:
            self.release(target)
            return None
        if needed > 0:
            mirror.pages.extend(self.pool.allocate(needed))
        return mirror

    def _draw(self, row: torch.Tensor, target: Request, output_index: int) -> tuple[int, torch.Tensor | None]:
        """A draft token from the draft's logits row, and the distribution it was drawn
        from (None for a greedy request: the verifier compares argmaxes)."""
        params = target.params
        if params.greedy:
            return int(torch.argmax(row)), None
        q = torch.softmax(filter_logits(row.float(), params), dim=-1).cpu()
        if not bool(torch.isfinite(q).all()) or float(q.sum()) <= 0.0:
            token = int(torch.argmax(row))
            return token, torch.nn.functional.one_hot(torch.tensor(token), q.shape[0]).float()
        generator = self._generator if params.seed is None else seeded_generator(params.seed, output_index,
                                                                                 _DRAFT_STREAM)
        return int(torch.multinomial(q, 1, generator=generator)), q
