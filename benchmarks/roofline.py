"""PREDICTION, not a measurement: HeteroCache's decode speed-up over vLLM's stock attention
backend on one GPU, from a memory-bandwidth roofline ("GPU on paper").

    python benchmarks/roofline.py --gpu h200 [--profile profiles/Llama-3.1-8B-Instruct.json]
        [--ratios 0.25,0.5] [--contexts 32768,131072] [--batches 1,16] [--generated 512]
        [--efficiency 0.8] [--bandwidth-tbs X] [--drift-rate 0.2] [--host-link-gbs 64] [--json PATH]

A decode step is taken to be bound by HBM traffic: time = bytes / (peak bandwidth x efficiency).
- Weights (bf16): every parameter once per step, except the input embedding table, of which only
  the batch's rows are gathered (a tied table is read whole anyway, as the lm_head).
- Stock KV: K and V (2 x head_dim x 2 bytes) of every KV head for all L + g tokens (L prompt
  tokens, g generated so far).
- HeteroCache KV: full heads (volatile, pivot) read L + g tokens, compressed heads (anchor,
  satellite) their prompt budget + g. Budgets are the product's own (``Budgeter.budgets``).
- Drift checks (only when refills are on, as in the backend): every ``drift_interval`` steps each
  pivot re-reads its L + g keys (K only).
- Refills: when a pivot drifts (probability ``--drift-rate`` per pivot and check: an ASSUMPTION)
  each of its satellites gets budget - window slots (K and V) copied from the host tier over the
  host link (and written to HBM). The backend waits for a layer's copies when it next reads that
  layer, one step later, so "overlapped" lets a check's copies hide behind one step, and
  "serialized" adds them to the step. All sequences are taken to check in the same step.
g is the mean over a generation of ``--generated`` tokens: time is linear in g, so this is the
mean step. Left out: activations, logits, compute, launch and scheduling overheads, prefill.
Real kernels stay below the roofline (HeteroCache's CUDA gather kernels have not run yet);
a measured run (benchmarks/bench_decode_speed.py on a GPU) supersedes these numbers.
Capacity: the KV that must fit at the end of the generation; HeteroCache's compressed pools keep
each budget class's largest budget, and a prompt being prefilled holds every token of every head
(the prefill peak is not reduced), so HeteroCache's peak is (B - 1) decoding + 1 whole prompt.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from vllm_heterocache.budget import Budgeter
from vllm_heterocache.config import HeteroCacheConfig
from vllm_heterocache.head_profile.fingerprint import canonical_config, config_hash
from vllm_heterocache.head_profile.importer import KNOWN_MODELS
from vllm_heterocache.head_profile.schema import HeadProfile, load_profile

ROOT = Path(__file__).resolve().parent.parent

PREDICTION = "PREDICTION from a memory-bandwidth roofline, not a measurement"
GiB, GB = 1024**3, 1e9
# Datasheet peaks (NVIDIA H200 / H100 SXM). Memory: the marketed size and what nvidia-smi reports.
# Host link: PCIe Gen5 x16, ~64 GB/s per direction theoretical: an ASSUMPTION (pinned copies reach less).
GPUS = {
    "h200": {"name": "NVIDIA H200 SXM (141 GB HBM3e)", "hbm_tbs": 4.8, "memory_bytes": 143771 * 2**20, "link_gbs": 64.0},
    "h100": {"name": "NVIDIA H100 SXM (80 GB HBM3)", "hbm_tbs": 3.35, "memory_bytes": 81559 * 2**20, "link_gbs": 64.0},
}
# Model constants: architecture fields from importer.KNOWN_MODELS (the models' published
# config.json), plus the two fields it leaves out, from the same files on huggingface.co.
MODELS = {
    name: {"config": canonical_config(cfg), "tie_word_embeddings": False, "qkv_bias": cfg["model_type"] == "qwen2",
           "source": f"https://huggingface.co/{name}/blob/main/config.json"}
    for name, cfg in KNOWN_MODELS.items()
}


def weight_counts(profile: HeadProfile) -> tuple[int, int]:
    """(parameters, parameters read per decode step) of the profile's model (Llama/Qwen2 layout)."""
    m = MODELS.get(profile.model.name)
    if m is None:
        raise SystemExit(f"no model constants for {profile.model.name!r}; known: {', '.join(MODELS)}")
    c = m["config"]
    if config_hash(c) != profile.model.config_hash:
        raise SystemExit(f"profile {profile.source}: its model config differs from {m['source']}")
    h, d = c["hidden_size"], c["head_dim"]
    q, kv = c["num_attention_heads"] * d, c["num_key_value_heads"] * d
    attn = h * q + 2 * h * kv + q * h + ((q + 2 * kv) if m["qkv_bias"] else 0)  # q, k, v, o (+ biases)
    layer = attn + 3 * h * c["intermediate_size"] + 2 * h  # gated MLP, two RMSNorms
    embed = c["vocab_size"] * h
    total = c["num_hidden_layers"] * layer + h + embed * (1 if m["tie_word_embeddings"] else 2)
    return total, total - (0 if m["tie_word_embeddings"] else embed)


