"""The router's gRPC services: Router (the public API) and Registry (workers announce
themselves). Bad input is INVALID_ARGUMENT, an unknown model NOT_FOUND, no healthy
worker UNAVAILABLE, too many requests RESOURCE_EXHAUSTED."""
from __future__ import annotations

import logging
from contextlib import aclosing
from typing import AsyncIterator

import grpc

from proto import epd_pb2, epd_pb2_grpc
from router.errors import InvalidRequest, RouterError
from router.registry import WorkerRegistry
from router.service import Finish, GenerationRequest, RouterService, TokenDelta
from router.sessions import parse_session_id

log = logging.getLogger("router.grpc")

_FINISH_REASONS = {
    "stop": epd_pb2.FINISH_REASON_STOP,
    "length": epd_pb2.FINISH_REASON_LENGTH,
    "abort": epd_pb2.FINISH_REASON_ABORT,
    "error": epd_pb2.FINISH_REASON_ERROR,
}


def sampling_options(message: epd_pb2.SamplingParams) -> dict[str, object]:
    """SamplingParams' fields from the wire message. Optional fields left unset take
    their defaults: max_tokens the rest of the context, temperature 1, top_p 1,
    repetition_penalty 1, skip_special_tokens true; a field that is set is validated as
    sent (max_tokens 0 is an error)."""
    from proto.convert import params_from_proto
    defaults = params_from_proto(epd_pb2.SamplingParams())
    return dict(
        max_tokens=message.max_tokens if message.HasField("max_tokens") else None,
        temperature=message.temperature if message.HasField("temperature") else defaults.temperature,
        top_k=message.top_k if message.HasField("top_k") else None,
        top_p=message.top_p if message.HasField("top_p") else defaults.top_p, min_p=message.min_p,
        repetition_penalty=(message.repetition_penalty if message.HasField("repetition_penalty")
                            else defaults.repetition_penalty),
        frequency_penalty=message.frequency_penalty, presence_penalty=message.presence_penalty,
        seed=message.seed if message.HasField("seed") else None,
        stop=tuple(message.stop), stop_token_ids=tuple(message.stop_token_ids),
        ignore_eos=message.ignore_eos,
        logprobs=message.logprobs if message.HasField("logprobs") else None,
        skip_special_tokens=(message.skip_special_tokens if message.HasField("skip_special_tokens")
                             else defaults.skip_special_tokens),
        priority=message.priority)


def finished_message(finish: Finish) -> epd_pb2.Finished:
    usage = epd_pb2.Usage(prompt_tokens=finish.usage.prompt_tokens,
                          completion_tokens=finish.usage.completion_tokens,
                          cached_tokens=finish.usage.cached_tokens)
    message = epd_pb2.Finished(reason=_FINISH_REASONS[finish.reason], usage=usage, error=finish.error or "")
    if isinstance(finish.stop_reason, str):
        message.stop_string = finish.stop_reason
    elif isinstance(finish.stop_reason, int):
        message.stop_token = finish.stop_reason
    return message


