"""Load and soak: many concurrent streams against the real server, with clients that go away.

    python benchmarks/bench_soak.py                      # tiny model, 300 + 1,000 requests, 64 streams, both backends
    python benchmarks/bench_soak.py --model smollm2      # SmolLM2-135M-Instruct (8K context, shipped profile)
    python benchmarks/bench_soak.py --requests 200 --settings heterocache     # a shorter look

For each setting (``stock``: vLLM's own CPU backend; ``heterocache``) a real ``vllm serve``
OpenAI server is started on 127.0.0.1, alone on the machine, with the same flags and KV cache
space, and driven by this script's own asyncio client (aiohttp, streaming ``/v1/completions``):

* ``--requests`` requests (default 1,300: 300 of warm-up and 1,000 measured), at most
  ``--concurrency`` in flight (default 64);
* prompt lengths mixed up to the served context: log-uniform in [16, max-model-len - 160]
  tokens (random token ids, so lengths are exact), answers of 8 to 128 tokens (``ignore_eos``);
* ``--disconnect`` of the clients (default 0.1) close their connection mid-stream, after 1 to
  3 streamed chunks (the server aborts those requests);
* every other request must complete with all its tokens: a failure is counted and printed.

A warm-up comes first: ``--concurrency`` prompts of the longest length at once (they touch
every block of the KV cache, which the kernel maps on first use), then the first ``--warmup``
requests of the load (default 300: vLLM's CPU worker grows its RSS over the first few hundred
requests of mixed lengths, with either backend; README "Performance"). The resident memory
(RSS) of the server's process tree, per process and in all, is taken after the warm-up and
after the last request, each once the server is idle, and every 100 requests in between.
Afterwards the server must be back at its baseline on its own ``/metrics``: no request running
or waiting, vLLM's KV cache usage 0, and for HeteroCache no request state, no refill pending, no
host-tier block and no device pool block held (``heterocache_*``, README "Metrics").

An allocator keeps what the largest step so far needed (vLLM's CPU worker grows its RSS as
rarer combinations of long prompts meet in one step, with either backend): ``--replay`` sends
the warm-up's requests again as the measured load, so that growth then can only be per request.

To find what grows: ``--rss-every N`` samples every N measured requests (``--verbose-rss`` prints
each), the worker's RSS is split by kind (anonymous, file-backed, shared) and by mapping between
the warm-up and the end; ``--server-env KEY=VALUE`` sets a variable for the servers (e.g.
``ONEDNN_PRIMITIVE_CACHE_CAPACITY=128``: oneDNN keeps up to 1,024 matmul primitives by default,
one per linear shape and distinct token count, ~0.3 MiB each, which is the worker's growth);
``--prompt-len N`` makes every prompt N tokens long.

Reported per setting: throughput (completed requests/s and output tokens/s of the requests that
were not disconnected), TTFT and inter-token latency p50/p99, failures, RSS growth; and the
ratios heterocache / stock. ``--repeats N`` runs each setting N times, interleaved, in fresh
servers, and compares medians (the machine's speed moves 10-40% between minutes). Logs and
``results.json`` go to ``--out`` (default: a new temporary folder). The servers preload
tcmalloc (``--malloc``), as vLLM's CPU install guide says to. Exit status 1 if a request
that was not disconnected failed, the server did not settle back to its baseline, or RSS grew
by more than ``--max-rss-growth`` (default 5%).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import signal
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from statistics import median

import psutil

from cases import MODELS, heterocache_options, prepare_model

from vllm_heterocache import server_process
from vllm_heterocache.serve import vllm_executable

TINY_LAYOUT = ("PS", "SP", "AV", "AA")  # every head type, clusters in two layers

MIN_PROMPT, ANSWER = 16, (8, 128)
MARGIN = ANSWER[1] + 32  # room for the longest answer (and special tokens) below max-model-len
SETTLE_TIMEOUT_S = 60


# ---------------------------------------------------------------- the load

@dataclass
class Request:
    index: int
    prompt: list[int]
    max_tokens: int
    disconnect_after: int | None  # close the stream after this many chunks; None: read it all


@dataclass
class Outcome:
    index: int
    prompt_len: int
    disconnected: bool = False
    ok: bool = False
    error: str | None = None
    output_tokens: int = 0
    ttft_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    latency_s: float = 0.0


def make_requests(n: int, max_model_len: int, vocab: int, disconnect: float, seed: int,
                  prompt_len: int | None = None) -> list[Request]:
    """``n`` requests: prompts log-uniform in [MIN_PROMPT, max_model_len - MARGIN] tokens of random
    ids (above the special tokens), or all of ``prompt_len`` tokens, answers of ANSWER tokens, a
    ``disconnect`` share cut mid-stream."""
    rng = random.Random(seed)
    longest = max_model_len - MARGIN
    if longest < MIN_PROMPT or (prompt_len is not None and not MIN_PROMPT <= prompt_len <= longest):
        raise SystemExit(f"error: --max-model-len must be at least {MIN_PROMPT + MARGIN} and --prompt-len "
                         f"in [{MIN_PROMPT}, max-model-len - {MARGIN}]")
    out = []
    for i in range(n):
        length = int(math.exp(rng.uniform(math.log(MIN_PROMPT), math.log(longest))))
        if prompt_len is not None:
            length = prompt_len
        prompt = [rng.randrange(16, vocab) for _ in range(length)]
        out.append(Request(i, prompt, rng.randint(*ANSWER), rng.randint(1, 3) if rng.random() < disconnect else None))
    return out


def fill_requests(n: int, max_model_len: int, vocab: int) -> list[Request]:
    """``n`` prompts of the longest length at once: they use every block of the KV cache (which
    vLLM allocates up front but the kernel maps on first touch), so that the RSS baseline after
    the warm-up includes the whole KV cache and growth after it is the server's own."""
    rng = random.Random(-1)
    length = max_model_len - MARGIN
    return [Request(-1 - i, [rng.randrange(16, vocab) for _ in range(length)], ANSWER[0], None) for i in range(n)]


