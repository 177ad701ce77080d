"""A request's HeteroCache arguments (``vllm_xargs``: ``heterocache_policy``,
``heterocache_ratio``), checked in the front end -- the API server, or ``LLM`` -- where vLLM
checks its own parameters, so that a bad value is an HTTP 400 naming the key and never reaches
the engine (``compat.validate_requests``; the rules are ``policies.RequestRules``).
"""

from __future__ import annotations

from collections.abc import Callable

from vllm_heterocache.budget import BudgetPlanner
from vllm_heterocache.config import HeteroCacheConfig
from vllm_heterocache.errors import HeteroCacheError
from vllm_heterocache.policies import REQUEST_KEY_PREFIX, RequestError, RequestRules
from vllm_heterocache.profile.resolve import resolve_profile
from vllm_heterocache.vllm_adapter import BACKEND_NAME


def server_rules(vllm_config) -> RequestRules:
    """What the engine of ``vllm_config`` takes per request (as its runtime computes it:
    ``HeteroCacheRuntime.request_rules``)."""
    config = HeteroCacheConfig.from_additional_config(vllm_config.additional_config)
    model = vllm_config.model_config
    return BudgetPlanner(resolve_profile(model.hf_config, model.model, config.profile), config).request_rules()


def validator(vllm_config) -> Callable | None:
    """The check of a request's ``SamplingParams`` for a server of ``vllm_config``."""
    backend = getattr(vllm_config.attention_config, "backend", None)
    if getattr(backend, "name", None) != BACKEND_NAME:
        return _refuse_heterocache_args
    try:
        rules = server_rules(vllm_config)
    except HeteroCacheError:  # the engine refuses this config at startup, with the same message
        return None

    def validate(params) -> None:
        rules.parse(params.extra_args)

    return validate


def _refuse_heterocache_args(params) -> None:
    """A server that does not run this backend would ignore them (known or misspelt): say so instead."""
    for key in params.extra_args or ():
        if key.startswith(REQUEST_KEY_PREFIX):
            raise RequestError(key, f"vllm_xargs.{key} needs a server started with --attention-backend heterocache; "
                               "this one runs another attention backend: drop the key or use a HeteroCache server")