class RouterServicer(epd_pb2_grpc.RouterServicer):
    def __init__(self, service: RouterService) -> None:
        self._service = service

    def _prepare(self, request: epd_pb2.GenerateRequest) -> GenerationRequest:
        service = self._service
        service.check_model(request.model)
        kind = request.WhichOneof("prompt")
        if kind == "text":
            prompt = service.encode_text(request.text)
        elif kind == "token_ids":
            prompt = list(request.token_ids.ids)
        else:
            raise InvalidRequest("the request has no prompt: set `text` or `token_ids`", param="prompt")
        datas = service.images.load(list(request.images), param="images")
        prompt, images = service.images.expand(prompt, datas, param="images")
        request_id = request.request_id or service.new_request_id()
        session = parse_session_id(request.session_id) if request.session_id else ""
        return service.prepare(request_id, prompt, sampling_options(request.sampling), images, session,
                               request.pin_prefix_tokens)

    async def Generate(self, request: epd_pb2.GenerateRequest,
                       context: grpc.aio.ServicerContext) -> AsyncIterator[epd_pb2.GenerateResponse]:
        try:
            size = len(request.text) if request.WhichOneof("prompt") == "text" else 0
            size += sum(len(image) for image in request.images)
            prepared = await self._service.off_loop(size, self._prepare, request)
        except RouterError as exc:
            self._service.record_error(exc)
            await context.abort(exc.grpc_code, exc.message, trailing_metadata=exc.grpc_trailers())
        try:
            slot = await self._service.admit()
        except RouterError as exc:
            await context.abort(exc.grpc_code, exc.message, trailing_metadata=exc.grpc_trailers())
        try:
            async with aclosing(self._service.generate(prepared)) as events:
                async for event in events:
                    yield _response(prepared.request_id, event)
        except RouterError as exc:
            await context.abort(exc.grpc_code, exc.message, trailing_metadata=exc.grpc_trailers())
        finally:
            slot.release()

    async def Abort(self, request: epd_pb2.AbortRequest, context: grpc.aio.ServicerContext) -> epd_pb2.AbortResponse:
        return epd_pb2.AbortResponse(found=await self._service.abort(request.request_id))

    async def CloseSession(self, request: epd_pb2.CloseSessionRequest,
                           context: grpc.aio.ServicerContext) -> epd_pb2.CloseSessionResponse:
        try:
            await self._service.close_session(request.session_id)
        except RouterError as exc:
            await context.abort(exc.grpc_code, exc.message)
        return epd_pb2.CloseSessionResponse(found=True)

    async def Health(self, request: epd_pb2.HealthRequest, context: grpc.aio.ServicerContext) -> epd_pb2.HealthResponse:
        registry = self._service.registry
        return epd_pb2.HealthResponse(ready=registry.ready(), healthy_prefill=len(registry.healthy("prefill")),
                                      healthy_decode=len(registry.healthy("decode")),
                                      healthy_encode=len(registry.healthy("encode")))

    async def ListModels(self, request: epd_pb2.ListModelsRequest,
                         context: grpc.aio.ServicerContext) -> epd_pb2.ListModelsResponse:
        model = epd_pb2.ModelInfo(id=self._service.model.name, max_model_len=self._service.max_model_len)
        return epd_pb2.ListModelsResponse(models=[model])

    async def ClusterStatus(self, request: epd_pb2.ClusterStatusRequest,
                            context: grpc.aio.ServicerContext) -> epd_pb2.ClusterStatusResponse:
        return epd_pb2.ClusterStatusResponse(workers=cluster_status(self._service.registry))


def _response(request_id: str, event: TokenDelta | Finish) -> epd_pb2.GenerateResponse:
    if isinstance(event, TokenDelta):
        chunk = epd_pb2.TokenChunk(token_ids=event.token_ids, text=event.text, logprobs=event.logprobs)
        return epd_pb2.GenerateResponse(request_id=request_id, chunk=chunk)
    return epd_pb2.GenerateResponse(request_id=request_id, finished=finished_message(event))


def cluster_status(registry: WorkerRegistry) -> list[epd_pb2.WorkerStatus]:
    """One WorkerStatus per worker: its last reported status with the router's view of
    identity and health."""
    out = []
    for handle in registry.handles():
        state = handle.state
        status = epd_pb2.WorkerStatus()
        if state.status is not None:
            status.CopyFrom(state.status)
        status.ClearField("stored")
        status.ClearField("removed")
        status.role, status.id, status.address, status.healthy = state.role, state.id, state.address, state.healthy
        status.draining = state.draining
        status.breaker, status.breaker_failures = state.breaker.state, state.breaker.failures
        out.append(status)
    return out


class RegistryServicer(epd_pb2_grpc.RegistryServicer):
    """Workers started elsewhere register here; Status polling then keeps them current."""

    def __init__(self, registry: WorkerRegistry) -> None:
        self._registry = registry

    async def Register(self, request: epd_pb2.RegisterRequest,
                       context: grpc.aio.ServicerContext) -> epd_pb2.RegisterResponse:
        try:
            self._registry.add(request.role, request.id, request.address)
        except ValueError as exc:
            return epd_pb2.RegisterResponse(accepted=False, message=str(exc))
        return epd_pb2.RegisterResponse(accepted=True)

    async def Heartbeat(self, request: epd_pb2.HeartbeatRequest,
                        context: grpc.aio.ServicerContext) -> epd_pb2.HeartbeatResponse:
        return epd_pb2.HeartbeatResponse(known=self._registry.get(request.id) is not None)

    async def Deregister(self, request: epd_pb2.DeregisterRequest,
                         context: grpc.aio.ServicerContext) -> epd_pb2.DeregisterResponse:
        return epd_pb2.DeregisterResponse(known=self._registry.remove(request.id))


def add_services(server: grpc.aio.Server, service: RouterService) -> None:
    epd_pb2_grpc.add_RouterServicer_to_server(RouterServicer(service), server)
    epd_pb2_grpc.add_RegistryServicer_to_server(RegistryServicer(service.registry), server)
