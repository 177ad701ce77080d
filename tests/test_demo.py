"""The README's main job: `heterocache demo` serves SmolLM2 with HeteroCache and answers."""

import socket
import subprocess
import sys

import pytest

from conftest import ROOT

pytestmark = [pytest.mark.slow, pytest.mark.model]


def test_demo_serves_the_default_model_and_answers():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = subprocess.run([sys.executable, "-m", "vllm_heterocache.cli", "demo", "--once", "--port", str(port)],
                         capture_output=True, text=True, timeout=900, cwd=ROOT)
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-5000:]
    assert "HeteroCache attention backend: policy heterocache" in log and "SmolLM2-135M-Instruct.json" in log
    answer = next(line for line in out.stdout.splitlines() if line.startswith("A: "))
    assert "Paris" in answer
