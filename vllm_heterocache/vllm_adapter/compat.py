"""Every private vLLM name this plugin uses, and every change it makes to vLLM's code, in one place.

The bottom of ``vllm_adapter``: it imports vLLM and nothing of ours above it. The other adapter
modules use vLLM's public API directly (attention backend, metadata builder, KV cache specs and
managers, forward context, config) and reach everything private through this module. Nothing
here runs at import time: ``registration.register()`` applies the registrations and the CPU
platform patch; ``startup.runtime_for`` applies the model-runner hooks when the first HeteroCache
layer is built. Each patch is narrow and idempotent. Written against vLLM 0.32.0.

| name | why | remove when |
|---|---|---|
| ``CpuPlatform.get_attn_backend_cls`` (patched) | on CPU, vLLM returns CPU_ATTN for every decoder layer whatever backend was asked for (``platforms/cpu.py``), logging only "Cannot use ... backend on CPU": HETEROCACHE would be silently replaced by the stock backend | vLLM's CPU platform honours registered custom backends |
| ``AttentionBackendEnum._member_map_``, the member's ``__reduce_ex__`` (patched) | a member created at run time pickles by value, and spawned engine/worker processes (and Ray actors) unpickle the config before plugins load: the lookup fails there; pickled as a call of ``registration.backend_member``, the unpickler registers everything first (also the CPU platform patch, else the actor would silently run the stock backend) | vLLM loads plugins before unpickling configs, or pickles members by name |
| ``KVCacheSpecRegistry._ensure_registered`` | registering a spec before the built-in ones makes the registry skip the built-ins | vLLM registers its built-ins on import of the registry |
| ``SingleTypeKVCacheManager._remove_blocks_in_range`` | the compressed pools' manager frees a middle range of a request's blocks, as vLLM's R-SWA manager does; there is no public method for it | vLLM exposes a public range-free on managers |
| ``GPUModelRunner.get_kv_cache_spec`` (patched; the CPU runner inherits it) | a backend can reshape a layer's spec only uniformly (``customize_spec`` gets no layer), but HeteroCache keeps each layer's heads in caches of per-layer pools | vLLM lets a backend build per-layer specs and companion caches |
| ``GPUModelRunner.initialize_kv_cache`` (patched) | the host tier is sized from the KV cache vLLM allocated | vLLM offers a post-allocation hook to backends |
| ``GPUModelRunner._update_states``, ``_build_attention_metadata``, ``_dummy_run`` (patched) | attention backends get no request ids and no finish/preempt callbacks (model runner V1); HeteroCache keeps per-request state and host-tier blocks and plans each step once before the metadata builders run | backends receive request lifecycle events and a step hook (e.g. model runner V2's req_idx plus finish callbacks) |
| runner internals: ``input_batch`` (``req_ids``, ``num_prompt_tokens``, ``block_table``), ``query_start_loc``, ``seq_lens``, ``kv_cache_config``, ``kv_cache_dtype``, ``compilation_config.static_forward_context`` | the step hook reads which request each row is and where its tokens are; companion cache layers are registered in the static forward context (precedent: DeepseekV32IndexerCache); the metrics line reads the blocks held per pool | the lifecycle hooks above pass these |
| ``ForwardContext.no_compile_layers`` | the companion cache layers' bound KV caches | vLLM passes a layer's companion caches to its impl |
| ``Attention._k_scale_float``, ``_v_scale_float`` | the cache-write and attention ops take the layer's KV scales (1.0: fp8 KV caches are refused) | the impl receives the scales |
| ``vllm._custom_ops.cpu_attn_reshape_and_cache``, ``cpu_attention_with_kv_cache``, ``cpu_attn_get_scheduler_metadata`` | the CPU backend's own cache-write and attention ops, run per head cache, and its kernel plan, built for the prefilling rows of a mixed step as ``CPUAttentionMetadataBuilder.build`` builds it for all rows | (stable ops of the CPU backend; private module) |
| ``KVCacheManager.get_computed_blocks`` (patched) | a request whose compressed heads select tokens may hit the prefix cache up to its observation window only (its window's queries must be computed), but the hit search sees block hashes, not the request | vLLM lets a KV cache spec bound a request's hit |
| ``KVCacheManager.allocate_slots`` (patched), ``coordinator.single_type_managers``, ``Request.sampling_params`` | a compressed pool's block manager keeps a request's budget, which its policy and ratio (``vllm_xargs``) decide, but managers see request ids only | managers receive the request (or its KV budget) |
| ``InputProcessor.__init__`` (patched), ``validate_logits_processors_params`` | a request's ``heterocache_policy`` / ``heterocache_ratio`` are checked where vLLM checks its parameters, so a bad value is an HTTP 400 naming the key; the only per-request hook is a logits processor's classmethod, which gets no config | vLLM offers a request-validation hook to plugins with the config |
| ``vllm.entrypoints.launchers.app.init_entrypoints_middleware`` (wrapped) | vLLM's request models read ``vllm_xargs`` values as ``str | int | float``, turning a JSON ``true`` into ``1`` before any check sees it; the only way to refuse it is to see the body first (ASGI middleware), and endpoint plugins, which could add one, load only when named in ``VLLM_PLUGINS`` | vLLM keeps JSON booleans in ``vllm_xargs`` (or offers plugins a default-on middleware hook) |
| ``EngineArgs.create_engine_config`` (patched) | a configuration the backend refuses is refused where vLLM makes the config, before the engine core and its workers start: their errors end in "Engine core initialization failed", far below the message | vLLM lets a backend validate the whole config (``validate_configuration`` sees one layer's parameters, in the worker) |
| ``GPUModelRunner.requests`` | the step hook reads a new request's ``vllm_xargs`` (its policy and ratio) | the lifecycle hooks above pass the sampling params |
| ``MessageQueue.__init__``'s defaults (``max_chunk_bytes``, ``max_chunks``), ``envs.VLLM_MQ_MAX_CHUNK_BYTES_MB``, ``ParallelConfig.distributed_executor_backend`` | the multiprocess executor's message queues are ring buffers in /dev/shm of these sizes; with too small a /dev/shm (a container engine's default 64 MB) a worker fails at startup, far below the message (``startup.check_shared_memory``) | vLLM checks /dev/shm where it makes the config |
| ``LLMEngine.engine_core.engine_core`` (an in-process engine's core), ``Scheduler.kv_cache_manager`` (its ``block_pool``, ``coordinator.single_type_managers``' ``req_to_blocks``), ``Scheduler.running``, ``has_requests``, ``kv_cache_config``, ``_preempt_request`` (wrapped), ``model_executor.driver_worker.worker.model_runner``, ``Worker.model_runner``; ``CPUWorker``, ``get_kv_cache_configs``, ``resolve_kv_cache_layout`` | tests and benchmarks only (``engine_scheduler`` and the functions after it; tests/ray_runner.py drives two ranks as Ray actors the way vLLM's Ray executor does): they check vLLM's own block accounting, count preemptions and read each rank's runtime; vLLM has no public view of these | vLLM exposes block usage and preemption counts per engine (its ``/metrics`` gives usage as a fraction only) |
| ``vllm.v1.attention.backends.cpu_attn._get_attn_isa`` | the ISA of the CPU kernels for a dtype / block size / head size (tests build caches in it) | |
| ``GPUModelRunner.execute_model``, ``sample_tokens``, ``_build_attention_metadata``, ``CPUAttentionBackendImpl.forward``, ``do_kv_cache_update`` (patched only with ``HETEROCACHE_STEP_TIMING=1``) | the per-step time breakdown of the benchmarks (``runtime.timing``), for the stock backend as for HeteroCache | vLLM's own per-step profiling reports attention time |
"""

