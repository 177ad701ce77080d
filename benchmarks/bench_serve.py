"""Serving throughput and latency: HeteroCache against vLLM's own CPU backend, same KV space.

    python benchmarks/bench_serve.py --preset short            # smollm2, 1024-token prompts, r0.5
    python benchmarks/bench_serve.py --preset long             # tiny model, 8K prompts, 1K answers, r0.25
    python benchmarks/bench_serve.py --cases tiny:512:r0.5 --num-prompts 8 --concurrency 4 \\
        --output-len 8 --repeats 1                             # a quick smoke run
    python benchmarks/bench_serve.py --preset shared --repeats 3   # shared prefixes (prefix caching)
    python benchmarks/bench_serve.py --preset document --repeats 3 # one 32K document, 16 questions

For each case a real ``vllm serve`` OpenAI server is started on 127.0.0.1 (a free port) for the
stock CPU backend and for HeteroCache, each in a fresh process with the same KV cache space
(``--kv-gib``: ``VLLM_CPU_KVCACHE_SPACE``; a fractional value is passed as
``--kv-cache-memory-bytes`` instead, as that variable takes whole GiB and overrides the flag),
and driven with vLLM's own client, ``vllm bench serve``: dataset ``random``, ``--num-prompts``
prompts of the case's length, ``--output-len`` tokens each (``--ignore-eos``), at most
``--concurrency`` requests in flight, all sent at once; with ``--prefix-len N``, dataset
``prefix_repetition`` instead: ``--num-prefixes`` prefixes of N tokens, each prompt one of them
and a suffix of the case's length. Every server runs ``--dtype float32 --enforce-eager
--max-model-len <input+output+16>`` with vLLM's default prefix caching; HeteroCache adds
``--attention-backend heterocache --additional-config '{"heterocache": ...}'``.

Settings (``--settings``, the first is the baseline of the ratios): ``stock`` (vLLM's CPU
backend), ``heterocache``, each with ``-nopc`` (``--no-enable-prefix-caching``), and
``heterocache-copy`` (``shared_prefixes: copy``: selections of a prefix-cache hit copied).

A case is ``MODEL:LENGTH:SETTING`` (``cases.py``; LENGTH is the input length after the shared
prefix, if any). With ``--repeats N`` the settings run N times, interleaved
(the order rotates with each repeat), each in a fresh server, and the medians are compared:
ratio = setting / baseline for request and output-token throughput (higher is better), p50/p99
TTFT and p50/p99 ITL (lower is better); failed requests are summed.

Presets: ``short`` is the load where compression does not pay and HeteroCache must not be
slower (smollm2, 1024-token prompts, 32 output tokens, 128 prompts, concurrency 64, 1 GiB);
``shared`` is chat-like traffic on prefix caching (smollm2, 4 prefixes of 3072 tokens, 256-token
suffixes, 64 output tokens, 64 prompts, concurrency 16, 1 GiB, stock / HeteroCache / HeteroCache
without prefix caching); ``document`` is many questions about one long document (tiny model, one
32768-token prefix, 64-token questions, 1024-token answers, 16 prompts all in flight, 2 GiB);
``long`` is serving throughput at equal KV space (tiny model, 8192-token prompts, 1024 output
tokens, 32 prompts, concurrency 32, 0.25 GiB: stock holds about 7 full requests at once). It is
the load where holding more requests pays: long prompts and long answers. With short answers
(``--preset long --output-len 64``) the time goes to prefill, which compression does not make
cheaper, and both backends serve about the same throughput (README, "Performance"). The
script prints how many full requests the KV space holds for stock and, roughly, for
HeteroCache's kept fraction while decoding (a prompt still needs all of its KV while it is
prefilled), and vLLM's own startup estimate from each server's log.

Every server's stdout/stderr goes to ``<out>/<case>-<setting>-<repeat>.server.log`` and the
client's to ``.client.log`` next to it, with the client's JSON (``.json``); ``<out>`` is
``--out`` (default: a new temporary folder), printed at the start. For HeteroCache servers the
last ``heterocache stats:`` line (README, "Metrics") is recorded: after the load the script
waits one stats interval and sends a 1-token request, so the line covers the whole run. All
results go to ``<out>/results.json``. Every server and client runs in its own process group,
which is killed (SIGTERM, then SIGKILL) when the run ends, on errors and on Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from statistics import median

from cases import Case, heterocache_options, kept_fraction, prepare_model

from vllm_heterocache import server_process
from vllm_heterocache.serve import vllm_executable

MARGIN = 16  # max-model-len = input + output + MARGIN (special tokens the server may add)
PRESETS = {
    "short": {"cases": "smollm2:1024:r0.5", "output_len": 32, "num_prompts": 128, "concurrency": 64, "kv_gib": 1.0},
    "long": {"cases": "tiny:8192:r0.25", "output_len": 1024, "num_prompts": 32, "concurrency": 32, "kv_gib": 0.25},
    "shared": {"cases": "smollm2:256:r0.5", "output_len": 64, "num_prompts": 64, "concurrency": 16, "kv_gib": 1.0,
               "prefix_len": 3072, "num_prefixes": 4, "settings": "stock,heterocache,heterocache-nopc"},
    "document": {"cases": "tiny:64:r0.25", "output_len": 1024, "num_prompts": 16, "concurrency": 16, "kv_gib": 2.0,
                 "prefix_len": 32768, "num_prefixes": 1, "settings": "stock,heterocache,heterocache-copy"},
}
DEFAULTS = {"cases": PRESETS["short"]["cases"], "output_len": 32, "num_prompts": 128, "concurrency": 64, "kv_gib": 1.0,
            "prefix_len": 0, "num_prefixes": 1, "settings": "stock,heterocache"}
SETTINGS = {  # name -> (HeteroCache backend, vLLM's prefix caching, HeteroCache options of the setting)
    "stock": (False, True, {}), "heterocache": (True, True, {}),
    "stock-nopc": (False, False, {}), "heterocache-nopc": (True, False, {}),
    "heterocache-copy": (True, True, {"shared_prefixes": "copy"}),
}
# (label, key in vllm bench serve's JSON, higher is better)
METRICS = [
    ("request throughput (req/s)", "request_throughput", True),
    ("output throughput (tok/s)", "output_throughput", True),
    ("TTFT p50 (ms)", "p50_ttft_ms", False),
    ("TTFT p99 (ms)", "p99_ttft_ms", False),
    ("ITL p50 (ms)", "p50_itl_ms", False),
    ("ITL p99 (ms)", "p99_itl_ms", False),
    ("TPOT p50 (ms)", "p50_tpot_ms", False),
]
STATS_INTERVAL_S = 10.0  # heterocache.stats_interval_s's default


def _terminate(signum, frame):  # SIGTERM / SIGHUP: unwind through the finally blocks
    raise KeyboardInterrupt(f"signal {signum}")


# ---------------------------------------------------------------- logs

STATS_RE = re.compile(r"heterocache stats: .*")
TIMING_RE = re.compile(r"heterocache step timing: decode steps (\d+); ms per step: (.*)")
STATS_FIELDS = {
    "requests": r"requests (\d+)", "prefill_selections": r"prefill selections (\d+)",
    "drift_checks": r"drift checks (\d+)", "drifts": r"drifts (\d+)", "refilled_heads": r"refilled heads (\d+)",
    "refills_pending": r"refills pending (\d+)", "host_used_blocks": r"host tier (\d+)/",
    "host_blocks": r"host tier \d+/(\d+)", "host_bytes_in": r"host bytes in (\d+)",
    "host_bytes_out": r"host bytes in \d+ out (\d+)", "host_rejections": r"host rejections (\d+)",
}


def stats_lines(log: Path) -> list[str]:
    try:
        return STATS_RE.findall(log.read_text(errors="replace"))
    except OSError:
        return []


def parse_stats(line: str | None) -> dict | None:
    if not line:
        return None
    out = {}
    for key, pattern in STATS_FIELDS.items():
        m = re.search(pattern, line)
        if m:
            out[key] = int(m.group(1))
    return out


def parse_server_log(log: Path) -> dict:
    text = log.read_text(errors="replace")
    info: dict = {}
    timings = TIMING_RE.findall(text)  # HETEROCACHE_STEP_TIMING=1 (--step-timing): the mean decode step
    if timings:
        info["decode_steps"] = int(timings[-1][0])
        info["decode_step_ms"] = {k: float(v) for k, v in (part.split(" ") for part in timings[-1][1].split(", "))}
    m = re.search(r"KV cache size: ([\d,]+) tokens, Maximum concurrency for ([\d,]+) tokens per request: ([\d.]+)x", text)
    if m:
        info["vllm_kv_tokens"] = int(m.group(1).replace(",", ""))
        info["vllm_max_concurrency"] = float(m.group(3))
    running = [int(x) for x in re.findall(r"Running: (\d+) reqs", text)]
    waiting = [int(x) for x in re.findall(r"Waiting: (\d+) reqs", text)]
    info["peak_running_logged"] = max(running, default=None)  # vLLM's 10 s stats lines
    info["peak_waiting_logged"] = max(waiting, default=None)
    for key, pattern in (("backend_line", r"HeteroCache attention backend:.*"), ("host_tier_line", r"heterocache host tier:.*")):
        m = re.search(pattern, text)
        info[key] = m.group(0).strip() if m else None
    return info


# ---------------------------------------------------------------- one run

def run_one(*, vllm: str, model: str, served: str, case: dict, setting: str, repeat: int, a, out: Path) -> dict:
    stem = f"{case['slug']}-{setting}-{repeat + 1}"
    server_log, client_log = out / f"{stem}.server.log", out / f"{stem}.client.log"
    port = server_process.free_port()
    base = f"http://127.0.0.1:{port}"
    heterocache, prefix_caching, options = SETTINGS[setting]
    cmd = [vllm, "serve", model, "--served-model-name", served, "--host", "127.0.0.1", "--port", str(port),
           "--dtype", "float32", "--enforce-eager", "--max-model-len", str(case["max_model_len"]),
           "--disable-uvicorn-access-log", "--seed", "0"]
    if not prefix_caching:
        cmd.append("--no-enable-prefix-caching")
    env = dict(os.environ)
    if a.step_timing:
        env["HETEROCACHE_STEP_TIMING"] = "1"
    if float(a.kv_gib).is_integer():
        env["VLLM_CPU_KVCACHE_SPACE"] = str(int(a.kv_gib))
    else:  # the variable takes whole GiB and would override the flag
        env.pop("VLLM_CPU_KVCACHE_SPACE", None)
        cmd += ["--kv-cache-memory-bytes", str(int(a.kv_gib * (1 << 30)))]
    if heterocache:
        cmd += ["--attention-backend", "heterocache",
                "--additional-config", json.dumps({"heterocache": case["options"] | options})]
    record: dict = {"setting": setting, "repeat": repeat + 1, "port": port, "server_cmd": cmd,
                    "server_log": str(server_log), "client_log": str(client_log)}
    server = server_process.start(cmd, env=env, log=server_log)
    try:
        record["ready_s"] = server_process.wait_ready(server, base, timeout=a.ready_timeout, model=served,
                                                      log=server_log)
        info = parse_server_log(server_log)
        if heterocache and not info["backend_line"]:
            raise RuntimeError(f"no 'HeteroCache attention backend' line in {server_log}")
        if not heterocache and info["backend_line"]:
            raise RuntimeError(f"the stock server logged the HeteroCache backend line ({server_log})")
        result_name = f"{stem}.json"
        client_cmd = [vllm, "bench", "serve", "--backend", "openai", "--endpoint", "/v1/completions",
                      "--base-url", base, "--model", served, "--tokenizer", model,
                      *dataset_args(case, a), "--num-prompts", str(a.num_prompts), "--max-concurrency", str(a.concurrency),
                      "--request-rate", "inf", "--ignore-eos", "--temperature", "0", "--seed", str(repeat),
                      "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,99",
                      "--save-result", "--save-detailed", "--result-dir", str(out), "--result-filename", result_name,
                      "--label", setting, "--disable-tqdm"]
        record["client_cmd"] = client_cmd
        client = server_process.start(client_cmd, env=dict(os.environ), log=client_log)
        try:
            t0 = time.time()
            while client.poll() is None:
                if server.poll() is not None:
                    raise RuntimeError(f"the server exited with status {server.returncode} during the load; "
                                       f"last lines of {server_log}:\n{server_process.log_tail(server_log)}")
                if time.time() - t0 > a.client_timeout:
                    raise RuntimeError(f"the client ran past {a.client_timeout:.0f} s; see {client_log}")
                time.sleep(0.5)
        finally:
            server_process.stop(client, grace=10)
        result_file = out / result_name
        if client.returncode or not result_file.is_file():
            raise RuntimeError(f"vllm bench serve exited with status {client.returncode}; last lines of "
                               f"{client_log}:\n{server_process.log_tail(client_log)}")
        raw = json.loads(result_file.read_text())
        record["result_file"] = str(result_file)
        record["metrics"] = {k: v for k, v in raw.items() if not isinstance(v, (list, dict))}
        errors = [e for e in raw.get("errors", []) if e]
        record["errors"] = sorted(set(errors))[:5]
        if heterocache:
            # The stats line is logged at the first step after each interval: one 1-token request
            # after an interval of quiet makes the last line cover the whole run.
            before = len(stats_lines(server_log))
            time.sleep(case["options"].get("stats_interval_s", STATS_INTERVAL_S) + 0.5)
            try:
                req = urllib.request.Request(f"{base}/v1/completions", headers={"Content-Type": "application/json"},
                                             data=json.dumps({"model": served, "prompt": "Hello", "max_tokens": 1}).encode())
                urllib.request.urlopen(req, timeout=60).read()
            except (urllib.error.URLError, OSError) as e:
                record["stats_probe_error"] = str(e)
            deadline = time.time() + 10
            while len(stats_lines(server_log)) <= before and time.time() < deadline:
                time.sleep(0.5)
        record["server"] = parse_server_log(server_log)
        lines = stats_lines(server_log)
        record["heterocache_stats"] = lines[-1] if lines else None
        record["heterocache_stats_parsed"] = parse_stats(record["heterocache_stats"])
    finally:
        server_process.stop(server)
    return record


def dataset_args(case: dict, a) -> list[str]:
    """``vllm bench serve``'s dataset flags: random prompts of the case's length, or with
    ``--prefix-len`` shared prefixes and the case's length as each prompt's own suffix."""
    if not a.prefix_len:
        return ["--dataset-name", "random", "--random-input-len", str(case["input_len"]),
                "--random-output-len", str(a.output_len), "--random-range-ratio", "0"]
    return ["--dataset-name", "prefix_repetition", "--prefix-repetition-prefix-len", str(a.prefix_len),
            "--prefix-repetition-suffix-len", str(case["input_len"] - a.prefix_len),
            "--prefix-repetition-num-prefixes", str(a.num_prefixes), "--prefix-repetition-output-len", str(a.output_len)]


# ---------------------------------------------------------------- cases and report

def prepare_case(spec: str, a, out: Path) -> dict:
    case = Case.parse(spec)
    name, length = case.model, case.length
    model, profile = prepare_model(name, out)
    model = str(model)
    options = heterocache_options(name, profile, case.options)
    options.update(json.loads(a.heterocache_options))
    config = json.loads((Path(model) / "config.json").read_text())
    limit = config["max_position_embeddings"]
    input_len = min(a.prefix_len + length, limit - a.output_len - MARGIN)  # e.g. SmolLM2's 8K context
    layers, kv_heads = config["num_hidden_layers"], config.get("num_key_value_heads", config["num_attention_heads"])
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    token_bytes = 2 * layers * kv_heads * head_dim * 4  # K and V, float32
    kv_bytes = int(a.kv_gib * (1 << 30))
    f = kept_fraction(profile, options, input_len)
    request = input_len + a.output_len
    capacity = {
        "kv_bytes": kv_bytes, "stock_bytes_per_token": token_bytes, "kv_tokens_stock": kv_bytes // token_bytes,
        "stock_full_requests": kv_bytes // (token_bytes * request), "kept_fraction": f,
        # decoding: the kept share of the prompt (compressed heads hold their budget) + the new tokens
        "heterocache_decoding_requests_est": int(kv_bytes // (token_bytes * (f * input_len + a.output_len))),
    }
    slug = re.sub(r"[^A-Za-z0-9_.-]", "_", spec)
    return {"case": spec, "slug": slug, "model": model, "served": Path(model).name, "input_len": input_len,
            "max_model_len": input_len + a.output_len + MARGIN, "options": options, "capacity": capacity}


def summarize(runs: list[dict], settings: list[str]) -> dict:
    """Per metric, each setting's median and its ratio to the first setting's."""
    by = {s: [r for r in runs if r["setting"] == s and "metrics" in r] for s in settings}
    base = settings[0]
    summary = {}
    for label, key, higher in METRICS:
        meds = {}
        for s, rs in by.items():
            vals = [r["metrics"].get(key, r["metrics"].get(key.replace("p50_", "median_"))) for r in rs]
            vals = [v for v in vals if v is not None]
            meds[s] = median(vals) if vals else None
        ratios = {s: (m / meds[base] if meds[base] and m is not None else None) for s, m in meds.items() if s != base}
        summary[key] = {"label": label, "medians": meds, "ratios": ratios, "higher_is_better": higher}
    summary["failed"] = {s: sum(r["metrics"].get("failed", 0) for r in rs) for s, rs in by.items()}
    summary["completed"] = {s: sum(r["metrics"].get("completed", 0) for r in rs) for s, rs in by.items()}
    summary["runs"] = {s: len(rs) for s, rs in by.items()}
    return summary


def print_table(case: dict, summary: dict, repeats: int, a, settings: list[str]) -> None:
    base, others = settings[0], settings[1:]
    load = (f"{a.num_prompts} prompts ({a.num_prefixes} shared prefixes of {a.prefix_len} tokens + "
            f"{case['input_len'] - a.prefix_len} own)" if a.prefix_len else f"{a.num_prompts} prompts of {case['input_len']} tokens")
    print(f"\n== {case['case']}: {load}, {a.output_len} output tokens, concurrency {a.concurrency}, KV space "
          f"{a.kv_gib:g} GiB; medians of {repeats} fresh servers each; ratio = setting / {base}", flush=True)
    print(f"{'metric':<28}" + "".join(f" {s:>16}" for s in settings) + "".join(f" {'x ' + s:>18}" for s in others)
          + "  better")
    fmt = lambda v: f" {v:16.2f}" if v is not None else f" {'-':>16}"
    for _label, key, higher in METRICS:
        row = summary[key]
        ratios = "".join(f" {row['ratios'][s]:17.2f}x" if row["ratios"][s] is not None else f" {'-':>18}"
                         for s in others)
        print(f"{row['label']:<28}" + "".join(fmt(row["medians"][s]) for s in settings) + ratios
              + f"  {'higher' if higher else 'lower'}")
    f, c = summary["failed"], summary["completed"]
    print(f"{'failed requests (all runs)':<28}" + "".join(f" {f[s]:>16}" for s in settings)
          + f"   (completed {' / '.join(str(c[s]) for s in settings)})", flush=True)


def decode_limits(runs: list[dict], settings: list[str], kept: float) -> dict:
    """The mean decode step of each HeteroCache setting against the limit bench_decode_speed.py
    prints: the baseline's step S with its attention A reading only the kept fraction f of the
    KV at the baseline's bytes/s, S - A + f A (medians over the runs)."""
    def step(setting):
        ms = [r["server"]["decode_step_ms"] for r in runs if r["setting"] == setting and "decode_step_ms" in r.get("server", {})]
        return {k: median(m[k] for m in ms) for k in ms[0]} if ms else None

    base = step(settings[0])
    out = {}
    if base is None:
        print("no decode step timing in the baseline's server logs", flush=True)
        return out
    limit_ms = base["total"] - base["attention"] + kept * base["attention"]
    for s in settings[1:]:
        ms = step(s)
        if ms is None or not SETTINGS[s][0]:
            continue
        out[s] = {"baseline_step_ms": base["total"], "baseline_attention_ms": base["attention"], "kept_fraction": kept,
                  "limit_step_ms": limit_ms, "step_ms": ms["total"], "speedup": base["total"] / ms["total"],
                  "limit_speedup": base["total"] / limit_ms, "fraction_of_limit": limit_ms / ms["total"]}
        print(f"decode step: {settings[0]} {base['total']:.1f} ms (attention {base['attention']:.1f}); KV kept "
              f"{kept:.3f} -> limit {limit_ms:.1f} ms ({base['total'] / limit_ms:.2f}x); {s} {ms['total']:.1f} ms "
              f"({base['total'] / ms['total']:.2f}x) = {limit_ms / ms['total']:.2f} of the limit", flush=True)
    return out


