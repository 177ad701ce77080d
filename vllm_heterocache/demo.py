"""``heterocache demo``: serve the embedded default model with the HeteroCache backend.

Prepares SmolLM2-135M-Instruct (once), starts ``vllm serve`` on 127.0.0.1 with
``--attention-backend heterocache``, waits until it answers, sends one chat request and prints
the reply, then keeps serving until Ctrl-C (``--once``: stops after the reply).

Stopping (``server_process``). The server runs in a process group of its own (so a terminal's
Ctrl-C reaches this wrapper only, and the wrapper stops the server in order). SIGTERM and SIGHUP
stop the demo as SIGINT does: the server's whole group gets SIGTERM, and SIGKILL what is left of
it after ``STOP_GRACE_S``. If the wrapper is killed outright (SIGKILL, a crash), Linux sends the
server SIGTERM itself (``prctl(PR_SET_PDEATHSIG)``), and vLLM stops its engine processes.
"""

from __future__ import annotations

import json
import os
import signal
import urllib.request
from pathlib import Path

from vllm_heterocache import server_process
from vllm_heterocache.models.smollm2 import MODEL_NAME as SERVED_NAME, prepare_default_model
from vllm_heterocache.serve import DEFAULT_MODEL_FLAGS, vllm_command, vllm_executable

QUESTION = "What is the capital of France?"


def serve_command(model: Path, host: str, port: int, options: dict) -> list[str]:
    return vllm_command(vllm_executable(), str(model), host, port, options, model_flags=DEFAULT_MODEL_FLAGS)


def _post(url: str, body: dict, timeout: float = 300) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def run_demo(host: str = "127.0.0.1", port: int = 8000, compression_ratio: float = 0.5, once: bool = False) -> int:
    model = prepare_default_model()
    options = {"compression_ratio": compression_ratio}
    cmd = serve_command(model, host, port, options)
    env = dict(os.environ)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    print("starting: " + " ".join(cmd[:3] + ["..."]), flush=True)
    base = f"http://{host}:{port}"
    with server_process.handling((signal.SIGTERM, signal.SIGHUP), _interrupt):  # as Ctrl-C: `finally` runs
        proc = server_process.start(cmd, env=env, die_with_parent=True)
        try:
            try:
                server_process.wait_ready(proc, base, timeout=600, model=SERVED_NAME)
            except server_process.ServerFailed as failed:
                raise SystemExit(f"error: {failed}") from None
            answer = _post(f"{base}/v1/chat/completions", {
                "model": SERVED_NAME, "messages": [{"role": "user", "content": QUESTION}],
                "max_tokens": 32, "temperature": 0,
            })
            print(f"\nQ: {QUESTION}\nA: {answer['choices'][0]['message']['content']}\n", flush=True)
            if once:
                return 0
            print(f"serving {SERVED_NAME} with HeteroCache on {base} (OpenAI API); Ctrl-C or SIGTERM stops it",
                  flush=True)
            return proc.wait()
        except KeyboardInterrupt as stop:
            print(f"stopping the server ({stop or 'SIGINT'})", flush=True)
            return 0
        finally:
            server_process.stop(proc)