async def send(session, url: str, model: str, req: Request) -> Outcome:
    """One streamed completion; the time of each chunk with text, as ``vllm bench serve`` counts ITL."""
    out = Outcome(req.index, len(req.prompt), disconnected=req.disconnect_after is not None)
    body = {"model": model, "prompt": req.prompt, "max_tokens": req.max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    t0 = last = time.perf_counter()
    chunks = 0
    try:
        async with session.post(url, json=body) as r:
            if r.status != 200:
                out.error = f"HTTP {r.status}: {(await r.text())[:200]}"
                return out
            async for raw in r.content:
                line = raw.strip()
                if not line.startswith(b"data: ") or line == b"data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if event.get("usage"):
                    out.output_tokens = event["usage"]["completion_tokens"]
                if not event.get("choices") or not event["choices"][0].get("text"):
                    continue
                now = time.perf_counter()
                if out.ttft_s is None:
                    out.ttft_s = now - t0
                else:
                    out.itl_s.append(now - last)
                last, chunks = now, chunks + 1
                if req.disconnect_after is not None and chunks >= req.disconnect_after:
                    r.close()  # the client goes away mid-stream
                    out.ok = True
                    return out
        out.latency_s = time.perf_counter() - t0
        out.ok = out.output_tokens == req.max_tokens
        if not out.ok:
            out.error = f"{out.output_tokens} of {req.max_tokens} tokens"
    except Exception as e:  # noqa: BLE001 - every failure is a result here, reported below
        out.error = f"{type(e).__name__}: {e}"
    return out


async def drive(base: str, model: str, requests: list[Request], concurrency: int,
                on_progress=None) -> list[Outcome]:
    """Send ``requests`` in order with at most ``concurrency`` in flight; ``on_progress(done)``
    (async) after each finishes."""
    import aiohttp

    sem = asyncio.Semaphore(concurrency)
    timeout = aiohttp.ClientTimeout(total=1800, sock_connect=30)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=concurrency)) as session:
        done = 0

        async def one(req: Request) -> Outcome:
            nonlocal done
            async with sem:
                result = await send(session, f"{base}/v1/completions", model, req)
            done += 1
            if on_progress:
                await on_progress(done)
            return result

        return list(await asyncio.gather(*(one(r) for r in requests)))


