"""HeteroCache's worker-side start inside Ray actors: two tensor-parallel ranks on a local Ray
cluster on 127.0.0.1, and one JSON line of what each rank built.

    python tests/ray_runner.py MODEL_DIR PROFILE.json

What vLLM's Ray executor does for a worker, done here by hand (vLLM 0.32 refuses the Ray
executor on its CPU platform): the engine config is made in the driver and pickled to each
actor (the HeteroCache backend member unpickles there), each actor builds vLLM's CPU worker,
joins the tensor-parallel group (gloo on 127.0.0.1), loads the model (the HeteroCache runtime
of its rank is built from the config it received, nothing from environment variables) and
reports its KV cache specs; the driver makes the KV cache configs from both ranks' specs, as
vLLM's engine core does, and each actor allocates its caches and host tier. Then both ranks run
one exchange of the drift messages of pivot clusters across ranks. Used by tests/test_ray.py.
"""

import json
import os
import subprocess
import sys

from vllm_heterocache.server_process import free_port


class RankWorker:
    """One tensor-parallel rank: vLLM's CPU worker, as a Ray actor would run it."""

    def __init__(self, config, rank: int, init_method: str):
        from vllm.config import set_current_vllm_config
        from vllm.v1.worker.cpu_worker import CPUWorker

        self.rank, self.config = rank, config
        with set_current_vllm_config(config):
            self.worker = CPUWorker(config, local_rank=rank, rank=rank, distributed_init_method=init_method,
                                    is_driver_worker=rank == 0)

    def start(self):
        from vllm.config import set_current_vllm_config

        with set_current_vllm_config(self.config):  # as vLLM's worker wrapper runs its worker
            self.worker.init_device()
            self.worker.load_model()
            return self.worker.get_kv_cache_spec(), self.worker.get_supported_kv_cache_layouts()

    def memory(self, layout: str) -> int:
        from vllm.config import set_current_vllm_config

        with set_current_vllm_config(self.config):
            self.worker.set_kv_cache_layout(layout)
            return self.worker.determine_available_memory()

    def allocate(self, kv_cache_config) -> None:
        from vllm.config import set_current_vllm_config

        with set_current_vllm_config(self.config):
            self.worker.initialize_from_config(kv_cache_config)

    def report(self) -> dict:
        import torch

        from vllm_heterocache.vllm_adapter import compat
        from vllm_heterocache.vllm_adapter.runner_hooks import runtime_of

        rt = runtime_of(compat.worker_model_runner(self.worker))
        summed = rt.exchange(torch.full((1, 2, 3), self.rank + 1, dtype=torch.int64))
        return {
            "rank": self.rank,
            "pid": os.getpid(),
            "describe": rt.describe(),
            "compresses": rt.compresses,
            "host_rows": rt.num_host_rows,
            "host_blocks": rt.host.num_blocks if rt.host is not None else 0,
            "shared": [list(lh.shared) for lh in rt.layers],
            "cache_pools": [list(lh.cache_pools) for lh in rt.layers],
            "exchanged": summed.flatten().tolist(),
        }


# A test cluster on loopback only, no token authentication, no usage reports. Ray 2.60 turns
# `--node-ip-address 127.0.0.1` into the machine's outward address ("remotely reachable"); with
# clusters "disabled" (its switch for macOS and Windows) every Ray process stays on 127.0.0.1.
os.environ.update(RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
RAY_ENV = dict(os.environ)
RAY = [sys.executable, "-m", "ray.scripts.scripts"]  # the `ray` command of this interpreter (PATH may not have it)


def main():
    model, profile = sys.argv[1:3]
    import ray
    from vllm.engine.arg_utils import EngineArgs
    from vllm.v1.attention.backends.utils import resolve_kv_cache_layout
    from vllm.v1.core.kv_cache_utils import get_kv_cache_configs

    config = EngineArgs(
        model=model, dtype="float32", max_model_len=2048, enforce_eager=True, enable_prefix_caching=False,
        tensor_parallel_size=2, distributed_executor_backend="mp", kv_cache_memory_bytes=1 << 27,
        attention_backend="heterocache",
        additional_config={"heterocache": {"profile": profile, "compression_ratio": 0.6, "host_tier_gib": 0.05}},
    ).create_engine_config()
    # a local cluster on loopback (a bare `ray start --head` binds to the machine's address)
    port = free_port()
    subprocess.run([*RAY, "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port), "--num-cpus", "2",
                    "--include-dashboard", "false", "--disable-usage-stats"], check=True, env=RAY_ENV)
    try:
        ray.init(address=f"127.0.0.1:{port}")
        # vLLM's own thread-binding variable, as its executors forward it to their workers
        actor = ray.remote(num_cpus=1, runtime_env={"env_vars": {"VLLM_CPU_OMP_THREADS_BIND": "0|1"}})(RankWorker)
        init = f"tcp://127.0.0.1:{free_port()}"
        ranks = [actor.remote(config, r, init) for r in range(2)]
        started = ray.get([a.start.remote() for a in ranks])  # the engine core's steps, in its order
        specs = [s for s, _ in started]
        layout = resolve_kv_cache_layout(config, [l for _, l in started], [s for spec in specs for s in spec.values()])
        memory = ray.get([a.memory.remote(layout.name) for a in ranks])
        kv_configs = get_kv_cache_configs(config, specs, memory)
        ray.get([a.allocate.remote(c) for a, c in zip(ranks, kv_configs)])
        reports = ray.get([a.report.remote() for a in ranks])
        same_specs = [sorted((n, type(s).__name__) for n, s in spec.items()) for spec in specs]
        nodes = [n["NodeManagerAddress"] for n in ray.nodes()]
        print("RESULT " + json.dumps({"ranks": reports, "same_specs": same_specs[0] == same_specs[1],
                                      "num_caches": len(specs[0]), "nodes": nodes}))
    finally:
        ray.shutdown()
        subprocess.run([*RAY, "stop", "--force"], check=False, env=RAY_ENV)


if __name__ == "__main__":
    main()
