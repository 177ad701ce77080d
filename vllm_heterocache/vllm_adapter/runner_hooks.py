"""What the model-runner hooks (``compat.hook_model_runner``) do, on the runner's own data.

Each hook is a no-op for a runner whose model has no HeteroCache layer. The step hook
(:func:`step_begins`) runs before vLLM builds a step's attention metadata: it admits the step's
requests and plans the step once (``HeteroCacheRuntime.begin_step``).
"""

from __future__ import annotations

import contextlib
import logging
import time

import torch

from vllm_heterocache.errors import ConfigError
from vllm_heterocache.runtime.core import HeteroCacheRuntime
from vllm_heterocache.runtime.host import HostTier
from vllm_heterocache.runtime.memory import available_memory
from vllm_heterocache.runtime.stats import snapshot
from vllm_heterocache.runtime.timing import section
from vllm_heterocache.vllm_adapter import compat
from vllm_heterocache.vllm_adapter.metrics import Publisher
from vllm_heterocache.vllm_adapter.pools import CompressedPoolSpec, is_heterocache_layer, split_kv_cache_specs

log = logging.getLogger("vllm.heterocache")

GIB = 1 << 30


def _state(runner) -> dict:
    def build() -> dict:
        found = {
            id(m.impl.runtime): m.impl.runtime
            for m in compat.static_forward_context(runner).values()
            if is_heterocache_layer(m) and hasattr(m, "impl")
        }
        if len(found) > 1:
            raise RuntimeError("heterocache: the model's layers do not share one runtime")
        return {"runtime": next(iter(found.values()), None), "dummy": False, "stats_at": time.monotonic(),
                "metrics": None}

    return compat.runner_state(runner, build)


def runtime_of(runner) -> HeteroCacheRuntime | None:
    """The runtime of the runner's HeteroCache layers, or None."""
    return _state(runner)["runtime"]


def _compressing(runner) -> HeteroCacheRuntime | None:
    rt = runtime_of(runner)
    return rt if rt is not None and rt.compresses else None


def split_specs(runner, specs: dict) -> dict:
    rt = _compressing(runner)
    if rt is None:
        return specs
    return split_kv_cache_specs(rt, specs, compat.static_forward_context(runner))


