"""Device KV memory and capacity: HeteroCache against vLLM's own CPU backend, same KV space.

    python benchmarks/bench_memory.py [--footprint tiny:8192,smollm2:4096] [--concurrency tiny:8192]
                                      [--shared tiny:8192] [--settings r0.5,b0.25,b0.1] [--kv-mib 512]

All numbers come from vLLM's own block accounting (the scheduler's block pool, in-process
engine), each backend in its own engine process with the same ``kv_cache_memory_bytes``. A
block of any KV cache group costs the largest group's bytes (vLLM gives every group as many
caches and pads the smaller ones), which is what these numbers count.

- footprint: one request of L prompt tokens; after 4 decode steps, the blocks it holds x the
  bytes of a block, per token of the sequence. Settings: ``rX`` is compression_ratio X; ``bX``
  is ``token_budget = X * L`` (for ratios a profile makes infeasible: SmolLM2's full heads alone
  keep 0.389 of its cache; see the fidelity benchmark).
- concurrency: 16 requests of L tokens, 32 new tokens each, submitted at once: the most
  requests decoding at the same time and the preemptions.
- shared prefix (vLLM's prefix caching on for both): one request of an L-token prefix first (a
  system prompt, now in the prefix cache), then ``--shared-requests`` requests of that prefix and
  a ``--shared-suffix``-token suffix of their own, 32 new tokens each, submitted at once: the
  most device KV held at once (blocks in use, each shared block counted once) and the most
  requests decoding at once, in ``--kv-mib`` and in the tighter ``--shared-kv-mib``.
- longest context: the maximum model length vLLM estimates the KV space admits (its startup
  check; HeteroCache holds every prompt token while the prompt is prefilled, so it admits no
  longer prompt than the stock backend).

The tiny model runs with a profile of 1 full head in 8 (so ratios down to 0.125 are feasible).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from cases import MODELS, Case, heterocache_options, prepare_model, setting_options

WORKER = r'''
import json, os, sys
os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
from vllm import LLM, SamplingParams
from vllm_heterocache.data.texts import documents
from vllm_heterocache.vllm_adapter import compat
if __name__ == "__main__":
    mode, model, length, kv_bytes, extra = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), json.loads(sys.argv[5])
    requests, suffix = int(os.environ.get("SHARED_REQUESTS", "32")), int(os.environ.get("SHARED_SUFFIX", "64"))
    if mode == "longest":  # vLLM's startup check says how far the KV space reaches
        from transformers import AutoConfig
        max_len = AutoConfig.from_pretrained(model).max_position_embeddings
    else:
        max_len = length + suffix + 64
    try:
        llm = LLM(model=model, dtype="float32", max_model_len=max_len, enable_prefix_caching=mode == "shared",
                  enforce_eager=True, seed=0, kv_cache_memory_bytes=kv_bytes, **extra)
    except Exception as e:
        found = [l for l in str(e).splitlines() if "estimated maximum model length" in l]
        print("RESULT " + json.dumps({"error": found[0] if found else str(e)[-300:]}))
        sys.exit(0)
    sched = compat.engine_scheduler(llm)
    pool = compat.engine_block_pool(sched)
    groups = compat.engine_kv_cache_groups(sched)
    held_by_group = compat.engine_blocks_by_group(sched)
    def block_bytes(g):  # a page in each of the group's layers
        spec = g.kv_cache_spec
        return spec.page_size_bytes * (1 if hasattr(spec, "kv_cache_specs") else len(g.layer_names))
    # every block of the pool costs the largest group's bytes (vLLM pads smaller groups to it)
    sizes = [max(block_bytes(g) for g in groups)] * len(groups)
    def held_bytes():
        return sum(size * sum(not b.is_null for blocks in held.values() for b in blocks)
                   for size, held in zip(sizes, held_by_group))
    def in_use_bytes():  # every block some request holds, a shared one once
        return sum(size * len({b.block_id for blocks in held.values() for b in blocks if not b.is_null})
                   for size, held in zip(sizes, held_by_group))
    preempted = compat.count_preemptions(sched)
    text = llm.get_tokenizer()("\n".join(documents(8, 8 * length)), add_special_tokens=False).input_ids
    ids = text[:length]
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    if mode == "shared":  # the prefix first: then it is in the prefix cache, as a system prompt is
        llm.generate([{"prompt_token_ids": ids}], SamplingParams(temperature=0, max_tokens=1))
        prompts = [ids + text[length + i * suffix : length + (i + 1) * suffix] for i in range(requests)]
    else:
        prompts = [ids] * (1 if mode == "footprint" else 16)
    for i, prompt in enumerate(prompts):
        llm.llm_engine.add_request(str(i), {"prompt_token_ids": prompt}, params)
    most, held, peak = 0, None, 0
    while sched.has_requests():
        llm.llm_engine.step()
        running = [r for r in sched.running if r.num_output_tokens > 0]
        most = max(most, len(running))
        peak = max(peak, in_use_bytes())
        if mode == "footprint" and held is None and running and running[0].num_output_tokens >= 4:
            held = (pool.num_gpu_blocks - 1 - pool.get_num_free_blocks(), held_bytes(), running[0].num_tokens)
    out = {"blocks": pool.num_gpu_blocks, "block_bytes": sizes, "groups": len(groups),
           "block_sizes": sorted({g.kv_cache_spec.block_size for g in groups}),
           "most_decoding": most, "preemptions": len(preempted), "peak_in_use_bytes": peak}
    if held:
        out["held_blocks"], out["held_bytes"], out["seq_len"] = held
        out["bytes_per_token"] = held[1] / held[2]
    print("RESULT " + json.dumps(out))
'''


def run(mode: str, model: str, length: int, kv_bytes: int, extra: dict, env: dict | None = None) -> dict:
    out = subprocess.run([sys.executable, "-c", WORKER, mode, model, str(length), str(kv_bytes), json.dumps(extra)],
                         capture_output=True, text=True, env={**os.environ, **(env or {})})
    lines = [l for l in out.stdout.splitlines() if l.startswith("RESULT ")]
    if out.returncode or not lines:
        raise RuntimeError(out.stderr[-4000:])
    return json.loads(lines[-1][7:])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--footprint", default="tiny:8192,smollm2:4096")
    p.add_argument("--concurrency", default="tiny:8192")
    p.add_argument("--longest", default="tiny")
    p.add_argument("--shared", default="tiny:8192", help="model:prefix_len of the shared-prefix runs")
    p.add_argument("--shared-requests", type=int, default=32)
    p.add_argument("--shared-suffix", type=int, default=64)
    p.add_argument("--shared-kv-mib", type=int, default=48,
                   help="the tighter KV space of the shared-prefix runs (MiB): stock holds the tiny model's 8K "
                        "prefix and a few of the requests")
    p.add_argument("--settings", default="r0.5,b0.25,b0.1")
    p.add_argument("--kv-mib", type=int, default=512, help="KV cache space of every engine (MiB)")
    p.add_argument("--concurrency-kv-mib", type=int, default=128,
                   help="KV cache space for the concurrency runs (MiB): the stock backend fits 4 tiny 8K requests")
    p.add_argument("--out", type=Path)
    a = p.parse_args()
    kv_bytes = a.kv_mib << 20
    work = Path(tempfile.mkdtemp(prefix="heterocache-bench-memory-"))  # the tiny model's profile
    paths = {name: prepare_model(name, work) for name in MODELS}
    report = {"kv_mib": a.kv_mib, "concurrency_kv_mib": a.concurrency_kv_mib, "footprint": [], "concurrency": [],
              "shared": [], "longest": []}

    def engines(name: str, length: int):
        model, profile = paths[name]
        yield "stock", str(model), {}
        for s in a.settings.split(","):
            opts = heterocache_options(name, profile, setting_options(s, length))
            yield s, str(model), {"attention_backend": "heterocache", "additional_config": {"heterocache": opts}}

    for spec in Case.parse_list(a.footprint, setting=False):
        case, name, length = str(spec), spec.model, spec.length
        base = None
        for label, model, extra in engines(name, length):
            r = run("footprint", model, length, kv_bytes, extra)
            if "error" in r:  # e.g. a ratio the profile makes infeasible
                print(f"footprint {case:<14} {label:<6} not run: {r['error']}", flush=True)
                continue
            base = base or r["bytes_per_token"]
            report["footprint"].append({"case": case, "setting": label, **r})
            print(f"footprint {case:<14} {label:<6} {r['bytes_per_token']:9.0f} B/token "
                  f"({r['bytes_per_token'] / base:.3f} of stock; {r['held_blocks']} blocks in {r['groups']} groups, "
                  f"block sizes {r['block_sizes']})", flush=True)
    for spec in Case.parse_list(a.concurrency, setting=False):
        case, name, length = str(spec), spec.model, spec.length
        for label, model, extra in engines(name, length):
            r = run("concurrency", model, length, a.concurrency_kv_mib << 20, extra)
            report["concurrency"].append({"case": case, "setting": label, **r})
            print(f"concurrency {case:<12} {label:<6} {r['most_decoding']:3d} requests decoding at once, "
                  f"{r['preemptions']} preemptions ({r['blocks']} blocks)", flush=True)
    shared_env = {"SHARED_REQUESTS": str(a.shared_requests), "SHARED_SUFFIX": str(a.shared_suffix)}
    for spec in Case.parse_list(a.shared, setting=False):
        case, name, length = str(spec), spec.model, spec.length
        for mib in (a.kv_mib, a.shared_kv_mib):
            base = None
            for label, model, extra in engines(name, length):
                r = run("shared", model, length, mib << 20, extra, shared_env)
                if "error" in r:
                    print(f"shared {case:<13} {mib:4d} MiB {label:<6} not run: {r['error']}", flush=True)
                    continue
                base = base or r
                report["shared"].append({"case": case, "kv_mib": mib, "setting": label, **r})
                print(f"shared {case:<13} {mib:4d} MiB {label:<6} peak device KV {r['peak_in_use_bytes'] / 2**20:7.1f} MiB "
                      f"({r['peak_in_use_bytes'] / base['peak_in_use_bytes']:.2f} of stock), "
                      f"{r['most_decoding']:3d} of {a.shared_requests} requests decoding at once "
                      f"(stock {base['most_decoding']}), {r['preemptions']} preemptions", flush=True)
    for name in filter(None, a.longest.split(",")):
        for label, model, extra in engines(name, 8192):
            r = run("longest", model, 8192, a.concurrency_kv_mib << 20, extra)
            found = re.search(r"estimated maximum model length is (\d+)", r.get("error", ""))
            longest = int(found.group(1)) if found else None
            report["longest"].append({"model": name, "setting": label, "longest": longest, "raw": r})
            print(f"longest context {name:<8} {label:<6} {longest} tokens", flush=True)
    if a.out:
        a.out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
