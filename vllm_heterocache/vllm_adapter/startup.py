"""Startup checks and construction of the HeteroCache runtime from vLLM's config.

Everything a user can get wrong is checked here, with a message that names the flag or option to
change: what the config decides as soon as vLLM has made it (:func:`check_config`, in the front
end, before any engine process starts), the model's layers when they are built
(:func:`check_layer`).
"""

from __future__ import annotations

import logging
import shutil
import weakref

import torch

from vllm_heterocache.budget import Budgeter
from vllm_heterocache.config import HeteroCacheConfig
from vllm_heterocache.errors import ConfigError
from vllm_heterocache.head_profile.resolve import resolve_profile
from vllm_heterocache.head_profile.schema import HeadProfile
from vllm_heterocache.runtime.core import HeteroCacheRuntime
from vllm_heterocache.vllm_adapter import BACKEND_NAME, compat, runner_hooks

# A child of vLLM's logger, so the line shows with vLLM's own logging setup in every process.
log = logging.getLogger("vllm.heterocache")

# One runtime per engine (vllm_config object); ids are reused after garbage collection, so
# each entry keeps a weak reference to its config and is rebuilt if that config is gone.
_RUNTIMES: dict[int, tuple[weakref.ref, HeteroCacheRuntime]] = {}


def check_layer(attn_type: str, sliding_window, alibi_slopes, sinks, logits_soft_cap, kv_cache_dtype: str,
                kv_sharing_target_layer_name) -> None:
    """Refuse attention layers the method does not cover."""
    from vllm.v1.attention.backend import AttentionType

    unsupported = []
    if attn_type != AttentionType.DECODER:
        unsupported.append(f"{attn_type} attention (only decoder self-attention is supported)")
    if sliding_window is not None:
        unsupported.append(f"sliding-window attention (window {sliding_window})")
    if alibi_slopes is not None:
        unsupported.append("ALiBi")
    if sinks is not None:
        unsupported.append("attention sinks")
    if logits_soft_cap:
        unsupported.append("logit soft-capping")
    if kv_cache_dtype not in ("auto", None):
        unsupported.append(f"--kv-cache-dtype {kv_cache_dtype} (use auto)")
    if kv_sharing_target_layer_name is not None:
        unsupported.append("cross-layer KV sharing")
    if unsupported:
        raise ConfigError(
            "heterocache does not support " + "; ".join(unsupported)
            + " in this model: serve it without --attention-backend heterocache"
        )


def runtime_for(vllm_config) -> HeteroCacheRuntime:
    """The engine's runtime, built (and logged) on first use."""
    entry = _RUNTIMES.get(id(vllm_config))
    if entry is not None and entry[0]() is vllm_config:
        return entry[1]
    rt = _build(vllm_config)
    compat.hook_model_runner(runner_hooks)
    _RUNTIMES[id(vllm_config)] = (weakref.ref(vllm_config), rt)
    log.info("%s", rt.describe())
    return rt


def check_config(vllm_config) -> tuple[HeteroCacheConfig, HeadProfile]:
    """Everything about a HeteroCache engine that its config decides, checked where the config is
    made (``compat.check_engine_configs``: in the front end, before any engine process starts,
    so that the message is the last line a user sees) and again in each worker: the options, the
    head profile, the budget, and the vLLM features the backend does not cover. Returns the
    options and the profile."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        raise ConfigError(
            f"heterocache runs on vLLM's CPU platform only in this version, not on {current_platform.device_name}: "
            "serve without --attention-backend heterocache (GPU support is planned)"
        )
    config = HeteroCacheConfig.from_additional_config(vllm_config.additional_config)
    refused = []
    if vllm_config.speculative_config is not None:
        refused.append("speculative decoding yet: remove --speculative-config")
    if vllm_config.parallel_config.pipeline_parallel_size > 1:
        refused.append("pipeline parallelism yet: use --pipeline-parallel-size 1")
    if vllm_config.cache_config.cache_dtype not in ("auto", None):
        refused.append(f"--kv-cache-dtype {vllm_config.cache_config.cache_dtype}: use auto")
    model_config = vllm_config.model_config
    if model_config.use_mla:
        refused.append("MLA attention: serve this model without --attention-backend heterocache")
    if model_config.get_sliding_window() is not None:
        refused.append(f"sliding-window attention (window {model_config.get_sliding_window()}): serve this model "
                       "without --attention-backend heterocache")
    if refused:
        raise ConfigError("heterocache does not support " + "; ".join(refused))
    profile = resolve_profile(model_config.hf_config, model_config.model, config.profile)
    Budgeter(profile, config)  # an infeasible budget names the smallest feasible ratio
    return config, profile


def check_front_end(vllm_config) -> None:
    """:func:`check_config` for an engine config that selects this backend (the front end's
    check, ``compat.check_engine_configs``)."""
    backend = getattr(vllm_config.attention_config, "backend", None)
    if getattr(backend, "name", None) == BACKEND_NAME:
        check_config(vllm_config)
        check_shared_memory(vllm_config)


SHM_PATH = "/dev/shm"


def check_shared_memory(vllm_config, path: str = SHM_PATH) -> None:
    """Refuse to start where /dev/shm cannot hold vLLM's message queues (``compat.shm_queue_bytes``):
    a container engine's default (64 MB) is too small, and the worker's own error would come far
    below the last line."""
    needed = compat.shm_queue_bytes(vllm_config)
    try:
        free = shutil.disk_usage(path).free
    except OSError:  # no such file system: vLLM skips its own check then
        return
    if needed > free:
        mib = 1 << 20
        raise ConfigError(
            f"{path} has {free / mib:.0f} MiB free, but vLLM's engine puts shared-memory message queues of "
            f"{needed / mib:.0f} MiB there: give the container a larger {path} (docker/podman run --shm-size=1g, "
            "or --ipc=host; in Kubernetes, an emptyDir with medium: Memory mounted at /dev/shm)"
        )


def _build(vllm_config) -> HeteroCacheRuntime:
    from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size

    config, profile = check_config(vllm_config)
    tp_size = get_tensor_model_parallel_world_size()
    return HeteroCacheRuntime(
        profile,
        config,
        tp_rank=get_tensor_model_parallel_rank(),
        tp_size=tp_size,
        block_size=vllm_config.cache_config.block_size,
        exchange=_tp_sum if tp_size > 1 else None,
    )


def _tp_sum(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` summed over the tensor-parallel ranks, in place, on the TP group's CPU (gloo)
    group: the drift messages of pivot clusters across ranks are small host tensors."""
    from vllm.distributed import get_tp_group

    torch.distributed.all_reduce(tensor, group=get_tp_group().cpu_group)
    return tensor
