"""Conversions between wire messages and engine types, shared by router and workers."""
from __future__ import annotations

from collections.abc import Sequence

from engine.errors import InvalidRequestError
from engine.multimodal import ImageInput, image_hash
from engine.request import TokenLogprob
from engine.sampling_params import SamplingParams
from proto import epd_pb2 as pb

FINISH_REASONS = {
    "stop": pb.FINISH_REASON_STOP,
    "length": pb.FINISH_REASON_LENGTH,
    "abort": pb.FINISH_REASON_ABORT,
    "error": pb.FINISH_REASON_ERROR,
}
FINISH_NAMES = {value: name for name, value in FINISH_REASONS.items()}


def params_to_proto(params: SamplingParams) -> pb.SamplingParams:
    msg = pb.SamplingParams(
        max_tokens=params.max_tokens, temperature=params.temperature, top_p=params.top_p,
        min_p=params.min_p, repetition_penalty=params.repetition_penalty,
        frequency_penalty=params.frequency_penalty, presence_penalty=params.presence_penalty,
        stop=list(params.stop), stop_token_ids=list(params.stop_token_ids),
        ignore_eos=params.ignore_eos, skip_special_tokens=params.skip_special_tokens,
        priority=params.priority)
    if params.top_k is not None:
        msg.top_k = params.top_k
    if params.seed is not None:
        msg.seed = params.seed
    if params.logprobs is not None:
        msg.logprobs = params.logprobs
    return msg


def params_from_proto(msg: pb.SamplingParams) -> SamplingParams:
    """Raises InvalidRequestError (from SamplingParams) on invalid values; unset optional
    fields take SamplingParams' defaults."""
    defaults = SamplingParams()

    def get(name: str) -> object:
        return getattr(msg, name) if msg.HasField(name) else getattr(defaults, name)

    return SamplingParams(
        max_tokens=get("max_tokens"),
        temperature=get("temperature"),
        top_k=msg.top_k if msg.HasField("top_k") else None,
        top_p=get("top_p"),
        min_p=msg.min_p,
        repetition_penalty=get("repetition_penalty"),
        frequency_penalty=msg.frequency_penalty,
        presence_penalty=msg.presence_penalty,
        seed=msg.seed if msg.HasField("seed") else None,
        stop=tuple(msg.stop),
        stop_token_ids=tuple(msg.stop_token_ids),
        ignore_eos=msg.ignore_eos,
        logprobs=msg.logprobs if msg.HasField("logprobs") else None,
        skip_special_tokens=get("skip_special_tokens"),
        priority=msg.priority,
    )


def logprob_to_proto(entry: TokenLogprob) -> pb.TokenLogprob:
    return pb.TokenLogprob(token_id=entry.token_id, logprob=entry.logprob,
                           top=[pb.TopLogprob(token_id=t, logprob=lp) for t, lp in entry.top])


def logprob_from_proto(msg: pb.TokenLogprob) -> TokenLogprob:
    return TokenLogprob(msg.token_id, msg.logprob, [(t.token_id, t.logprob) for t in msg.top])


def images_from_proto(images: Sequence[pb.ImageData], keep_data: bool = True) -> list[ImageInput]:
    """A request's images as the engine takes them. Raises InvalidRequestError when an
    image's hash is not the sha256 of its bytes (the caches trust the hash) or its token
    range is empty; the placement against the prompt is checked by the engine."""
    out: list[ImageInput] = []
    for index, image in enumerate(images):
        if image.data and image_hash(image.data) != image.hash:
            raise InvalidRequestError(f"image {index}: hash is not the sha256 of its data")
        if not image.data and len(image.hash) != 64:
            raise InvalidRequestError(f"image {index}: needs data or a sha256 hex hash")
        if image.num_tokens == 0:
            raise InvalidRequestError(f"image {index}: num_tokens must be positive")
        out.append(ImageInput(image.hash, image.offset, image.num_tokens,
                              data=bytes(image.data) if keep_data and image.data else None))
    return out
