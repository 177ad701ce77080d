"""Registration of the HETEROCACHE attention backend with vLLM (run by ``register()``)."""

from __future__ import annotations

from vllm_heterocache.vllm_adapter import patches

BACKEND_NAME = "HETEROCACHE"
BACKEND_PATH = "vllm_heterocache.vllm_adapter.backend.HeteroCacheBackend"


def register_backend_member(name: str = BACKEND_NAME, path: str = BACKEND_PATH):
    """Create (once) and return ``AttentionBackendEnum.HETEROCACHE``; idempotent."""
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    member = AttentionBackendEnum._member_map_.get(name)
    if member is None:
        register_backend(name, path)
        member = AttentionBackendEnum[name]
        patches.pickle_member_by_name(member, name, path)
    return member


def register() -> None:
    register_backend_member()
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        patches.honour_backend_on_cpu(BACKEND_NAME, BACKEND_PATH)