# ---------------------------------------------------------------- the server's state

def tree_rss(pid: int) -> dict[str, int]:
    """Resident bytes of a process and all its descendants, by process title (vLLM names its
    engine and worker processes ``VLLM::EngineCore``, ``VLLM::Worker``; the API server is the
    root), and their sum under ``"total"``."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return {"total": 0}
    out = {"total": 0}
    for p in procs:
        try:
            rss = p.memory_info().rss
            name = "api_server" if p.pid == pid else (p.cmdline() or [p.name()])[0].strip()
        except psutil.NoSuchProcess:
            continue
        out[name] = out.get(name, 0) + rss
        out["total"] += rss
    return out


def worker_pid(pid: int) -> int | None:
    """The pid of the server's ``VLLM::Worker`` process (the one that grows), if there is one."""
    try:
        for p in psutil.Process(pid).children(recursive=True):
            if (p.cmdline() or [""])[0].strip() == "VLLM::Worker":
                return p.pid
    except psutil.NoSuchProcess:
        pass
    return None


def rss_kinds(pid: int | None) -> dict[str, int]:
    """A process's resident bytes by kind, from /proc/PID/status: anonymous (the heap, malloc's
    mmaps, torch tensors), file-backed (code and data of the libraries, mapped files) and shared
    memory; {} where unavailable."""
    out: dict[str, int] = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem"):
                out[key] = int(rest.split()[0]) * 1024
    except (OSError, ValueError, TypeError):
        return {}
    return out


def rss_by_mapping(pid: int | None) -> dict[str, int]:
    """A process's resident bytes per mapped file (anonymous mappings under ``[anon]``, the brk heap
    under ``[heap]``), from /proc/PID/smaps; {} where unavailable."""
    out: dict[str, int] = {}
    name = "[anon]"
    try:
        text = Path(f"/proc/{pid}/smaps").read_text()
    except (OSError, TypeError):
        return {}
    for line in text.splitlines():
        head = line.split()
        if not head:
            continue
        if "-" in head[0] and not head[0].endswith(":"):  # a mapping's header line: range perms offset dev inode [path]
            name = head[5] if len(head) > 5 else "[anon]"
        elif head[0] == "Rss:":
            out[name] = out.get(name, 0) + int(head[1]) * 1024
    return out


def mapping_growth(before: dict[str, int], after: dict[str, int], top: int = 12) -> list[tuple[str, int]]:
    """The mappings whose resident bytes changed most, largest change first."""
    delta = {k: after.get(k, 0) - before.get(k, 0) for k in set(before) | set(after)}
    return sorted(((k, v) for k, v in delta.items() if v), key=lambda kv: -abs(kv[1]))[:top]


