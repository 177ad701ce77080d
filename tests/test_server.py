"""The real OpenAI-compatible server (`vllm serve ... --attention-backend heterocache`) on
127.0.0.1 with the tiny model: completions, chat, streaming, an aborted stream."""

import json
import os
import sys
import time
from pathlib import Path

import pytest
import requests

from vllm_heterocache import server_process
from vllm_heterocache.head_profile.synthetic import save_synthetic_profile

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from vllm_heterocache.models.tiny import build_tiny_model

    tiny = build_tiny_model()
    tmp = tmp_path_factory.mktemp("server")
    profile = save_synthetic_profile(tiny, ["PS", "SP", "AV", "PS"], tmp / "tiny.json")
    port = server_process.free_port()
    options = {"heterocache": {"profile": str(profile), "compression_ratio": 0.6, "window": 8, "min_prompt_len": 0}}
    cmd = [
        str(Path(sys.executable).parent / "vllm"), "serve", str(tiny),
        "--host", "127.0.0.1", "--port", str(port), "--served-model-name", "tiny",
        "--attention-backend", "heterocache", "--additional-config", json.dumps(options),
        "--dtype", "float32", "--max-model-len", "2048", "--enforce-eager",
    ]
    log_path = tmp / "server.log"
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE=os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"))
    proc = server_process.start(cmd, env=env, log=log_path)
    base = f"http://127.0.0.1:{port}"
    try:
        try:
            server_process.wait_ready(proc, base, timeout=300, model="tiny", log=log_path)
        except server_process.ServerFailed as failed:
            pytest.fail(str(failed))
        yield base, log_path
    finally:
        server_process.stop(proc, grace=60)


def test_backend_is_selected(server):
    _, log = server
    text = log.read_text()
    assert "HeteroCache attention backend: policy heterocache" in text
    assert "Cannot use" not in text


def test_completion(server):
    base, _ = server
    r = requests.post(f"{base}/v1/completions", json={"model": "tiny", "prompt": "In the beginning " * 50,
                                                      "max_tokens": 8, "temperature": 0}, timeout=120)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["usage"]["completion_tokens"] == 8 and body["choices"][0]["text"]


def test_chat_and_streaming_with_the_openai_client(server):
    from openai import OpenAI

    base, _ = server
    client = OpenAI(base_url=f"{base}/v1", api_key="unused")
    messages = [{"role": "user", "content": "And God said, let there be light. " * 20}]
    chat = client.chat.completions.create(model="tiny", messages=messages, max_tokens=6, temperature=0)
    assert chat.choices[0].message.content and chat.usage.completion_tokens == 6
    stream = client.chat.completions.create(model="tiny", messages=messages, max_tokens=6, temperature=0, stream=True)
    pieces = [c.choices[0].delta.content or "" for c in stream if c.choices]
    assert "".join(pieces) == chat.choices[0].message.content  # same greedy answer, streamed


def test_aborted_stream_leaves_the_server_healthy(server):
    base, _ = server
    with requests.post(f"{base}/v1/completions", json={"model": "tiny", "prompt": "The king said " * 30,
                       "max_tokens": 400, "temperature": 0, "stream": True}, stream=True, timeout=120) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i >= 3:
                break  # the client goes away: the server aborts the request
    r = requests.post(f"{base}/v1/completions", json={"model": "tiny", "prompt": "Then ", "max_tokens": 4,
                                                      "temperature": 0}, timeout=120)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4


def test_malformed_request_gets_a_clear_error(server):
    base, _ = server
    r = requests.post(f"{base}/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": -3}, timeout=60)
    assert r.status_code == 400


def scrape(base: str) -> dict:
    """``/metrics`` parsed by prometheus_client's own parser: ``{family name: Metric}``."""
    from prometheus_client.parser import text_string_to_metric_families

    r = requests.get(f"{base}/metrics", timeout=30)
    assert r.status_code == 200
    return {f.name: f for f in text_string_to_metric_families(r.text)}