from __future__ import annotations

import logging
import sys
import weakref

import torch

log = logging.getLogger("vllm.heterocache")

_APPLIED: set[str] = set()


# -- selection of the backend (registration.register) ---------------------------------------------


def register_backend_member(name: str, path: str, unpickle):
    """Create (once) and return ``AttentionBackendEnum.<name>``; idempotent. It pickles as a call
    of ``unpickle()`` (which must register everything and return the member), so a process that
    unpickles a config selecting it before loading plugins (a spawned worker, a Ray actor) is
    set up in full instead of silently getting the platform's default backend."""
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    member = AttentionBackendEnum._member_map_.get(name)
    if member is None:
        register_backend(name, path)
        member = AttentionBackendEnum[name]
        member.__reduce_ex__ = lambda protocol: (unpickle, ())
    return member


def honour_backend_on_cpu(backend_name: str, backend_path: str) -> None:
    """Make the CPU platform return our backend's class path when it is the selected one."""
    if "cpu_platform" in _APPLIED:
        return
    from vllm.platforms.cpu import CpuPlatform

    original = CpuPlatform.get_attn_backend_cls.__func__

    def get_attn_backend_cls(cls, selected_backend, attn_selector_config, num_heads=None):
        if selected_backend is not None and getattr(selected_backend, "name", None) == backend_name:
            if attn_selector_config.use_mla or attn_selector_config.use_sparse:
                raise ValueError(
                    "heterocache supports standard multi-head / grouped-query attention only, not MLA "
                    "or sparse attention: serve this model without --attention-backend heterocache"
                )
            return backend_path
        return original(cls, selected_backend, attn_selector_config, num_heads)

    CpuPlatform.get_attn_backend_cls = classmethod(get_attn_backend_cls)
    _APPLIED.add("cpu_platform")