def scrape(base: str) -> dict[str, float]:
    """``/metrics`` as ``{sample name{labels}: value}`` summed over labels, per sample name."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"{base}/metrics", timeout=30) as r:
        text = r.read().decode()
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            values[s.name] = values.get(s.name, 0.0) + s.value
    return values


BASELINE = {  # sample -> its value on an idle server; heterocache_* only where that backend runs
    "vllm:num_requests_running": 0, "vllm:num_requests_waiting": 0, "vllm:kv_cache_usage_perc": 0,
    "heterocache_requests": 0, "heterocache_refills_pending": 0, "heterocache_host_tier_blocks_used": 0,
    "heterocache_device_pool_blocks": 0,
}


def off_baseline(values: dict[str, float], heterocache: bool) -> dict[str, float]:
    """The baseline samples the server is not at (a missing sample counts as off)."""
    want = {k: v for k, v in BASELINE.items() if heterocache or not k.startswith("heterocache_")}
    return {k: values.get(k, float("nan")) for k, v in want.items() if values.get(k) != v}


async def settle(base: str, heterocache: bool) -> tuple[dict[str, float], dict[str, float]]:
    """Wait until the server is back at its baseline (or SETTLE_TIMEOUT_S): (values, off)."""
    deadline = time.time() + SETTLE_TIMEOUT_S
    while True:
        values = await asyncio.to_thread(scrape, base)
        off = off_baseline(values, heterocache)
        if not off or time.time() > deadline:
            return values, off
        await asyncio.sleep(0.5)


# ---------------------------------------------------------------- one run

def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, max(0, math.ceil(q / 100 * len(s)) - 1))]


def summarize(outcomes: list[Outcome], wall_s: float) -> dict:
    kept = [o for o in outcomes if not o.disconnected]
    ok = [o for o in kept if o.ok]
    ttft = [o.ttft_s for o in ok if o.ttft_s is not None]
    itl = [x for o in ok for x in o.itl_s]
    return {
        "requests": len(outcomes), "disconnected": len(outcomes) - len(kept), "completed": len(ok),
        "failed": len(kept) - len(ok), "disconnected_failed": sum(1 for o in outcomes if o.disconnected and not o.ok),
        "errors": sorted({o.error for o in outcomes if o.error})[:5],
        "wall_s": wall_s, "request_throughput": len(ok) / wall_s,
        "output_throughput": sum(o.output_tokens for o in ok) / wall_s,
        "p50_ttft_ms": 1e3 * percentile(ttft, 50) if ttft else None, "p99_ttft_ms": 1e3 * percentile(ttft, 99) if ttft else None,
        "p50_itl_ms": 1e3 * percentile(itl, 50) if itl else None, "p99_itl_ms": 1e3 * percentile(itl, 99) if itl else None,
        "prompt_tokens": sum(o.prompt_len for o in outcomes),
    }


def tcmalloc() -> str:
    """The system's tcmalloc, which vLLM's CPU install guide preloads (its workers warn without it)."""
    for lib in ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib"):
        found = sorted(Path(lib).glob("libtcmalloc_minimal.so*"))
        if found:
            return str(found[0])
    raise SystemExit("error: --malloc tcmalloc: no libtcmalloc_minimal.so found; install it "
                     "(Debian/Ubuntu: apt-get install libtcmalloc-minimal4) or pass --malloc glibc")


def server_command(vllm: str, model: Path, served: str, port: int, a, heterocache: dict | None) -> list[str]:
    cmd = [vllm, "serve", str(model), "--served-model-name", served, "--host", "127.0.0.1", "--port", str(port),
           "--dtype", "float32", "--no-enable-prefix-caching", "--enforce-eager", "--max-model-len", str(a.max_model_len),
           "--disable-uvicorn-access-log", "--seed", "0", "--kv-cache-memory-bytes", str(int(a.kv_gib * (1 << 30)))]
    if heterocache is not None:
        cmd += ["--attention-backend", "heterocache", "--additional-config", json.dumps({"heterocache": heterocache})]
    return cmd


def run_setting(setting: str, repeat: int, model: Path, options: dict, a, out: Path, vllm: str) -> dict:
    """One fresh server of ``setting`` under the whole load; its record."""
    served, port = model.name, server_process.free_port()
    base = f"http://127.0.0.1:{port}"
    log = out / f"{setting}-{repeat + 1}.server.log"
    heterocache = setting == "heterocache"
    env = dict(os.environ)
    env.pop("VLLM_CPU_KVCACHE_SPACE", None)  # it would override --kv-cache-memory-bytes
    if a.malloc == "tcmalloc":
        env["LD_PRELOAD"] = ":".join(filter(None, (tcmalloc(), env.get("LD_PRELOAD"))))
    env |= dict(kv.split("=", 1) for kv in getattr(a, "server_env", None) or [])
    server = server_process.start(server_command(vllm, model, served, port, a, options if heterocache else None),
                                  env=env, log=log)
    record: dict = {"setting": setting, "repeat": repeat + 1, "server_log": str(log)}
    try:
        record["ready_s"] = server_process.wait_ready(server, base, timeout=a.ready_timeout, model=served, log=log)
        vocab = json.loads((model / "config.json").read_text())["vocab_size"]
        requests = make_requests(a.requests, a.max_model_len, vocab, a.disconnect, seed=repeat,
                                 prompt_len=getattr(a, "prompt_len", None))
        warm, rest = requests[: a.warmup], requests[a.warmup :]
        if a.replay:  # the warm-up's requests again: growth now is per request, not a new high-water mark
            rest = [warm[i % len(warm)] for i in range(len(rest))]
        asyncio.run(drive(base, served, fill_requests(a.concurrency, a.max_model_len, vocab), a.concurrency))
        asyncio.run(drive(base, served, warm, a.concurrency))
        record["baseline_after_warmup"] = asyncio.run(settle(base, heterocache))[1]
        rss0, worker = tree_rss(server.pid), worker_pid(server.pid)
        maps0 = rss_by_mapping(worker)
        every = getattr(a, "rss_every", 100)
        samples = [(a.warmup, rss0 | {"worker_kinds": rss_kinds(worker)})]  # (requests done, tree_rss)

        async def progress(done: int) -> None:
            if done % every == 0:
                samples.append((a.warmup + done, tree_rss(server.pid) | {"worker_kinds": rss_kinds(worker)}))
                if getattr(a, "verbose_rss", False):
                    r, k = samples[-1][1], samples[-1][1]["worker_kinds"]
                    print(f"  {a.warmup + done} requests: total {r['total'] / 2**20:.0f} MiB, worker "
                          f"{r.get('VLLM::Worker', 0) / 2**20:.0f} MiB (anon {k.get('RssAnon', 0) / 2**20:.0f}, "
                          f"file {k.get('RssFile', 0) / 2**20:.0f})", flush=True)
            if server.poll() is not None:
                raise RuntimeError(f"the server exited with status {server.returncode} during the load ({log})")

        t0 = time.perf_counter()
        outcomes = asyncio.run(drive(base, served, rest, a.concurrency, progress))
        wall = time.perf_counter() - t0
        values, off = asyncio.run(settle(base, heterocache))
        rss1 = tree_rss(server.pid)
        samples.append((a.requests, rss1 | {"worker_kinds": rss_kinds(worker)}))
        record["worker_mapping_growth"] = mapping_growth(maps0, rss_by_mapping(worker))
        record |= summarize(outcomes, wall)
        record |= {"off_baseline": off, "rss_warm_bytes": rss0["total"], "rss_end_bytes": rss1["total"],
                   "rss_growth": rss1["total"] / rss0["total"] - 1, "rss_samples": samples,
                   "rss_growth_by_process": {k: rss1.get(k, 0) / v - 1 for k, v in rss0.items() if v},
                   "heterocache": {k: v for k, v in values.items() if k.startswith("heterocache_")}}
        record["failures"] = [asdict(o) for o in outcomes if not o.ok][:10]
    finally:
        server_process.stop(server)
    return record


# ---------------------------------------------------------------- report

METRICS = [  # (label, key, higher is better)
    ("request throughput (req/s)", "request_throughput", True),
    ("output throughput (tok/s)", "output_throughput", True),
    ("TTFT p50 (ms)", "p50_ttft_ms", False), ("TTFT p99 (ms)", "p99_ttft_ms", False),
    ("ITL p50 (ms)", "p50_itl_ms", False), ("ITL p99 (ms)", "p99_itl_ms", False),
    ("RSS growth (%)", "rss_growth", False),
]


def report(runs: list[dict], a) -> tuple[dict, list[str]]:
    """Medians per setting, ratios, and what broke the soak's rules."""
    settings = sorted({r["setting"] for r in runs}, key=["stock", "heterocache"].index)
    table, problems = {}, []
    for _, key, _ in METRICS:
        meds = {s: median(v for r in runs if r["setting"] == s and (v := r.get(key)) is not None) for s in settings}
        ratio = meds["heterocache"] / meds["stock"] if len(meds) == 2 and meds["stock"] and key != "rss_growth" else None
        table[key] = {**meds, "ratio": ratio}
    for r in runs:
        name = f"{r['setting']} run {r['repeat']}"
        if r["failed"]:
            problems.append(f"{name}: {r['failed']} requests failed: {r['errors']}")
        if r["off_baseline"]:
            problems.append(f"{name}: not back at baseline after the load: {r['off_baseline']}")
        if r["rss_growth"] > a.max_rss_growth:
            problems.append(f"{name}: RSS grew {100 * r['rss_growth']:.1f}% over {a.requests - a.warmup} requests "
                            f"(limit {100 * a.max_rss_growth:.0f}%)")
    return table, problems