def run_line(case: dict, rec: dict, repeats: int) -> str:
    m = rec["metrics"]
    g = lambda k: m.get(k, m.get(k.replace("p50_", "median_"), float("nan")))
    s = rec["server"]
    line = (f"{case['case']:<18} repeat {rec['repeat']}/{repeats} {rec['setting']:<11} "
            f"{m['request_throughput']:6.2f} req/s {m['output_throughput']:8.1f} tok/s | "
            f"TTFT p50 {g('p50_ttft_ms'):8.0f} p99 {g('p99_ttft_ms'):8.0f} ms | "
            f"ITL p50 {g('p50_itl_ms'):7.1f} p99 {g('p99_itl_ms'):7.1f} ms | completed {m['completed']} "
            f"failed {m['failed']} | peak running {s.get('peak_running_logged')} | ready in {rec['ready_s']:.0f} s")
    if rec.get("heterocache_stats"):
        line += f"\n{'':<18} {rec['heterocache_stats']}"
    if rec.get("errors"):
        line += f"\n{'':<18} errors: {rec['errors']}"
    return line


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), help="defaults for the options below (explicit ones win)")
    p.add_argument("--cases", help=f"comma-separated MODEL:LENGTH:SETTING (cases.py; default {DEFAULTS['cases']})")
    p.add_argument("--output-len", type=int, help=f"output tokens per request (default {DEFAULTS['output_len']})")
    p.add_argument("--num-prompts", type=int, help=f"requests per run (default {DEFAULTS['num_prompts']})")
    p.add_argument("--concurrency", type=int, help=f"most requests in flight (default {DEFAULTS['concurrency']})")
    p.add_argument("--kv-gib", type=float, help=f"KV cache space of both servers, GiB (default {DEFAULTS['kv_gib']:g})")
    p.add_argument("--settings", help=f"comma-separated, of {', '.join(SETTINGS)}; the first is the baseline "
                   f"(default {DEFAULTS['settings']})")
    p.add_argument("--prefix-len", type=int, help="shared prefix tokens (dataset prefix_repetition); 0: random prompts")
    p.add_argument("--num-prefixes", type=int, help="distinct shared prefixes (with --prefix-len)")
    p.add_argument("--repeats", type=int, default=1, help="fresh servers per setting, interleaved; medians are compared")
    p.add_argument("--step-timing", action="store_true",
                   help="servers log their mean decode step (HETEROCACHE_STEP_TIMING=1); each HeteroCache setting's "
                        "decode step is compared with the limit of bench_decode_speed.py: the baseline's step with "
                        "its attention reading only the kept fraction of the KV")
    p.add_argument("--heterocache-options", default="{}", help="JSON merged into the heterocache config, "
                   "e.g. '{\"host_tier_gib\": 1}'")
    p.add_argument("--ready-timeout", type=float, default=600, help="seconds a server may take to answer /health")
    p.add_argument("--client-timeout", type=float, default=7200, help="seconds one `vllm bench serve` may take")
    p.add_argument("--out", type=Path, help="folder for logs, client JSON and results.json (default: a new temp folder)")
    a = p.parse_args()
    preset = PRESETS.get(a.preset, {})
    for key, value in DEFAULTS.items():
        if getattr(a, key) is None:
            setattr(a, key, preset.get(key, value))
    if a.kv_gib <= 0 or a.repeats < 1:
        p.error("--kv-gib must be positive and --repeats at least 1")
    settings = a.settings.split(",")
    unknown = [s for s in settings if s not in SETTINGS]
    if unknown or len(set(settings)) != len(settings) or len(settings) < 2:
        p.error(f"--settings: two or more distinct of {', '.join(SETTINGS)}, got {a.settings!r}")

    out = a.out or Path(tempfile.mkdtemp(prefix="heterocache-bench-serve-"))
    out.mkdir(parents=True, exist_ok=True)
    out = out.resolve()
    print(f"logs, client results and results.json go to {out}", flush=True)
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGHUP, _terminate)
    vllm = vllm_executable()
    results: dict = {"config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()},
                     "vllm": vllm, "cases": []}
    status = 0
    try:
        for spec in a.cases.split(","):
            case = prepare_case(spec, a, out)
            cap = case["capacity"]
            print(f"{spec}: KV space {a.kv_gib:g} GiB = {cap['kv_tokens_stock']:,} tokens of stock KV "
                  f"({cap['stock_bytes_per_token']} B/token, float32): stock holds {cap['stock_full_requests']} full "
                  f"requests of {case['input_len']}+{a.output_len} tokens at once; HeteroCache keeps "
                  f"{cap['kept_fraction']:.3f} of a prompt while decoding: about "
                  f"{cap['heterocache_decoding_requests_est']} decoding requests (a prompt still needs all of its "
                  f"KV while it is prefilled); token counts before rounding to KV blocks; concurrency {a.concurrency}",
                  flush=True)
            entry = {k: v for k, v in case.items() if k != "slug"}
            entry["runs"] = []
            results["cases"].append(entry)
            for rep in range(a.repeats):  # interleaved, the order rotating with each repeat
                order = settings[rep % len(settings):] + settings[: rep % len(settings)]
                for setting in order:
                    rec = run_one(vllm=vllm, model=case["model"], served=case["served"], case=case, setting=setting,
                                  repeat=rep, a=a, out=out)
                    entry["runs"].append(rec)
                    print(run_line(case, rec, a.repeats), flush=True)
            entry["vllm_startup_capacity"] = {
                s: next((r["server"].get("vllm_max_concurrency") for r in entry["runs"] if r["setting"] == s), None)
                for s in settings}
            entry["summary"] = summarize(entry["runs"], settings)
            print_table(case, entry["summary"], a.repeats, a, settings)
            vc = entry["vllm_startup_capacity"]
            print("vLLM's startup estimate of full-length requests the KV space holds: "
                  + ", ".join(f"{s} {vc[s]}x" for s in settings), flush=True)
            if a.step_timing:
                entry["decode_limits"] = decode_limits(entry["runs"], settings, case["capacity"]["kept_fraction"])
    except KeyboardInterrupt as e:
        results["interrupted"] = str(e) or "KeyboardInterrupt"
        print(f"\ninterrupted ({results['interrupted']}); stopping servers", file=sys.stderr, flush=True)
        status = 130
    except Exception as e:  # noqa: BLE001 - record it, clean up, and report
        results["error"] = f"{type(e).__name__}: {e}"
        print(f"error: {results['error']}", file=sys.stderr, flush=True)
        status = 1
    finally:
        server_process.stop_all()
        (out / "results.json").write_text(json.dumps(results, indent=1))
        print(f"results: {out / 'results.json'}", flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