def attach_host_tier(runner, kv_cache_config) -> None:
    """Size, check and allocate the host tier once vLLM has allocated the KV cache."""
    rt = _compressing(runner)
    if rt is None or not rt.num_host_rows or rt.host is not None:
        return
    model = runner.vllm_config.model_config
    block_size = runner.vllm_config.cache_config.block_size
    dtype = compat.kv_cache_dtype(runner)
    token_bytes = rt.num_host_rows * 2 * model.get_head_size() * torch.empty((), dtype=dtype).element_size()
    block_bytes = token_bytes * block_size
    available = available_memory()  # the container's memory limit, if it leaves less than the machine
    sharers = _host_tiers_on_node(runner.vllm_config.parallel_config)
    cfg = rt.config
    if cfg.host_tier_gib is not None:
        want = int(cfg.host_tier_gib * GIB)
        if cfg.host_tier_path is None and want * sharers > 0.9 * available:
            raise ConfigError(
                f"heterocache.host_tier_gib={cfg.host_tier_gib} does not fit: it is per rank, {sharers} rank(s) of "
                f"this node hold one (tensor x pipeline x local data parallel), and {available / GIB:.1f} GiB of "
                "memory is available (to this container, if its memory limit leaves less than the machine). "
                "Lower heterocache.host_tier_gib, raise the memory limit, or set heterocache.host_tier_path to "
                "back the host tiers with files."
            )
        num_blocks = want // block_bytes
    else:
        # Room for as many prompt tokens as the KV cache holds for a full head, capped at half
        # the available memory, shared by the node's ranks.
        num_blocks = kv_cache_config.num_blocks * _largest_block(kv_cache_config) // block_size
        if cfg.host_tier_path is None:
            num_blocks = min(num_blocks, int(0.5 * available / sharers) // block_bytes)
    if num_blocks < 1:
        raise ConfigError(
            f"heterocache: the host tier cannot hold one block ({block_bytes} bytes): raise heterocache.host_tier_gib"
        )
    rt.attach_host_tier(
        HostTier(rows=rt.num_host_rows, head_size=model.get_head_size(), dtype=dtype, block_size=block_size,
                 num_blocks=num_blocks, path=cfg.host_tier_path)
    )
    log.info(
        "heterocache host tier: %.2f GiB for %d prompt tokens of %d satellite heads (%s; one of %d on this node)",
        rt.host.nbytes / GIB, num_blocks * block_size, rt.num_host_rows,
        f"file-backed in {cfg.host_tier_path}" if cfg.host_tier_path else "in RAM", sharers,
    )


def _host_tiers_on_node(parallel) -> int:
    """The ranks of this node that each allocate a host tier: the tensor- and pipeline-parallel
    ranks of one engine on this node, times the data-parallel engines of this node."""
    per_node = max(1, parallel.world_size // max(1, parallel.nnodes))
    return per_node * max(1, parallel.data_parallel_size_local)


def _largest_block(kv_cache_config) -> int:
    return max(group.kv_cache_spec.block_size for group in kv_cache_config.kv_cache_groups)


def requests_ended(runner, scheduler_output) -> None:
    """At the start of each step: free the state of the requests vLLM finished, aborted or preempted."""
    rt = _compressing(runner)
    if rt is None:
        return
    ended = set(scheduler_output.finished_req_ids) | set(scheduler_output.preempted_req_ids or ())
    if ended:
        rt.finish(ended)


def states_updated(runner) -> None:
    """Once the runner's batch holds the step's requests: publish the metrics
    (``vllm_adapter.metrics``) and log the stats line, when due."""
    rt = _compressing(runner)
    if rt is None:
        return
    state, now = _state(runner), time.monotonic()
    if state["metrics"] is None:
        state["metrics"] = _publisher(runner.vllm_config, rt)
    publisher = state["metrics"]
    log_due = now - state["stats_at"] >= rt.config.stats_interval_s
    if publisher.due(idle=not rt.requests) or log_due:
        snap = snapshot(rt)
        snap["gauges"] |= device_pool_usage(runner)
        publisher.publish(snap)
        if log_due:
            state["stats_at"] = now
            log.info("%s", stats_line(snap))


def _publisher(config, rt: HeteroCacheRuntime) -> Publisher:
    """Labelled as vLLM labels its own metrics (``model_name``, ``engine``), plus the rank."""
    return Publisher({
        "model_name": str(config.model_config.served_model_name),
        "engine": str(config.parallel_config.data_parallel_rank),
        "tp_rank": str(rt.tp_rank),
    })


def step_begins(runner, num_reqs: int) -> None:
    """The step hook: admit the step's requests and plan the step (dummy runs: no requests)."""
    rt = _compressing(runner)
    if rt is None:
        return
    with section("planning"):
        if _state(runner)["dummy"]:
            rt.dummy_step()
        else:
            rt.begin_step(*compat.step_batch(runner, num_reqs), compat.request_args_of(runner))


@contextlib.contextmanager
def dummy_step(runner):
    """vLLM's dummy runs (warm-up, profiling) have rows but no requests."""
    state = _state(runner)
    state["dummy"] = True
    try:
        yield
    finally:
        state["dummy"] = False


def device_pool_usage(runner) -> dict[str, dict[str, int]]:
    """``{"device_pool_blocks" | "device_pool_bytes": {"full" | "compressed": n}}``: what the
    running requests hold, per pool kind."""
    blocks, nbytes = {"full": 0, "compressed": 0}, {"full": 0, "compressed": 0}
    for gid, group in enumerate(compat.kv_cache_groups(runner)):
        held = compat.blocks_held(runner, gid)
        kind = "compressed" if _is_compressed(group.kv_cache_spec) else "full"
        blocks[kind] += held
        nbytes[kind] += held * group.kv_cache_spec.page_size_bytes
    return {"device_pool_blocks": blocks, "device_pool_bytes": nbytes}


def _is_compressed(spec) -> bool:
    inner = getattr(spec, "kv_cache_specs", None)
    first = next(iter(inner.values())) if inner else spec
    return isinstance(first, CompressedPoolSpec)


def stats_line(snap: dict) -> str:
    """The documented metrics line (README, "Metrics") of a snapshot (``states_updated``)."""
    c, g = snap["counters"], snap["gauges"]
    parts = [
        f"heterocache stats: requests {g['requests']}",
        f"prefill selections {c['prefill_selections']}",
        f"drift checks {c['drift_checks']}",
        f"drifts {c['drifts']}",
        f"refilled heads {c['refilled_heads']}",
        f"refill failures {c['refill_failures']}",
        f"refills pending {g['refills_pending']}",
    ]
    if "host_tier_blocks_total" in g:
        parts += [
            f"host tier {g['host_tier_blocks_used']}/{g['host_tier_blocks_total']} blocks",
            f"host bytes in {c['host_tier_bytes_in']} out {c['host_tier_bytes_out']}",
            f"host rejections {c['host_tier_rejections']}",
        ]
    for kind, blocks in g.get("device_pool_blocks", {}).items():
        parts.append(f"device {kind} pool {blocks} blocks {g['device_pool_bytes'][kind] / (1 << 20):.1f} MiB")
    return "; ".join(parts)
