"""Stopping: `heterocache demo` and `heterocache serve` stop on SIGTERM (and SIGINT) within a bound
and leave no process behind; a bad HETEROCACHE_CONFIG starts nothing.

The servers are real `vllm serve` processes on 127.0.0.1. Every process a test starts is stopped
by it, whatever the outcome (`stopped`)."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from conftest import ROOT
from vllm_heterocache.server_process import ServerFailed, accepts_connections, free_port, wait_ready

STOP_BOUND_S = 60  # from the signal until the process and all its descendants are gone
# vLLM pins its CPU worker to core 0 by default: where another server's worker is pinned there too
# (a shared test machine), it starves for minutes. Unpinned, the scheduler spreads them.
UNPINNED = {"VLLM_CPU_OMP_THREADS_BIND": "nobind"}


def heterocache(*args: str) -> list[str]:
    return [sys.executable, "-m", "vllm_heterocache.cli", *args]


def kill(processes: list[psutil.Process]) -> None:
    for p in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()


@contextlib.contextmanager
def stopped(proc: subprocess.Popen):
    """Yields ``proc``; afterwards kills whatever is left of it and its descendants (a failed test
    must not leave a server behind)."""
    try:
        yield proc
    finally:
        with contextlib.suppress(psutil.NoSuchProcess):
            leader = psutil.Process(proc.pid)
            kill([*leader.children(recursive=True), leader])
        proc.wait(timeout=30)


def wait_healthy(proc: subprocess.Popen, port: int, log: Path, timeout: float = 900) -> None:
    try:
        wait_ready(proc, f"http://127.0.0.1:{port}", timeout=timeout, log=log)
    except ServerFailed as failed:
        pytest.fail(str(failed))


def assert_stops(proc: subprocess.Popen, sig: signal.Signals, port: int, log: Path) -> int:
    """Send ``sig`` to ``proc`` alone (as docker and the kubelet do); it must exit, and every process
    it had started must be gone, within STOP_BOUND_S; then nothing listens on ``port``."""
    family = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    assert len(family) >= 3, f"expected the API server and engine processes, found {[p.cmdline() for p in family]}"
    start = time.monotonic()
    proc.send_signal(sig)
    try:
        code = proc.wait(timeout=STOP_BOUND_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"still running {STOP_BOUND_S} s after {sig.name}:\n{log.read_text()[-5000:]}")
    _, alive = psutil.wait_procs(family, timeout=max(1.0, STOP_BOUND_S - (time.monotonic() - start)))
    if alive:
        left = [(p.pid, p.name()) for p in alive]
        kill(alive)
        pytest.fail(f"left running {STOP_BOUND_S} s after {sig.name}: {left}")
    assert not accepts_connections(port), f"port {port} still accepts connections after {sig.name}"
    print(f"{sig.name}: {len(family)} processes gone {time.monotonic() - start:.1f} s after it")  # pytest -s
    return code


@pytest.mark.slow
@pytest.mark.model
def test_demo_stops_its_server_on_sigterm(tmp_path):
    """The demo wrapper turns SIGTERM into the Ctrl-C path: the server's whole process group stops."""
    port = free_port()
    log = tmp_path / "demo.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(heterocache("demo", "--port", str(port)), stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, **UNPINNED}, cwd=ROOT, start_new_session=True)
    with stopped(proc):
        wait_healthy(proc, port, log)
        deadline = time.monotonic() + 300  # then the demo's one question is answered: it just serves
        while "serving SmolLM2-135M-Instruct with HeteroCache" not in log.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-5000:]
            time.sleep(1)
        assert assert_stops(proc, signal.SIGTERM, port, log) == 0
        assert "stopping the server (SIGTERM)" in log.read_text()


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_serve_is_vllm_itself_and_stops_on(sig, tiny, tiny_profile, tmp_path):
    """`heterocache serve` execs `vllm serve`: the signal reaches vLLM, whose handlers stop the engine."""
    port = free_port()
    log = tmp_path / "serve.log"
    env = dict(os.environ, **UNPINNED, HETEROCACHE_MODEL=str(tiny), HETEROCACHE_PORT=str(port),
               VLLM_CPU_KVCACHE_SPACE="1",
               HETEROCACHE_CONFIG=json.dumps({"profile": str(tiny_profile), "compression_ratio": 0.6}))
    with open(log, "w") as out:
        proc = subprocess.Popen(heterocache("serve", "--max-model-len", "512", "--dtype", "float32", "--enforce-eager"),
                                stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    with stopped(proc):
        wait_healthy(proc, port, log)
        cmdline = psutil.Process(proc.pid).cmdline()
        assert Path(cmdline[1]).name == "vllm" and cmdline[2] == "serve", cmdline  # replaced, not wrapped
        text = log.read_text()
        assert "HeteroCache attention backend: policy heterocache" in text and "compression_ratio=0.6" in text
        assert assert_stops(proc, sig, port, log) == 0


@pytest.mark.parametrize("config, names", [
    ('{"compresion_ratio": 0.5}', ["unknown option(s) heterocache.compresion_ratio"]),
    ('{"window": "wide"}', ["heterocache.window must be int"]),
    ('{"window": 8', ["is not valid JSON"]),
], ids=["unknown option", "wrong type", "bad JSON"])
def test_a_bad_config_starts_no_server(config, names):
    port = free_port()
    env = dict(os.environ, HETEROCACHE_CONFIG=config, HETEROCACHE_PORT=str(port), HETEROCACHE_MODEL="any/model")
    out = subprocess.run(heterocache("serve"), env=env, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 2, out.stdout + out.stderr
    assert out.stderr.startswith("error: HETEROCACHE_CONFIG") and all(n in out.stderr for n in names), out.stderr
    assert "heterocache serve: exec" not in out.stderr and not out.stdout  # it stopped before the exec
    assert not accepts_connections(port)


def _session(code: str) -> subprocess.Popen:
    """``python -c code`` in a session of its own, its stdout a pipe."""
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], stdout=subprocess.PIPE, text=True,
                            cwd=ROOT, start_new_session=True)


def test_a_server_that_ignores_sigterm_is_killed_after_the_grace_period():
    from vllm_heterocache.server_process import stop

    stubborn = """
        import signal, subprocess, sys, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])  # SIGTERM ignored too
        print(child.pid, flush=True)
        time.sleep(600)
    """
    with stopped(_session(stubborn)) as proc:
        child = psutil.Process(int(proc.stdout.readline()))
        start = time.monotonic()
        assert not stop(proc, grace=2)  # (not within the grace: killed)
        assert time.monotonic() - start < 10
        assert proc.returncode == -signal.SIGKILL
        child.wait(timeout=10)  # SIGKILLed with its group


def test_the_server_gets_sigterm_when_the_demo_is_killed_outright():
    """PR_SET_PDEATHSIG: the wrapper is SIGKILLed (no handler runs), the kernel signals the server."""
    wrapper = """
        import time
        from vllm_heterocache import server_process
        server = server_process.start(["sleep", "600"], die_with_parent=True)
        print(server.pid, flush=True)
        time.sleep(600)
    """
    with stopped(_session(wrapper)) as proc:
        server = psutil.Process(int(proc.stdout.readline()))
        proc.kill()
        proc.wait()
        try:
            server.wait(timeout=10)
        except psutil.TimeoutExpired:
            server.kill()
            pytest.fail("the server outlived its wrapper killed with SIGKILL")