def register_kv_cache_spec(spec_cls, manager_cls) -> None:
    """Map a KV cache spec to its block manager (built-in specs first, or they are skipped)."""
    from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry

    if spec_cls.__name__ in _APPLIED:
        return
    KVCacheSpecRegistry._ensure_registered()
    KVCacheSpecRegistry.register(spec_cls, manager_cls, spec_cls)
    _APPLIED.add(spec_cls.__name__)


def remove_blocks_in_range(manager, request_id: str, start: int, end: int) -> None:
    """Free blocks ``start .. end - 1`` of a request in a single-type manager (null blocks remain)."""
    manager._remove_blocks_in_range(request_id, start, end)


def observe_kv_allocation(observe) -> None:
    """Call ``observe(kv_cache_manager, request, computed)`` before the scheduler's KV cache
    manager allocates a step's slots for ``request`` (every scheduled request, every step, in the
    scheduler's process); ``computed``: its tokens whose KV is there before this step, the prefix
    cache's hit included (vLLM's scheduler passes the hit by keyword)."""
    if "kv_allocation" in _APPLIED:
        return
    from vllm.v1.core.kv_cache_manager import KVCacheManager

    allocate_slots = KVCacheManager.allocate_slots

    def _allocate_slots(self, request, *args, **kwargs):
        computed = (request.num_computed_tokens + kwargs.get("num_new_computed_tokens", 0)
                    + kwargs.get("num_external_computed_tokens", 0))
        observe(self, request, computed)
        return allocate_slots(self, request, *args, **kwargs)

    KVCacheManager.allocate_slots = _allocate_slots
    _APPLIED.add("kv_allocation")


def limit_prefix_hits(limit) -> None:
    """Cap every prefix-cache hit of the scheduler's KV cache manager at ``limit(kv_cache_manager,
    request)`` tokens (None: no cap). The hit is cut before its blocks are touched, so vLLM's
    block reference counts and its ``vllm:prefix_cache_*`` counters see the capped hit only."""
    if "prefix_hits" in _APPLIED:
        return
    from vllm.v1.core.kv_cache_manager import KVCacheManager

    get_computed_blocks = KVCacheManager.get_computed_blocks

    def _get_computed_blocks(self, request):
        blocks, num_tokens, boundary = get_computed_blocks(self, request)
        cap = limit(self, request) if num_tokens else None
        if cap is not None and num_tokens > cap:
            blocks, num_tokens = self.truncate_computed_blocks(blocks, cap), cap
            boundary = min(boundary, cap) if boundary else 0
        return blocks, num_tokens, boundary

    KVCacheManager.get_computed_blocks = _get_computed_blocks
    _APPLIED.add("prefix_hits")