def value(families: dict, name: str, sample: str | None = None, **labels) -> float:
    samples = [s for s in families[name].samples
               if s.name == (sample or name) and all(s.labels.get(k) == v for k, v in labels.items())]
    assert samples, f"no sample {sample or name} {labels} in /metrics"
    return sum(s.value for s in samples)


def settled(base: str, since: dict | None = None, admitted: int = 0, timeout: float = 30) -> dict:
    """``/metrics`` once the rank holds no request and has published after admitting ``admitted``
    requests more than ``since`` shows. Each request observes heterocache_request_kept_fraction
    when it is admitted, and the rank publishes at once when its last request leaves, but the
    client can have its answer before that publish: a scrape that only shows 0 requests can still
    be the snapshot from before the request."""
    def admissions(families: dict) -> float:
        kept = families.get("heterocache_request_kept_fraction")
        return sum(s.value for s in kept.samples if s.name.endswith("_count")) if kept else 0

    deadline = time.time() + timeout
    while True:
        families = scrape(base)
        if "heterocache_requests" in families and value(families, "heterocache_requests") == 0:
            if since is None or admissions(families) - admissions(since) >= admitted:
                return families
        assert time.time() < deadline, "heterocache_requests did not come back to 0 after the requests"
        time.sleep(0.2)


def test_metrics_on_the_servers_own_endpoint(server):
    """HeteroCache's counters, gauges and histogram on vLLM's /metrics, labelled like vLLM's."""
    from vllm_heterocache.vllm_adapter.metrics import METRICS

    base, _ = server
    before = settled(base)
    r = requests.post(f"{base}/v1/completions", json={"model": "tiny", "prompt": "And the earth was " * 60,
                                                      "max_tokens": 40, "temperature": 0, "ignore_eos": True},
                      timeout=120)
    assert r.status_code == 200, r.text
    after = settled(base, before, admitted=1)
    for name, (kind, _) in METRICS.items():
        family = "heterocache_" + name
        assert family in after, f"{family} missing from /metrics"
        assert after[family].type == kind
    labels = {"model_name": "tiny", "engine": "0", "tp_rank": "0"}
    assert all(s.labels.items() >= labels.items() for f in after.values() if f.name.startswith("heterocache_")
               for s in f.samples)
    assert "vllm:num_requests_running" in after  # vLLM's own metrics, same endpoint
    for counter, grew_by_at_least in (("prefill_selections", 1), ("drift_checks", 4), ("host_tier_bytes_in", 1)):
        name = "heterocache_" + counter
        assert value(after, name, name + "_total") - value(before, name, name + "_total") >= grew_by_at_least
    # settled: the request's state, host-tier blocks and device blocks are given back
    for gauge in ("heterocache_refills_pending", "heterocache_host_tier_blocks_used", "heterocache_device_pool_blocks"):
        assert value(after, gauge) == 0, gauge
    assert value(after, "heterocache_host_tier_blocks_total") > 0
    assert value(after, "vllm:num_requests_running") == 0
    h = "heterocache_refill_wait_seconds"
    assert value(after, h, h + "_bucket", le="+Inf") == value(after, h, h + "_count")
    refilled = value(after, "heterocache_refilled_heads", "heterocache_refilled_heads_total")
    assert (value(after, h, h + "_count") > 0) == (refilled > 0)  # every refill is waited for, once done


