"""The README's main job: `heterocache demo` serves SmolLM2 with HeteroCache and answers."""

import subprocess
import sys

import pytest

from conftest import ROOT
from vllm_heterocache.server_process import free_port

pytestmark = [pytest.mark.slow, pytest.mark.model]


def test_demo_serves_the_default_model_and_answers():
    port = free_port()
    out = subprocess.run([sys.executable, "-m", "vllm_heterocache.cli", "demo", "--once", "--port", str(port)],
                         capture_output=True, text=True, timeout=900, cwd=ROOT)
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-5000:]
    assert "HeteroCache attention backend: policy heterocache" in log and "SmolLM2-135M-Instruct.json" in log
    answer = next(line for line in out.stdout.splitlines() if line.startswith("A: "))
    assert "Paris" in answer