def single_type_managers(kv_cache_manager) -> tuple:
    """The per-group block managers of a scheduler's KV cache manager."""
    return tuple(kv_cache_manager.coordinator.single_type_managers)


def request_extra_args(request):
    """A request's ``SamplingParams.extra_args`` (``vllm_xargs``), or None: a scheduler's
    ``Request`` or a runner's ``CachedRequestState``."""
    params = request.sampling_params
    return None if params is None else params.extra_args


def validate_requests(make_validator) -> None:
    """Check every request's parameters where vLLM validates them, in the API server (or the
    ``LLM`` front end), before it reaches the engine: ``make_validator(vllm_config)`` returns a
    function of the request's ``SamplingParams`` raising ``ValueError`` (an HTTP 400), or None."""
    if "input_validation" in _APPLIED:
        return
    from vllm.exceptions import VLLMValidationError
    from vllm.v1.engine.input_processor import InputProcessor

    init = InputProcessor.__init__

    def __init__(self, vllm_config, *args, **kwargs):
        init(self, vllm_config, *args, **kwargs)
        validator = make_validator(vllm_config)
        if validator is None:
            return
        inner = self.validate_logits_processors_params

        def validate(params) -> None:
            inner(params)
            try:
                validator(params)
            except VLLMValidationError:
                raise
            except ValueError as e:
                raise VLLMValidationError(str(e), parameter=getattr(e, "key", None)) from e

        self.validate_logits_processors_params = validate

    InputProcessor.__init__ = __init__
    _APPLIED.add("input_validation")


def add_api_middleware(middleware) -> None:
    """Add the ASGI ``middleware`` class to the API servers this process builds, after vLLM's
    own. Applied only where vLLM's app builder is loaded already (``vllm serve`` imports it before
    it loads plugins): other processes need no web framework imported."""
    launcher = sys.modules.get("vllm.entrypoints.launchers.app")
    if "api_middleware" in _APPLIED or launcher is None:
        return
    init = launcher.init_entrypoints_middleware

    def init_entrypoints_middleware(args, app, *rest, **kwargs):
        init(args, app, *rest, **kwargs)
        app.add_middleware(middleware)

    launcher.init_entrypoints_middleware = init_entrypoints_middleware
    _APPLIED.add("api_middleware")


def check_engine_configs(check) -> None:
    """Call ``check(vllm_config)`` on every engine config as soon as vLLM has made it from the
    engine arguments: in the API server (or the ``LLM`` front end), before any engine process
    starts, so that an error is the last thing the user sees rather than a worker traceback."""
    if "engine_configs" in _APPLIED:
        return
    from vllm.engine.arg_utils import EngineArgs

    create_engine_config = EngineArgs.create_engine_config

    def _create_engine_config(self, *args, **kwargs):
        config = create_engine_config(self, *args, **kwargs)
        check(config)
        return config

    EngineArgs.create_engine_config = _create_engine_config
    _APPLIED.add("engine_configs")


def request_args_of(runner):
    """``req_id -> SamplingParams.extra_args`` (``vllm_xargs``) of the runner's requests."""
    requests = runner.requests
    return lambda req_id: request_extra_args(requests[req_id])


# -- the model runner ----------------------------------------------------------------------------