def print_report(table: dict, runs: list[dict], problems: list[str], a) -> None:
    settings = [s for s in ("stock", "heterocache") if s in table["request_throughput"]]
    print(f"\n== {a.requests} requests ({a.warmup} warm-up), {a.concurrency} streams, prompts {MIN_PROMPT}-"
          f"{a.max_model_len - MARGIN} tokens (log-uniform), answers {ANSWER[0]}-{ANSWER[1]} tokens, "
          f"{100 * a.disconnect:.0f}% disconnecting mid-stream, KV space {a.kv_gib:g} GiB, {a.malloc}"
          f"{', measured on the warm-up requests again' if a.replay else ''}; medians of {a.repeats}")
    print(f"{'metric':<28}" + "".join(f"{s:>14}" for s in settings) + ("     ratio" if len(settings) == 2 else ""))
    for label, key, higher in METRICS:
        row = table[key]
        scale = 100 if key == "rss_growth" else 1
        cells = "".join(f"{row[s] * scale:14.2f}" if row[s] is not None else f"{'-':>14}" for s in settings)
        ratio = f"{row['ratio']:9.2f}x" if row.get("ratio") is not None else ""
        print(f"{label:<28}{cells}{ratio}  ({'higher' if higher else 'lower'} is better)")
    for r in runs:
        print(f"{r['setting']:<12} run {r['repeat']}: completed {r['completed']}, failed {r['failed']}, "
              f"disconnected {r['disconnected']}, wall {r['wall_s']:.0f} s, RSS {r['rss_warm_bytes'] / 2**20:.0f} -> "
              f"{r['rss_end_bytes'] / 2**20:.0f} MiB, back at baseline: {not r['off_baseline']}")
        print(f"{'':<12} RSS growth by process: "
              + ", ".join(f"{k} {100 * v:+.1f}%" for k, v in r["rss_growth_by_process"].items() if k != "total"))
        first, last = r["rss_samples"][0][1].get("worker_kinds", {}), r["rss_samples"][-1][1].get("worker_kinds", {})
        if first and last:
            print(f"{'':<12} worker growth by kind: " + ", ".join(
                f"{k} {(last.get(k, 0) - first.get(k, 0)) / 2**20:+.0f} MiB" for k in ("RssAnon", "RssFile", "RssShmem")))
        if r.get("worker_mapping_growth"):
            print(f"{'':<12} worker growth by mapping: " + ", ".join(
                f"{Path(k).name or k} {v / 2**20:+.1f} MiB" for k, v in r["worker_mapping_growth"][:6]))
        print(f"{'':<12} RSS (MiB) by requests done: " + ", ".join(
            f"{n}: {x['total'] / 2**20:.0f}" for n, x in r["rss_samples"]))
        if r["setting"] == "heterocache":
            h = r["heterocache"]
            print(f"{'':<12} drifts {h.get('heterocache_drifts_total', 0):.0f}, refilled heads "
                  f"{h.get('heterocache_refilled_heads_total', 0):.0f}, refill failures "
                  f"{h.get('heterocache_refill_failures_total', 0):.0f}, host-tier rejections "
                  f"{h.get('heterocache_host_tier_rejections_total', 0):.0f}")
    print("\n".join(["soak: OK"] if not problems else ["soak: FAILED", *problems]), flush=True)


