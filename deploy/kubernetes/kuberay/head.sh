#!/bin/bash
# The Ray head's container command (RayCluster in raycluster.yaml): start Ray, wait until the
# workers' GPUs have joined, then serve with vLLM's Ray executor, one tensor-parallel rank per GPU.
set -euo pipefail
ulimit -n 65536 || true  # Ray opens many sockets (KubeRay's own generated command does the same)

# 1. Ray's head daemons, as KubeRay generated the command from rayStartParams. It runs with
#    --block, so it stays in the background for as long as the daemons run.
bash -c "$KUBERAY_GEN_RAY_START_CMD" &

# 2. vLLM's Ray executor places its ranks once, at startup: wait for TP_SIZE GPUs in the cluster.
python3 - <<'PY'
import os, sys, time

import ray

want = int(os.environ["TP_SIZE"])
deadline = time.monotonic() + int(os.environ.get("WAIT_FOR_GPUS_S", "1200"))
while True:
    try:
        ray.init(address="auto", logging_level="ERROR")
        break
    except Exception as e:  # the head's GCS is not up yet
        if time.monotonic() > deadline:
            sys.exit(f"the Ray head did not come up: {e}")
        time.sleep(5)
while (have := ray.cluster_resources().get("GPU", 0)) < want:
    if time.monotonic() > deadline:
        sys.exit(f"{have:g} of TP_SIZE={want} GPUs joined the Ray cluster; are the worker pods scheduled?")
    print(f"waiting for GPUs to join the Ray cluster: {have:g} of {want}", flush=True)
    time.sleep(10)
ray.shutdown()
PY

# 3. The server: heterocache serve execs vllm serve (HETEROCACHE_* variables: the container's env).
exec heterocache serve --tensor-parallel-size="$TP_SIZE" --distributed-executor-backend=ray \
    --served-model-name=meta-llama/Llama-3.1-8B-Instruct --gpu-memory-utilization=0.90 \
    --shutdown-timeout=120 --disable-access-log-for-endpoints=/health,/metrics