def hook_model_runner(hooks) -> None:
    """Route the runner's spec building, KV cache allocation, request lifecycle and step start
    to ``hooks`` (``vllm_adapter.runner_hooks``: ``split_specs``, ``attach_host_tier``,
    ``requests_ended``, ``states_updated``, ``step_begins``, ``dummy_step``)."""
    if "model_runner" in _APPLIED:
        return
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    get_kv_cache_spec = GPUModelRunner.get_kv_cache_spec
    initialize_kv_cache = GPUModelRunner.initialize_kv_cache
    update_states = GPUModelRunner._update_states
    build_attention_metadata = GPUModelRunner._build_attention_metadata
    dummy_run = GPUModelRunner._dummy_run

    def _get_kv_cache_spec(self):
        return hooks.split_specs(self, get_kv_cache_spec(self))

    def _initialize_kv_cache(self, kv_cache_config, *args, **kwargs):
        result = initialize_kv_cache(self, kv_cache_config, *args, **kwargs)
        hooks.attach_host_tier(self, kv_cache_config)
        return result

    def _update_states(self, scheduler_output):
        hooks.requests_ended(self, scheduler_output)
        result = update_states(self, scheduler_output)
        hooks.states_updated(self)
        return result

    def _build_attention_metadata(self, num_tokens, num_reqs, *args, **kwargs):
        hooks.step_begins(self, num_reqs)
        return build_attention_metadata(self, num_tokens, num_reqs, *args, **kwargs)

    def _dummy_run(self, *args, **kwargs):
        with hooks.dummy_step(self):
            return dummy_run(self, *args, **kwargs)

    GPUModelRunner.get_kv_cache_spec = _get_kv_cache_spec
    GPUModelRunner.initialize_kv_cache = _initialize_kv_cache
    GPUModelRunner._update_states = _update_states
    GPUModelRunner._build_attention_metadata = _build_attention_metadata
    GPUModelRunner._dummy_run = _dummy_run
    _APPLIED.add("model_runner")


def install_step_timing(timer) -> None:
    """Time every engine step and its attention and metadata building (``runtime.timing``)."""
    if "step_timing" in _APPLIED:
        return
    import time

    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackendImpl
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    def timed(cls, name: str, section: str) -> None:
        method = getattr(cls, name)

        def wrapper(self, *args, **kwargs):
            with timer.section(section):
                return method(self, *args, **kwargs)

        setattr(cls, name, wrapper)

    timed(CPUAttentionBackendImpl, "forward", "attention")
    timed(CPUAttentionBackendImpl, "do_kv_cache_update", "attention")
    timed(GPUModelRunner, "_build_attention_metadata", "planning")
    execute_model, sample_tokens = GPUModelRunner.execute_model, GPUModelRunner.sample_tokens
    step = {"start": 0.0, "decode": False}

    def _execute_model(self, scheduler_output, *args, **kwargs):
        step["start"] = time.perf_counter()
        n = len(scheduler_output.num_scheduled_tokens)
        step["decode"] = n > 0 and scheduler_output.total_num_scheduled_tokens == n
        out = execute_model(self, scheduler_output, *args, **kwargs)
        if out is not None:  # no separate sampling call
            timer.end_step(time.perf_counter() - step["start"], step["decode"])
        return out

    def _sample_tokens(self, *args, **kwargs):
        out = sample_tokens(self, *args, **kwargs)
        timer.end_step(time.perf_counter() - step["start"], step["decode"])
        return out

    GPUModelRunner.execute_model = _execute_model
    GPUModelRunner.sample_tokens = _sample_tokens
    _APPLIED.add("step_timing")


# Per-runner state of ours, kept beside the runner instead of in attributes set on it.
_RUNNER_STATE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def runner_state(runner, build) -> dict:
    """Our state of ``runner``, made by ``build()`` on first use."""
    state = _RUNNER_STATE.get(runner)
    if state is None:
        state = _RUNNER_STATE[runner] = build()
    return state


def static_forward_context(runner) -> dict:
    """Layer name -> module of every attention (and companion cache) layer of the runner."""
    return runner.compilation_config.static_forward_context


def step_batch(runner, num_reqs: int) -> tuple[list[str], list[int], list[int], list[int]]:
    """The rows of the step being prepared: request ids, prompt lengths, query start locations
    (``num_reqs + 1``) and sequence lengths (after this step's tokens)."""
    batch = runner.input_batch
    return (
        list(batch.req_ids[:num_reqs]),
        batch.num_prompt_tokens[:num_reqs].tolist(),
        runner.query_start_loc.cpu[: num_reqs + 1].tolist(),
        runner.seq_lens[:num_reqs].tolist(),
    )