def test_prefix_caching_is_on_by_default_and_a_hit_changes_no_answer(server):
    """vLLM's defaults: its prefix cache serves the second of two requests with one long prompt,
    vLLM's own counters say so, heterocache_* counts the compressed heads' cached prompt tokens,
    and the greedy answers are the same."""
    base, _ = server
    prompt = "In the beginning was the Word, and the Word was with God. " * 40

    def complete():
        r = requests.post(f"{base}/v1/completions", json={"model": "tiny", "prompt": prompt, "max_tokens": 24,
                                                          "temperature": 0, "ignore_eos": True}, timeout=120)
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["text"]

    before = settled(base)
    first, second = complete(), complete()
    after = settled(base, before, admitted=2)
    assert first == second

    def grew(name, sample):
        return value(after, name, sample) - value(before, name, sample)

    hits = grew("vllm:prefix_cache_hits", "vllm:prefix_cache_hits_total")
    assert hits >= 256  # at least two 128-token blocks of the second prompt came from the cache
    ours = "heterocache_prefix_cache_hit_tokens"
    assert grew(ours, ours + "_total") == hits  # every request here compresses: all of vLLM's hits are ours


def test_policy_and_ratio_per_request(server):
    """``vllm_xargs`` through the openai client: mixed policies in one batch, each request's kept
    fraction in /metrics under its policy, and a 400 naming the key for every bad value."""
    from concurrent.futures import ThreadPoolExecutor

    from openai import BadRequestError, OpenAI

    base, _ = server
    client = OpenAI(base_url=f"{base}/v1", api_key="unused")
    prompt = "And the spirit of God moved upon the face of the waters. " * 25

    def complete(xargs):
        return client.completions.create(model="tiny", prompt=prompt, max_tokens=16, temperature=0,
                                         extra_body={"vllm_xargs": xargs, "ignore_eos": True})

    before = settled(base)
    choices = [{"heterocache_policy": "full"}, {"heterocache_policy": "duo", "heterocache_ratio": 0.8}, {},
               {"heterocache_ratio": 0.9}, {"heterocache_policy": "heterocache", "heterocache_ratio": "0.7"}]
    with ThreadPoolExecutor(len(choices)) as pool:  # together: one batch of mixed policies
        done = list(pool.map(complete, choices))
    assert all(c.usage.completion_tokens == 16 for c in done)
    after = settled(base, before, admitted=len(choices))
    h = "heterocache_request_kept_fraction"

    def grew(policy, sample):
        return value(after, h, h + sample, policy=policy) - value(before, h, h + sample, policy=policy)

    assert grew("full", "_count") == 1 and grew("full", "_sum") == 1.0
    assert grew("duo", "_count") == 1 and 0.75 < grew("duo", "_sum") < 0.85
    assert grew("heterocache", "_count") == 3 and 0.6 * 3 - 0.05 < grew("heterocache", "_sum") < 0.6 + 0.9 + 0.7 + 0.05

    # a prompt near the longest the server takes, with a ratio above the server's: its selection
    # region is wider than any request of the server's own ratio needs (block-table rows fit it)
    long = client.completions.create(model="tiny", prompt=[100 + i % 3000 for i in range(2048 - 32)], max_tokens=16,
                                     temperature=0, extra_body={"vllm_xargs": {"heterocache_ratio": 0.95},
                                                                "ignore_eos": True})
    assert long.usage.completion_tokens == 16

    bad = {
        "heterocache_policy": [{"heterocache_policy": "snapkv"},  # compresses this server's full-pool heads
                               {"heterocache_policy": "h2o"}, {"heterocache_policy": True}],
        "heterocache_ratio": [{"heterocache_ratio": 0.3},  # its full heads alone keep 0.5
                              {"heterocache_ratio": 1.5}, {"heterocache_ratio": "lots"},
                              {"heterocache_ratio": True},  # (vLLM's request model reads a JSON true as 1)
                              {"heterocache_policy": "full", "heterocache_ratio": 0.7}],
        "heterocache_ration": [{"heterocache_ration": 0.7}],
    }
    for key, cases in bad.items():
        for xargs in cases:
            with pytest.raises(BadRequestError) as e:
                complete(xargs)
            assert e.value.status_code == 400 and f"vllm_xargs.{key}" in str(e.value), (xargs, str(e.value))
    assert complete({}).usage.completion_tokens == 16  # and the server goes on
