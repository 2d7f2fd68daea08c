"""The router's OpenAPI document (`/openapi.json`): FastAPI's, plus the request bodies
of the completion endpoints, whose handlers read raw bytes (so that size limits and
malformed JSON are the router's to answer) and so declare no body of their own."""
from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from router.openai_protocol import ChatCompletionRequest, CompletionRequest

_BODIES: dict[str, type[BaseModel]] = {"/v1/chat/completions": ChatCompletionRequest,
                                       "/v1/completions": CompletionRequest}
_ERROR_BODY = {"type": "object", "required": ["error"],
               "properties": {"error": {"type": "object", "required": ["message", "type", "code"]}}}


def _error(description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": _ERROR_BODY}}}


# Failures a completion request may end in, in OpenAI's error shape.
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: _error("invalid request"), 401: _error("missing or invalid API key"),
    404: _error("unknown model"), 413: _error("request body too large"), 429: _error("router full"),
    502: _error("a worker failed"), 503: _error("no healthy worker"), 504: _error("a worker timed out"),
}


def _add_body(schema: dict[str, Any], path: str, model: type[BaseModel]) -> None:
    body = model.model_json_schema(ref_template="#/components/schemas/{model}")
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    components.update(body.pop("$defs", {}))
    components[model.__name__] = body
    ref = {"$ref": f"#/components/schemas/{model.__name__}"}
    schema["paths"][path]["post"]["requestBody"] = {"required": True, "content": {"application/json": {"schema": ref}}}


def describe_bodies(app: FastAPI) -> None:
    """Serve `app`'s schema with the completion endpoints' request bodies filled in."""
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
            for path, model in _BODIES.items():
                _add_body(schema, path, model)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
