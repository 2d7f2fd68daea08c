"""Both ends of a tensor-parallel step: rank 0's model runner, which broadcasts each
prepared batch before running its own shard, and the followers' loop, which runs the
same forward on the batches it receives."""
from __future__ import annotations

import torch

from engine.attention.base import AttentionBackend
from engine.batch import Batch
from engine.model_runner import CarriedTokens, ModelRunner
from engine.parallel.comm import TensorParallelError, TPGroup
from engine.parallel.model import ParallelCausalLM
from engine.parallel.step import receive_step, send_step


class ParallelModelRunner(ModelRunner):
    """ModelRunner of rank 0: the same inputs and forward, with the step's inputs sent
    to the other ranks between the two (their forwards pair with this one's
    collectives). Only built for tensor_parallel_size > 1."""

    model: ParallelCausalLM

    def __init__(self, model: ParallelCausalLM, attention: AttentionBackend, device: torch.device,
                 group: TPGroup) -> None:
        super().__init__(model, attention, device)
        self.group = group

    @torch.inference_mode()
    def execute(self, batch: Batch, carried: CarriedTokens | None = None) -> torch.Tensor:
        if carried is not None:  # EngineConfig.validate refuses overlap scheduling with TP
            raise RuntimeError("tensor-parallel steps take no carried tokens")
        self.group.check()
        self.prepare(batch)
        try:
            send_step(self.group, batch, self.page_size, self.model.config.torch_dtype)
            self.attention.prepare(batch)
            return self.model.compute_logits(self.model(batch, self.attention, batch.logits_indices))
        except TensorParallelError:
            raise
        except BaseException as exc:
            # The others are inside this step's collectives, which rank 0 will never finish:
            # the ranks are out of step for good.
            raise self.group.fail(TensorParallelError(f"rank 0 failed inside a tensor-parallel step: {exc!r}")) from exc


@torch.inference_mode()
def serve_steps(group: TPGroup, model: ParallelCausalLM, attention: AttentionBackend) -> int:
    """A follower: run every step rank 0 sends until it says stop; the steps run."""
    steps = 0
    dtype = model.config.torch_dtype
    while (batch := receive_step(group, dtype)) is not None:
        attention.prepare(batch)
        model.compute_logits(model(batch, attention, batch.logits_indices))  # its part of the gather
        steps += 1
    return steps