def predict(profile: HeadProfile, config: HeteroCacheConfig, context: int, batch: int, *, hbm_tbs: float,
            efficiency: float, link_gbs: float, memory_bytes: float, generated: int = 512,
            drift_rate: float = 0.2, mem_util: float = 0.9, dtype_bytes: int = 2) -> dict:
    """One case's predicted step times (ms), speed-ups and KV footprints (bytes)."""
    budgeter = Budgeter(profile, config)
    plan = budgeter.budgets(context)
    fp = profile.model
    heads, tok = fp.num_layers * fp.num_kv_heads, 2 * fp.head_dim * dtype_bytes  # bytes per token and head
    L, g, B, G = context, (generated - 1) / 2, batch, generated
    params, read_params = weight_counts(profile)
    weights, weights_read = params * dtype_bytes, read_params * dtype_bytes
    compresses = not budgeter.keep_all and not bool(plan.full.all())  # else the backend is the stock one
    checks = compresses and config.refill
    hc_tokens = int(plan.per_head.sum()) + heads * g if compresses else heads * (L + g)
    stock_kv, hc_kv = B * heads * (L + g) * tok, B * hc_tokens * tok
    n_pivots = profile.counts()["pivot"]
    check_bytes = B * n_pivots * (L + g) * fp.head_dim * dtype_bytes if checks else 0.0  # per check
    slots = sum(int(plan.per_head[c.layer, s]) - plan.window for c in profile.clusters for s in c.satellites)
    refill_bytes = B * drift_rate * slots * tok if checks else 0.0  # per check, over the host link
    N, hbm, link = config.drift_interval, hbm_tbs * 1e12 * efficiency, link_gbs * 1e9 * efficiency
    t_stock = (weights_read + stock_kv) / hbm
    t_hc = (weights_read + hc_kv + (check_bytes + refill_bytes) / N) / hbm
    t_link = refill_bytes / link  # one check's copies
    t_ovl, t_ser = t_hc + max(0.0, t_link - t_hc) / N, t_hc + t_link / N
    # capacity at the end of the generation (L + G tokens)
    stock_seq = heads * (L + G) * tok
    if compresses:
        caps, class_of = budgeter.capacity_classes(config.budget_classes)
        comp = sum(caps[c].max_budget(L) + G for c in class_of.values())
        hc_seq = ((heads - len(class_of)) * (L + G) + comp) * tok
        hc_peak = max(B * hc_seq, (B - 1) * hc_seq + heads * L * tok)
    else:
        hc_seq, hc_peak = stock_seq, B * stock_seq
    n_sat = profile.counts()["satellite"]
    usable = mem_util * memory_bytes
    return {
        "ratio": config.compression_ratio, "kept_fraction": plan.kept_fraction(), "batch": B, "context": L,
        "stock_ms": t_stock * 1e3, "hc_overlapped_ms": t_ovl * 1e3, "hc_serialized_ms": t_ser * 1e3,
        "speedup_overlapped": t_stock / t_ovl, "speedup_serialized": t_stock / t_ser,
        "stock_tok_s": B / t_stock, "hc_overlapped_tok_s": B / t_ovl, "hc_serialized_tok_s": B / t_ser,
        "weight_bytes": weights, "weight_bytes_read_per_step": weights_read,
        "stock_kv_read_bytes": stock_kv, "hc_kv_read_bytes": hc_kv, "drift_check_bytes_per_check": check_bytes,
        "refill_bytes_per_check": refill_bytes, "stock_kv_bytes": B * stock_seq, "hc_kv_decode_bytes": B * hc_seq,
        "hc_kv_peak_bytes": hc_peak, "host_tier_bytes": B * n_sat * L * tok if checks else 0,
        "usable_gpu_bytes": usable, "stock_fits": weights + B * stock_seq <= usable,
        "hc_fits": weights + hc_peak <= usable,
    }


