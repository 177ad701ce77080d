"""``heterocache demo``: serve the embedded default model with the HeteroCache backend.

Prepares SmolLM2-135M-Instruct (once), starts ``vllm serve`` on 127.0.0.1 with
``--attention-backend heterocache``, waits until it answers, sends one chat request and prints
the reply, then keeps serving until Ctrl-C (``--once``: stops after the reply).

Stopping. The server runs in a process group of its own (so a terminal's Ctrl-C reaches this
wrapper only, and the wrapper stops the server in order). SIGTERM and SIGHUP stop the demo as
SIGINT does: the server's whole group gets SIGTERM, and SIGKILL what is left of it after
``STOP_GRACE_S``. If the wrapper is killed outright (SIGKILL, a crash), Linux sends the server
SIGTERM itself (``prctl(PR_SET_PDEATHSIG)``, set in the child before it execs ``vllm``), and
vLLM stops its engine processes.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

from vllm_heterocache.models.smollm2 import MODEL_NAME as SERVED_NAME, prepare_default_model
from vllm_heterocache.serve import DEFAULT_MODEL_FLAGS, vllm_command, vllm_executable

QUESTION = "What is the capital of France?"
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
STOP_GRACE_S = 30.0  # from SIGTERM to SIGKILL for the server's process group
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def serve_command(model: Path, host: str, port: int, options: dict) -> list[str]:
    return vllm_command(vllm_executable(), str(model), host, port, options, model_flags=DEFAULT_MODEL_FLAGS)


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


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


@contextlib.contextmanager
def _handling(signals: tuple[signal.Signals, ...], handler: Callable | int) -> Iterator[None]:
    previous = {sig: signal.signal(sig, handler) for sig in signals}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _die_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` that has the kernel send the child SIGTERM when this process dies, however it
    dies (Linux ``prctl(PR_SET_PDEATHSIG)``, which survives ``exec``); None on other systems."""
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(None, use_errno=True)  # loaded before the fork: the child only calls it
    parent = os.getpid()

    def preexec() -> None:
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG, SIGTERM) failed")
        if os.getppid() != parent:  # the parent died before the prctl: do not start an orphan
            os._exit(1)

    return preexec


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):  # PermissionError: the id is another user's group now
        return False
    return True


def stop_server(proc: subprocess.Popen, grace: float = STOP_GRACE_S) -> None:
    """Stop the server's process group (``proc`` leads it): SIGTERM, and after ``grace`` seconds
    SIGKILL to whatever is left. Stop signals are ignored meanwhile, so a second Ctrl-C cannot
    cut this short and leave the server running; it takes ``grace`` seconds at most."""
    with _handling(STOP_SIGNALS, signal.SIG_IGN):
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:  # the whole group is gone already
            proc.wait()
            return
        deadline = time.monotonic() + grace
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=grace)
        while _group_alive(proc.pid) and time.monotonic() < deadline:  # engine processes still exiting
            time.sleep(0.2)
        if _group_alive(proc.pid):
            print(f"the server did not stop within {grace:.0f} s of SIGTERM: killing it", file=sys.stderr, flush=True)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def run_demo(host: str = "127.0.0.1", port: int = 8000, compression_ratio: float = 0.5, once: bool = False) -> int:
    model = prepare_default_model()
    options = {"compression_ratio": compression_ratio}
    cmd = serve_command(model, host, port, options)
    env = dict(os.environ)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    print("starting: " + " ".join(cmd[:3] + ["..."]), flush=True)
    base = f"http://{host}:{port}"
    with _handling((signal.SIGTERM, signal.SIGHUP), _interrupt):  # stop as on Ctrl-C: `finally` runs
        proc = subprocess.Popen(cmd, env=env, start_new_session=True, preexec_fn=_die_with_parent())
        try:
            _wait_ready(proc, base, timeout=600)
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
            stop_server(proc)
