"""HeteroCache inside Ray actors: two tensor-parallel ranks on a local Ray cluster on 127.0.0.1
(tests/ray_runner.py). vLLM 0.32's Ray executor refuses the CPU platform, so the runner does the
executor's worker-side part by hand; what is proven is listed in the README (Scale out)."""

import json
import subprocess
import sys

import pytest
from conftest import ROOT

pytestmark = pytest.mark.slow
pytest.importorskip("ray", reason="Ray is not installed: pip install 'vllm-heterocache[ray]'")


def test_two_ranks_start_in_ray_actors(tiny, tiny_profile):
    out = subprocess.run([sys.executable, str(ROOT / "tests" / "ray_runner.py"), str(tiny), str(tiny_profile)],
                         capture_output=True, text=True, timeout=900, cwd=ROOT)
    lines = [l for l in out.stdout.splitlines() if l.startswith("RESULT ")]
    assert out.returncode == 0 and lines, out.stdout[-3000:] + out.stderr[-6000:]
    result = json.loads(lines[-1][len("RESULT "):])
    assert result["nodes"] == ["127.0.0.1"]  # one node, on loopback
    ranks = result["ranks"]
    assert [r["rank"] for r in ranks] == [0, 1] and ranks[0]["pid"] != ranks[1]["pid"]
    assert result["same_specs"]  # one KV cache layout: vLLM's engine core accepted both ranks' specs
    for r in ranks:
        assert r["compresses"] and "tensor_parallel_size=2" in r["describe"]
        assert r["host_blocks"] > 0  # the host tier, sized per rank from the config it received
        assert r["exchanged"] == [3] * 6  # 1 + 2: the drift-message exchange over the TP group
    assert ranks[0]["cache_pools"] == ranks[1]["cache_pools"]
    # every cluster of the tiny profile crosses ranks: each rank decides for the pivots it holds
    assert ranks[0]["shared"] == [[0], [-1], [], [0]] and ranks[1]["shared"] == [[-1], [0], [], [-1]]
    assert [r["host_rows"] for r in ranks] == [1, 2]