def _ints(s: str) -> list[int]:
    return [int(float(x[:-1]) * 1024) if x.lower().endswith("k") else int(x) for x in s.split(",")]


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpu", choices=sorted(GPUS), default="h200")
    p.add_argument("--bandwidth-tbs", type=float, help="HBM peak, TB/s (default: the GPU's datasheet value)")
    p.add_argument("--efficiency", type=float, default=0.8, help="fraction of peak reached: HBM (both backends) and host link")
    p.add_argument("--host-link-gbs", type=float, help="host link peak, GB/s (assumption; default PCIe Gen5 x16, 64)")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9, help="vLLM's default 0.9")
    p.add_argument("--profile", default=str(ROOT / "profiles" / "Llama-3.1-8B-Instruct.json"))
    p.add_argument("--ratios", default="0.25,0.5", help="compression ratios (fraction of the KV kept)")
    p.add_argument("--contexts", default="32k,128k", help="prompt lengths (tokens; 32k = 32768)")
    p.add_argument("--batches", default="1,16")
    p.add_argument("--generated", type=int, default=512, help="tokens generated per request")
    # ASSUMPTION: fraction of checks in which a pivot drifts. Measured: the engine's `heterocache stats`
    # line, drifts / (drift checks x pivots per layer with pivots; Llama-3.1-8B: 33 in 32 layers).
    p.add_argument("--drift-rate", type=float, default=0.2, help="P(pivot drifts) per check (assumption)")
    p.add_argument("--no-refill", action="store_true", help="refill=False: no drift checks, no refills")
    p.add_argument("--json", help="write the assumptions and numbers to this path")
    a = p.parse_args(argv)
    gpu = dict(GPUS[a.gpu])
    gpu["hbm_tbs"] = a.bandwidth_tbs or gpu["hbm_tbs"]
    gpu["link_gbs"] = a.host_link_gbs or gpu["link_gbs"]
    profile = load_profile(a.profile)
    params, read = weight_counts(profile)
    counts = profile.counts()
    interval = HeteroCacheConfig().drift_interval
    print(f"{PREDICTION}.\n{profile.model.name} on {gpu['name']}")
    print(f"assumed HBM {gpu['hbm_tbs']:.2f} TB/s x efficiency {a.efficiency:.2f} = {gpu['hbm_tbs'] * a.efficiency:.2f} TB/s; "
          f"host link {gpu['link_gbs']:.0f} GB/s x {a.efficiency:.2f} (assumption); usable memory "
          f"{a.gpu_memory_utilization:.2f} x {gpu['memory_bytes'] / GiB:.1f} GiB")
    print(f"weights {params / 1e9:.2f} B params = {params * 2 / GB:.2f} GB bf16 ({params * 2 / GiB:.2f} GiB); read per step "
          f"{read * 2 / GB:.2f} GB (input embedding table only gathered)")
    print(f"profile {Path(a.profile).name}: " + ", ".join(f"{n} {t}" for t, n in counts.items())
          + f"; drift check every {interval} steps; drift rate {a.drift_rate} per pivot and check (ASSUMPTION); "
          f"refills {'OFF' if a.no_refill else 'on'}; {a.generated} tokens generated")
    head = (f"{'ratio':>5} {'kept':>5} {'batch':>5} {'context':>7} | {'stock ms':>8} {'HC ms ovl':>9} {'HC ms ser':>9} | "
            f"{'x ovl':>5} {'x ser':>5} | {'stock KV':>8} {'HC KV':>7} {'HC peak':>7} {'host':>6} | fits stock/HC")
    print(head + "\n" + "-" * len(head))
    rows = []
    for r in [float(x) for x in a.ratios.split(",")]:
        cfg = HeteroCacheConfig(compression_ratio=r, refill=not a.no_refill)
        for b in _ints(a.batches):
            for L in _ints(a.contexts):
                row = predict(profile, cfg, L, b, hbm_tbs=gpu["hbm_tbs"], efficiency=a.efficiency, link_gbs=gpu["link_gbs"],
                              memory_bytes=gpu["memory_bytes"], generated=a.generated, drift_rate=a.drift_rate,
                              mem_util=a.gpu_memory_utilization)
                rows.append(row)
                yn = {True: "yes", False: "NO"}
                print(f"{r:>5.2f} {row['kept_fraction']:>5.3f} {b:>5} {L // 1024:>6}K | {row['stock_ms']:>8.2f} "
                      f"{row['hc_overlapped_ms']:>9.2f} {row['hc_serialized_ms']:>9.2f} | {row['speedup_overlapped']:>5.2f} "
                      f"{row['speedup_serialized']:>5.2f} | {row['stock_kv_bytes'] / GiB:>8.1f} {row['hc_kv_decode_bytes'] / GiB:>7.1f} "
                      f"{row['hc_kv_peak_bytes'] / GiB:>7.1f} {row['host_tier_bytes'] / GiB:>6.1f} | "
                      f"{yn[row['stock_fits']]}/{yn[row['hc_fits']]}")
    print("ms: mean decode step; x: predicted speed-up (stock ms / HC ms); ovl: refills overlapped (async, off the "
          "critical path), ser: refills serialized.\nKV columns: GiB that must fit on the GPU at the end of the "
          "generation (HC peak: one prompt prefilling holds all its tokens); host: GiB of host tier (satellites' prompts).")
    for row in rows:
        if not row["stock_fits"]:
            fit = "fits" if row["hc_fits"] else "does not fit either"
            print(f"- batch {row['batch']} at {row['context'] // 1024}K: stock needs {row['stock_kv_bytes'] / GiB:.0f} GiB of KV "
                  f"+ weights > {row['usable_gpu_bytes'] / GiB:.0f} GiB usable: does not fit on one GPU (its ms is "
                  f"hypothetical); HeteroCache r={row['ratio']} needs {row['hc_kv_peak_bytes'] / GiB:.0f} GiB: {fit}")
    if a.json:
        Path(a.json).write_text(json.dumps({
            "note": PREDICTION, "gpu": gpu, "efficiency": a.efficiency, "profile": a.profile, "model": profile.model.name,
            "model_source": MODELS[profile.model.name]["source"], "params": params, "drift_rate_assumed": a.drift_rate,
            "drift_interval": interval, "generated": a.generated, "rows": rows}, indent=2) + "\n")
    return rows


if __name__ == "__main__":
    main()
