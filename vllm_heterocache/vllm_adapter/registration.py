"""Registration of the HETEROCACHE attention backend with vLLM (run by ``register()``)."""

from __future__ import annotations

from vllm_heterocache.vllm_adapter import BACKEND_NAME, BACKEND_PATH, compat


def register() -> None:
    """``AttentionBackendEnum.HETEROCACHE``, the compressed pools' KV cache spec and, on CPU, the
    platform patch that honours the selection (``compat``). Idempotent."""
    from vllm_heterocache import env

    env.check()
    compat.register_backend_member(BACKEND_NAME, BACKEND_PATH, backend_member)
    from vllm_heterocache.vllm_adapter import metrics

    metrics.install()  # before this process starts the engine's: they inherit its metrics directory
    from vllm.platforms import current_platform

    from vllm_heterocache.vllm_adapter.pools import register_pool_spec

    register_pool_spec()
    from vllm_heterocache.vllm_adapter.request_args import RefuseBooleanArguments, validator

    compat.validate_requests(validator)
    compat.add_api_middleware(RefuseBooleanArguments)
    from vllm_heterocache.vllm_adapter.startup import check_front_end

    compat.check_engine_configs(check_front_end)
    if current_platform.is_cpu():
        compat.honour_backend_on_cpu(BACKEND_NAME, BACKEND_PATH)
    from vllm_heterocache.runtime import timing

    if timing.ENABLED:  # HETEROCACHE_STEP_TIMING=1: the benchmarks' per-step breakdown
        compat.install_step_timing(timing.TIMER)


def backend_member():
    """``AttentionBackendEnum.HETEROCACHE`` after :func:`register` (how the member unpickles)."""
    register()
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    return AttentionBackendEnum[BACKEND_NAME]
