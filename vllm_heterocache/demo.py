"""``heterocache demo``: serve the embedded default model with the HeteroCache backend.

Prepares SmolLM2-135M-Instruct (once), starts ``vllm serve`` on 127.0.0.1 with
``--attention-backend heterocache``, waits until it answers, sends one chat request and prints
the reply, then keeps serving until Ctrl-C (``--once``: stops after the reply).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

SERVED_NAME = "SmolLM2-135M-Instruct"
QUESTION = "What is the capital of France?"


def serve_command(model: Path, host: str, port: int, options: dict) -> list[str]:
    vllm = shutil.which("vllm", path=str(Path(sys.executable).parent)) or "vllm"
    return [
        vllm, "serve", str(model), "--served-model-name", SERVED_NAME, "--host", host, "--port", str(port),
        "--attention-backend", "heterocache", "--additional-config", json.dumps({"heterocache": options}),
        "--no-enable-prefix-caching", "--max-model-len", "8192",
        # float32: vLLM 0.32's CPU kernels answered garbage for this model in bfloat16 on AVX2
        # machines (measured with the stock backend too); the model is small enough for fp32.
        "--dtype", "float32",
    ]


def _post(url: str, body: dict, timeout: float = 300) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def _wait_ready(proc: subprocess.Popen, base: str, timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"error: the server exited with status {proc.returncode} (see its log above)")
        try:
            with urllib.request.urlopen(f"{base}/v1/models", timeout=2):
                return
        except (urllib.error.URLError, OSError):
            time.sleep(1)
    raise SystemExit(f"error: the server did not answer within {timeout:.0f} s")


def run_demo(host: str = "127.0.0.1", port: int = 8000, compression_ratio: float = 0.5, once: bool = False) -> int:
    from vllm_heterocache.models.smollm2 import prepare_default_model

    model = prepare_default_model()
    options = {"compression_ratio": compression_ratio}
    cmd = serve_command(model, host, port, options)
    env = dict(os.environ)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    print("starting: " + " ".join(cmd[:3] + ["..."]), flush=True)
    proc = subprocess.Popen(cmd, env=env, start_new_session=True)
    base = f"http://{host}:{port}"
    try:
        _wait_ready(proc, base, timeout=600)
        answer = _post(f"{base}/v1/chat/completions", {
            "model": SERVED_NAME, "messages": [{"role": "user", "content": QUESTION}],
            "max_tokens": 32, "temperature": 0,
        })
        print(f"\nQ: {QUESTION}\nA: {answer['choices'][0]['message']['content']}\n", flush=True)
        if once:
            return 0
        print(f"serving {SERVED_NAME} with HeteroCache on {base} (OpenAI API); Ctrl-C stops it", flush=True)
        return proc.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