def kv_cache_groups(runner) -> list:
    return list(runner.kv_cache_config.kv_cache_groups)


def blocks_held(runner, group: int) -> int:
    """Blocks (null blocks excluded) the running requests hold in KV cache group ``group``."""
    n = runner.input_batch.num_reqs
    table = runner.input_batch.block_table[group]
    ids = table.block_table.np[:n]
    return sum(int((ids[i, : table.num_blocks_per_row[i]] != 0).sum()) for i in range(n))


def kv_cache_dtype(runner) -> torch.dtype:
    dtype = getattr(runner, "kv_cache_dtype", None)
    return dtype if isinstance(dtype, torch.dtype) else runner.vllm_config.model_config.dtype


# -- the attention layer -------------------------------------------------------------------------


def layer_index(layer_name: str) -> int:
    from vllm.model_executor.models.utils import extract_layer_index

    return extract_layer_index(layer_name)


def companion_caches(names) -> list[torch.Tensor]:
    """The bound KV caches of the named companion cache layers in the current forward pass."""
    from vllm.forward_context import get_forward_context

    layers = get_forward_context().no_compile_layers
    return [layers[name].kv_cache for name in names]


def step_metadata(names) -> tuple:
    """The attention metadata of the named (companion) cache layers in the current forward pass:
    each their KV cache group's, as vLLM's metadata builders returned it for this step (the
    forward context's per-layer dict; vLLM makes a list of them only for speculative decoding and
    micro-batches, which this backend does not run)."""
    from vllm.forward_context import get_forward_context

    per_layer = get_forward_context().attn_metadata
    if not isinstance(per_layer, dict):
        raise RuntimeError(f"heterocache: expected one attention metadata dict per step, got {type(per_layer).__name__}")
    return tuple(per_layer[name] for name in names)


def kv_scales(layer) -> tuple[float, float]:
    return layer._k_scale_float, layer._v_scale_float


def attn_isa(dtype: torch.dtype, block_size: int, head_size: int) -> str:
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    return _get_attn_isa(dtype, block_size, head_size)


def write_kv(key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor, isa: str,
             scales: tuple[float, float] = (1.0, 1.0), kv_cache_dtype: str = "auto") -> None:
    """vLLM's CPU cache write: ``key``/``value`` ``[T, H, D]`` into ``kv_cache`` ``[num_blocks, H,
    block_size, 2 * D]`` at ``slot_mapping`` ``[T]`` (block * block_size + offset)."""
    from vllm import _custom_ops as ops

    nb, h, bs, _ = kv_cache.shape
    key_cache, value_cache = kv_cache.view(nb, h, bs * 2, -1).chunk(2, dim=2)
    ops.cpu_attn_reshape_and_cache(key.contiguous(), value.contiguous(), key_cache, value_cache, slot_mapping, isa,
                                   k_scale=scales[0], v_scale=scales[1], kv_cache_dtype=kv_cache_dtype)


def cpu_kernel_plan(builder, query_start_loc: torch.Tensor, seq_lens: torch.Tensor, causal: bool) -> torch.Tensor:
    """vLLM's CPU kernel plan (scheduler metadata) of ``builder``'s caches for the given rows, as
    ``CPUAttentionMetadataBuilder.build`` computes it for all of a step's rows."""
    from vllm import _custom_ops as ops
    from vllm import envs

    return ops.cpu_attn_get_scheduler_metadata(
        num_reqs=seq_lens.numel(), num_heads=builder.num_heads, num_kv_heads=builder.num_kv_heads,
        head_dim=builder.head_dim, seq_lens=seq_lens, dtype=builder.dtype, query_start_loc=query_start_loc,
        causal=causal, sliding_window_size=builder.window_size, isa=builder.isa,
        enable_kv_split=envs.VLLM_CPU_ATTN_SPLIT_KV, dynamic_causal=None, kv_cache_dtype=builder.kv_cache_dtype,
    )


