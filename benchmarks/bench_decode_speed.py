"""Decode speed and time to first token: HeteroCache against vLLM's own CPU backend, same run.

    python benchmarks/bench_decode_speed.py [--cases smollm2:4096:r0.5,smollm2:8192:b0.25,tiny:32768:r0.25]
                                            [--tp-size 2]

For each case one prompt of the given length (public-domain text) is generated greedily with 128
new tokens per backend, each run in its own engine process (eager mode for both); with
``--repeats N`` the settings run N times, interleaved, and the medians are compared (this
machine's speed drifts by 10-30% between minutes). Decode tokens/s comes from the engine's own
timestamps (first and last token). Cases are ``MODEL:LENGTH:SETTING``
(``benchmarks/cases.py``). SmolLM2 runs with its
shipped profile, the tiny model with a profile of 1 full head in 8 (12.5%). Each HeteroCache
case runs with refills from the host tier and with refills disabled (the overhead of retrieval).

Per-step breakdown: every engine runs with ``HETEROCACHE_STEP_TIMING=1`` (``runtime.timing``),
so its worker logs the mean decode step split into model (everything vLLM does in the worker
besides attention and metadata), attention (cache writes + attention kernels), planning (metadata
builders, HeteroCache's step hook), drift checks and refill waits; "engine" is the rest of the
wall-clock step (scheduler, inter-process messages). The script prints it for stock and
HeteroCache.

Limits. With stock's step S = everything else + A (its attention), a backend that reads only the
kept fraction f of the KV cache at stock's speed per byte, and has no other cost, decodes at
best S / (S - A + f A) times as fast ("limit at stock's bytes/s"). The same with the bytes/s
HeteroCache's own attention reached in the run ("limit at our kernel's bytes/s"). The measured
ratio is also given as a fraction of the first limit.
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
from statistics import median

from cases import Case, heterocache_options, kept_fraction, prepare_model
WORKER = r'''
import json, os, sys, time
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
os.environ["HETEROCACHE_STEP_TIMING"] = "1"
from vllm import LLM, SamplingParams
from vllm_heterocache.data.texts import documents
if __name__ == "__main__":
    model, length, new, extra = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), json.loads(sys.argv[4])
    from transformers import AutoConfig
    limit = AutoConfig.from_pretrained(model).max_position_embeddings
    length = min(length, limit - new - 8)  # e.g. SmolLM2's 8K context: 8120 prompt tokens
    llm = LLM(model=model, dtype="float32", max_model_len=length + new + 8, enable_prefix_caching=False,
              enforce_eager=True, disable_log_stats=False, seed=0, **extra)
    tok = llm.get_tokenizer()
    ids = tok("\n".join(documents(4, 8 * length)), add_special_tokens=False).input_ids[:length]
    t = time.time()
    out = llm.generate([{"prompt_token_ids": ids}], SamplingParams(temperature=0, max_tokens=new, ignore_eos=True))[0]
    wall = time.time() - t
    m = out.metrics
    decode = (len(out.outputs[0].token_ids) - 1) / (m.last_token_ts - m.first_token_ts)
    print("RESULT " + json.dumps({"prompt_tokens": len(ids), "ttft_s": m.first_token_ts - m.scheduled_ts, "decode_tok_s": decode, "wall_s": wall}))
'''


TIMING = re.compile(r"heterocache step timing: decode steps (\d+); ms per step: (.*)")


def run(model: str, length: int, new: int, extra: dict) -> dict:
    env = dict(os.environ)
    tp = extra.get("tensor_parallel_size", 1)
    if tp > 1:  # one core per rank (vLLM's automatic binding refuses two ranks on one NUMA node)
        env["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(str(core) for core in range(tp))
    out = subprocess.run([sys.executable, "-c", WORKER, model, str(length), str(new), json.dumps(extra)],
                         capture_output=True, text=True, env=env)
    lines = [l for l in out.stdout.splitlines() if l.startswith("RESULT ")]
    if out.returncode or not lines:
        raise RuntimeError(out.stderr[-4000:])
    result = json.loads(lines[-1][7:])
    timings = TIMING.findall(out.stdout + out.stderr)  # vLLM logs to stdout
    if not timings:
        raise RuntimeError("no step timing line in the engine's log (HETEROCACHE_STEP_TIMING)")
    parts = dict(part.split(" ") for part in timings[-1][1].split(", "))
    result["step_ms"] = {k: float(v) for k, v in parts.items()}
    result["step_ms"]["engine"] = 1e3 / result["decode_tok_s"] - result["step_ms"]["total"]
    return result


def breakdown(runs: list[dict]) -> dict[str, float]:
    """Median over runs of each part of the mean decode step (ms)."""
    return {k: median(r["step_ms"][k] for r in runs) for k in runs[0]["step_ms"]}


PARTS = ("engine", "model", "planning", "attention", "drift", "refill_wait")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", default="smollm2:4096:r0.5,smollm2:8192:b0.25,tiny:32768:r0.25")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=1, help="runs per setting, interleaved; medians are reported")
    p.add_argument("--out", type=Path)
    p.add_argument("--tp-size", type=int, default=1,
                   help="tensor-parallel ranks for every setting, one core each (the tiny model's 2 KV heads: "
                        "its pivot and satellite in layer 0 are on different ranks at 2)")
    a = p.parse_args()
    rows = []
    work = Path(tempfile.mkdtemp(prefix="heterocache-bench-decode-"))  # the tiny model's profile
    for spec in Case.parse_list(a.cases):
        case, length = str(spec), spec.length
        model, profile = prepare_model(spec.model, work)
        model = str(model)
        options = heterocache_options(spec.model, profile, spec.options)
        tp = {"tensor_parallel_size": a.tp_size, "distributed_executor_backend": "mp"} if a.tp_size > 1 else {}
        settings = {
            "stock": {**tp},
            "heterocache": {**tp, "attention_backend": "heterocache", "additional_config": {"heterocache": options}},
            "heterocache-norefill": {**tp, "attention_backend": "heterocache",
                                     "additional_config": {"heterocache": {**options, "refill": False}}},
        }
        runs: dict[str, list[dict]] = {label: [] for label in settings}
        for rep in range(a.repeats):  # interleaved, so slow phases of the machine hit every setting
            for label, extra in settings.items():
                runs[label].append(run(model, length, a.new_tokens, extra))
                print(f"{case:<16} repeat {rep + 1}/{a.repeats} {label:<21} {runs[label][-1]['decode_tok_s']:7.1f} tok/s "
                      f"ttft {runs[label][-1]['ttft_s']:6.1f}s", flush=True)
        row = {"case": case, "options": options, "runs": runs}
        stock_decode = median(r["decode_tok_s"] for r in runs["stock"])
        stock_ttft = median(r["ttft_s"] for r in runs["stock"])
        for label in ("heterocache", "heterocache-norefill"):
            decode = median(r["decode_tok_s"] for r in runs[label])
            ttft = median(r["ttft_s"] for r in runs[label])
            row[label] = {"decode_ratio": decode / stock_decode, "ttft_ratio": ttft / stock_ttft}
            print(f"{case:<16} medians of {a.repeats}: stock {stock_decode:7.1f} tok/s ttft {stock_ttft:6.1f}s | {label} "
                  f"{decode:7.1f} tok/s ttft {ttft:6.1f}s | decode ratio {decode / stock_decode:.2f}x, "
                  f"ttft ratio {ttft / stock_ttft:.2f}x", flush=True)
        f = kept_fraction(profile, options, length)
        parts = {label: breakdown(runs[label]) for label in runs}
        for label, ms in parts.items():
            print(f"{case:<16} {label:<21} ms per decode step: " + ", ".join(f"{k} {ms[k]:.2f}" for k in PARTS)
                  + f" (wall {1e3 / median(r['decode_tok_s'] for r in runs[label]):.2f})", flush=True)
        # Limits: stock's step with its attention A replaced by reading the kept fraction f of the
        # KV, at stock's bytes/s, or at the bytes/s of HeteroCache's own attention in this run.
        step = 1e3 / stock_decode
        attention = parts["stock"]["attention"]
        limit = step / (step - attention + f * attention)
        ours = parts["heterocache"]["attention"]  # reads f of the KV (+ the same cache writes)
        limit_ours = step / (step - attention + ours)
        measured = row["heterocache"]["decode_ratio"]
        row["bound"] = {"step_ms": step, "attention_ms": attention, "kept_fraction": f, "best_ratio": limit,
                        "best_ratio_our_kernel": limit_ours, "fraction_of_limit": measured / limit,
                        "breakdown_ms": parts}
        print(f"{case:<16} stock step {step:.2f} ms, attention {attention:.2f} ms; KV kept {f:.3f} -> limit at "
              f"stock's bytes/s {limit:.2f}x, at our kernel's bytes/s ({attention * f / ours if ours else 0:.2f} of "
              f"stock's per byte) {limit_ours:.2f}x; measured {measured:.2f}x = {measured / limit:.2f} of the limit",
              flush=True)
        rows.append(row)
    if a.out:
        a.out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
