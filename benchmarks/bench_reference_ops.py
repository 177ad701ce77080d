"""Time the PyTorch reference ops against dense attention (torch SDPA) in the same run.

    python benchmarks/bench_reference_ops.py [--context 8192] [--batch 4] [--repeat 5]

Prints milliseconds per call and the ratio to dense decode attention over the same K/V. This is
the baseline the compiled kernels of csrc/ have to beat; the references are written for clarity.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from vllm_heterocache.ops import reference as ref


def timed(fn, repeat: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--context", type=int, default=8192)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--q-heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--keep", type=float, default=0.25, help="fraction of tokens each head attends to")
    p.add_argument("--repeat", type=int, default=5)
    a = p.parse_args()
    torch.manual_seed(0)
    b, t, hq, hkv, d = a.batch, a.context, a.q_heads, a.kv_heads, a.head_dim
    q = torch.randn(b, hq, d)
    k, v = torch.randn(b, t, hkv, d), torch.randn(b, t, hkv, d)
    s = max(1, int(t * a.keep))
    idx = torch.stack([torch.randperm(t)[:s].sort().values for _ in range(b * hkv)]).reshape(b, hkv, s)

    def dense():
        kk = k.repeat_interleave(hq // hkv, 2).transpose(1, 2)
        vv = v.repeat_interleave(hq // hkv, 2).transpose(1, 2)
        F.scaled_dot_product_attention(q[:, :, None], kk, vv)

    rows = [("dense decode attention (SDPA)", timed(dense, a.repeat))]
    rows.append((f"subset_attention, {a.keep:.0%} kept", timed(lambda: ref.subset_attention(q, k, v, idx), a.repeat)))
    window = torch.randn(32, hq, d)
    rows.append(("prefill_scores, 32 queries", timed(lambda: ref.prefill_scores(window, k[0]), a.repeat)))
    queries, keys = torch.randn(b * hkv, 5, hq // hkv, d), k.permute(0, 2, 1, 3).reshape(b * hkv, t, d)
    lens = torch.full((b * hkv,), t)
    topk = torch.full((b * hkv,), s)
    refset = idx.reshape(b * hkv, s)
    rows.append(("drift_check, 5 steps", timed(lambda: ref.drift_check(queries, keys, lens, lens, refset, topk, 0.5), a.repeat)))
    base = rows[0][1]
    print(f"context {t}, batch {b}, {hq} q / {hkv} kv heads, head_dim {d}, torch threads {torch.get_num_threads()}")
    for name, ms in rows:
        print(f"{name:<36} {ms:9.2f} ms   {ms / base:6.2f}x dense")


if __name__ == "__main__":
    main()