def _interrupted(signum, frame):  # SIGTERM / SIGHUP: unwind through the finally blocks
    raise KeyboardInterrupt(f"signal {signum}")


def model_and_options(name: str, ratio: float, out: Path) -> tuple[Path, dict]:
    if name not in MODELS:
        raise SystemExit(f"error: --model must be one of {', '.join(MODELS)}, got {name!r}")
    model, profile = prepare_model(name, out, TINY_LAYOUT)
    return model, heterocache_options(name, profile, {"compression_ratio": ratio})


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny", help="tiny (random weights, synthetic profile) or smollm2")
    p.add_argument("--settings", default="stock,heterocache", help="comma-separated: stock, heterocache")
    p.add_argument("--requests", type=int, default=1300, help="requests in all, the warm-up included")
    p.add_argument("--warmup", type=int, default=300, help="requests before the RSS baseline")
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--disconnect", type=float, default=0.1, help="share of clients that leave mid-stream")
    p.add_argument("--max-model-len", type=int, default=8192, help="the served context; prompts mix up to it")
    p.add_argument("--kv-gib", type=float, default=0.5, help="KV cache space of every server, GiB")
    p.add_argument("--ratio", type=float, default=0.5, help="heterocache.compression_ratio")
    p.add_argument("--heterocache-options", default="{}", help="JSON merged into the heterocache config")
    p.add_argument("--malloc", choices=("tcmalloc", "glibc"), default="tcmalloc",
                   help="the servers' allocator: tcmalloc preloaded, as vLLM's CPU guide and the CPU image do "
                        "(default), or glibc's, whose fragmentation grows a CPU worker's RSS by ~12%% over "
                        "1,000 mixed requests, stock backend or not")
    p.add_argument("--replay", action="store_true",
                   help="measure on the warm-up's requests again (same prompts and lengths): what grows then "
                        "grows per request (a leak), not with the largest batch seen so far")
    p.add_argument("--prompt-len", type=int, help="every prompt of this many tokens instead of mixed lengths")
    p.add_argument("--rss-every", type=int, default=100, help="sample RSS every this many measured requests")
    p.add_argument("--verbose-rss", action="store_true", help="print each RSS sample as it is taken")
    p.add_argument("--server-env", action="append", metavar="KEY=VALUE",
                   help="an environment variable for the servers (repeatable), e.g. ONEDNN_PRIMITIVE_CACHE_CAPACITY=8")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--max-rss-growth", type=float, default=0.05)
    p.add_argument("--ready-timeout", type=float, default=600)
    p.add_argument("--out", type=Path)
    a = p.parse_args(argv)
    settings = a.settings.split(",")
    if any("=" not in kv for kv in a.server_env or []) or a.rss_every < 1:
        p.error("--server-env takes KEY=VALUE; --rss-every is at least 1")
    if not set(settings) <= {"stock", "heterocache"} or not 0 <= a.disconnect < 1 or a.warmup >= a.requests:
        p.error("--settings takes stock and/or heterocache; --disconnect is in [0, 1); --warmup < --requests")
    out = (a.out or Path(tempfile.mkdtemp(prefix="heterocache-soak-"))).resolve()
    out.mkdir(parents=True, exist_ok=True)
    print(f"logs and results.json go to {out}", flush=True)
    signal.signal(signal.SIGTERM, _interrupted)
    signal.signal(signal.SIGHUP, _interrupted)
    model, options = model_and_options(a.model, a.ratio, out)
    options |= json.loads(a.heterocache_options)
    vllm, runs = vllm_executable(), []
    try:
        for rep in range(a.repeats):
            for setting in settings if rep % 2 == 0 else settings[::-1]:
                runs.append(run_setting(setting, rep, model, options, a, out, vllm))
                r = runs[-1]
                print(f"{setting} run {rep + 1}: {r['request_throughput']:.2f} req/s, {r['output_throughput']:.0f} tok/s, "
                      f"failed {r['failed']}, RSS growth {100 * r['rss_growth']:.1f}%", flush=True)
    finally:
        server_process.stop_all()
        (out / "results.json").write_text(json.dumps({"config": {k: str(v) for k, v in vars(a).items()},
                                                      "options": options, "runs": runs}, indent=1))
    table, problems = report(runs, a)
    print_report(table, runs, problems, a)
    (out / "results.json").write_text(json.dumps({"config": {k: str(v) for k, v in vars(a).items()}, "options": options,
                                                  "runs": runs, "table": table, "problems": problems}, indent=1))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