def cpu_attention(query: torch.Tensor, kv_cache: torch.Tensor, output: torch.Tensor, meta, scale: float,
                  sliding_window, softcap, scales: tuple[float, float], kv_cache_dtype: str) -> None:
    """vLLM's CPU attention of ``query`` ``[T, Hq, D]`` (contiguous) over ``kv_cache`` with the
    CPU backend's metadata ``meta``, into ``output`` ``[T, Hq, D]``."""
    from vllm import _custom_ops as ops

    nb, h, bs, _ = kv_cache.shape
    key_cache, value_cache = kv_cache.view(nb, h, bs * 2, -1).chunk(2, dim=2)
    ops.cpu_attention_with_kv_cache(
        query=query, key_cache=key_cache, value_cache=value_cache, output=output,
        query_start_loc=meta.query_start_loc, seq_lens=meta.seq_lens, scale=scale, causal=meta.causal,
        alibi_slopes=None, sliding_window=sliding_window, block_table=meta.block_table, softcap=softcap,
        scheduler_metadata=meta.scheduler_metadata, s_aux=None, dynamic_causal=meta.dynamic_causal,
        k_scale=scales[0], v_scale=scales[1], kv_cache_dtype=kv_cache_dtype,
    )


def shm_queue_bytes(vllm_config) -> int:
    """The largest segment vLLM's multiprocess executor creates in /dev/shm, 0 for executors that
    create none there. Its scheduler-output broadcast queue and each worker's response queue are
    ``MessageQueue`` ring buffers of ``max_chunks x max_chunk_bytes`` (the broadcast's chunk from
    ``VLLM_MQ_MAX_CHUNK_BYTES_MB``, the responses' the class default); vLLM checks each against
    the free space as it creates it (they are sparse until written)."""
    import inspect

    from vllm import envs
    from vllm.distributed.device_communicators.shm_broadcast import MessageQueue

    if vllm_config.parallel_config.distributed_executor_backend != "mp":
        return 0
    defaults = inspect.signature(MessageQueue.__init__).parameters
    chunks = defaults["max_chunks"].default
    chunk = max(envs.VLLM_MQ_MAX_CHUNK_BYTES_MB << 20, defaults["max_chunk_bytes"].default)
    return chunks * chunk


# -- tests and benchmarks: an in-process engine's internals ------------------------------------------


def engine_scheduler(llm):
    """The scheduler of an ``LLM``'s in-process engine core (``VLLM_ENABLE_V1_MULTIPROCESSING=0``),
    else None."""
    core = getattr(getattr(llm.llm_engine, "engine_core", None), "engine_core", None)
    return None if core is None else core.scheduler


def engine_block_pool(scheduler):
    """vLLM's block pool of ``scheduler`` (``get_num_free_blocks()``, ``num_gpu_blocks``)."""
    return scheduler.kv_cache_manager.block_pool


def engine_kv_cache_groups(scheduler) -> list:
    return list(scheduler.kv_cache_config.kv_cache_groups)


def engine_blocks_by_group(scheduler) -> list[dict]:
    """Per KV cache group: request id -> the blocks it holds (null blocks included)."""
    return [m.req_to_blocks for m in scheduler.kv_cache_manager.coordinator.single_type_managers]


def count_preemptions(scheduler) -> list[str]:
    """The ids of the requests ``scheduler`` preempts from now on, appended as it does."""
    preempted: list[str] = []
    original = scheduler._preempt_request

    def counting(request, *args, **kwargs):
        preempted.append(request.request_id)
        return original(request, *args, **kwargs)

    scheduler._preempt_request = counting
    return preempted


def driver_model_runner(llm):
    """The model runner of an ``LLM``'s driver worker, when it runs in this process (else None)."""
    worker = getattr(getattr(llm.llm_engine, "model_executor", None), "driver_worker", None)
    return None if worker is None else worker.worker.model_runner


def worker_model_runner(worker):
    """The model runner of a vLLM worker (``LLM.collective_rpc``'s argument, or a worker object)."""
    return worker.model_runner
