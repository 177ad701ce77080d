"""A request's HeteroCache arguments (``vllm_xargs``: ``heterocache_policy``,
``heterocache_ratio``), checked in the front end -- the API server, or ``LLM`` -- where vLLM
checks its own parameters, so that a bad value is an HTTP 400 naming the key and never reaches
the engine (``compat.validate_requests``), by the function the scheduler and the workers read
them with (``budget.request_terms``). A JSON boolean, which vLLM's request models turn into a
number, is refused before vLLM parses the body (:class:`RefuseBooleanArguments`).
"""

from __future__ import annotations

import json
from collections.abc import Callable

from vllm_heterocache.budget import Budgeter, ServerTerms, request_terms
from vllm_heterocache.config import HeteroCacheConfig
from vllm_heterocache.errors import HeteroCacheError
from vllm_heterocache.head_profile.resolve import resolve_profile
from vllm_heterocache.policies import RATIO_KEY, REQUEST_KEY_PREFIX, REQUEST_KEYS, RequestError
from vllm_heterocache.vllm_adapter import BACKEND_NAME


def server_terms(vllm_config) -> ServerTerms:
    """What the engine of ``vllm_config`` takes per request, as its workers compute it
    (``HeteroCacheRuntime.terms``: the same profile, config, tensor-parallel size and block size)."""
    config = HeteroCacheConfig.from_additional_config(vllm_config.additional_config)
    model = vllm_config.model_config
    budgeter = Budgeter(resolve_profile(model.hf_config, model.model, config.profile), config,
                        tp_size=vllm_config.parallel_config.tensor_parallel_size,
                        block_size=vllm_config.cache_config.block_size)
    return budgeter.server_terms()


def validator(vllm_config) -> Callable | None:
    """The check of a request's ``SamplingParams`` for a server of ``vllm_config``."""
    backend = getattr(vllm_config.attention_config, "backend", None)
    if getattr(backend, "name", None) != BACKEND_NAME:
        return _refuse_heterocache_args
    try:
        terms = server_terms(vllm_config)
    except HeteroCacheError:  # the engine refuses this config at startup, with the same message
        return None

    def validate(params) -> None:
        request_terms(terms, params.extra_args, strict=True)

    return validate


def _refuse_heterocache_args(params) -> None:
    """A server that does not run this backend would ignore them (known or misspelt): say so instead."""
    for key in params.extra_args or ():
        if key.startswith(REQUEST_KEY_PREFIX):
            raise RequestError(key, f"vllm_xargs.{key} needs a server started with --attention-backend heterocache; "
                               "this one runs another attention backend: drop the key or use a HeteroCache server")


def boolean_argument(body: bytes) -> tuple[str, str] | None:
    """``(key, message)`` when a JSON request body's ``vllm_xargs`` gives one of this plugin's
    keys a boolean, else None (a body that is not JSON is vLLM's to answer)."""
    if REQUEST_KEY_PREFIX.encode() not in body:  # (the common case: no JSON parsed twice)
        return None
    try:
        request = json.loads(body)
    except ValueError:
        return None
    xargs = request.get("vllm_xargs") if isinstance(request, dict) else None
    for key, value in (xargs.items() if isinstance(xargs, dict) else ()):
        if key in REQUEST_KEYS and isinstance(value, bool):
            what = "a number in (0, 1] (the fraction of the KV cache kept)" if key == RATIO_KEY else "a policy name"
            return key, f"vllm_xargs.{key} must be {what}, got the JSON boolean {json.dumps(value)}"
    return None


class RefuseBooleanArguments:
    """ASGI middleware of the API server: vLLM's request models read ``vllm_xargs`` values as
    ``str | int | float``, which turns a JSON ``true`` into ``1`` before any check sees it
    (``"heterocache_ratio": true`` would be served at ratio 1). This answers such a request with
    HTTP 400 naming the key, in vLLM's error format, before vLLM parses the body; every other
    request passes through unchanged (its body replayed)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope.get("method") != "POST":
            return await self.app(scope, receive, send)
        messages, body = [], b""
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":  # the client went away
                break
            body += message.get("body", b"")
            if not message.get("more_body", False):
                break
        refused = boolean_argument(body) if messages[-1]["type"] == "http.request" else None
        if refused is not None:
            key, text = refused
            error = {"error": {"message": text, "type": "BadRequestError", "param": f"vllm_xargs.{key}", "code": 400}}
            payload = json.dumps(error).encode()
            await send({"type": "http.response.start", "status": 400,
                        "headers": [(b"content-type", b"application/json"),
                                    (b"content-length", str(len(payload)).encode())]})
            await send({"type": "http.response.body", "body": payload})
            return None
        pending = iter(messages)

        async def replay():
            return next(pending, None) or await receive()

        return await self.app(scope, replay, send)
