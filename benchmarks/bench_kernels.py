"""Gather-attention kernel throughput against the machine's memory bandwidth, same run.

    python benchmarks/bench_kernels.py [--tokens 32768] [--heads 8] [--group 4] [--head-size 64] [--device cuda]

Bandwidth: the best of several large copies (read + write bytes / s). Kernel: one decode step
of ``--heads`` single-head caches of ``--tokens`` tokens each (fp32 and bf16, blocks in scrambled
order, vLLM's AVX2 layout), timed over repeats; achieved GB/s = K and V bytes the items must read
/ time. Also the PyTorch reference path on the same work, for scale.

Fronts read in place (``--selected F``, default 0.18, ``--run-length R``, default 9.5: what
SmolLM2's prefill selections at ratio 0.5 of an 8K prompt look like): each head attends a
selection of F of the positions, in runs of R consecutive positions on average, given as a
position list, as a selection that points into shared prompt blocks after a prefix-cache hit is
read (``vllm_heterocache/placement.py``), against the same number of positions read as one
contiguous range (a selection copied into a request's own blocks); in vLLM's layout and in the
compressed pools' (K token-major, ``vllm_adapter.block_layout``).

Shared document (``--requests N``, default 16): N requests whose heads each read their own
selection of one document in place, in one call, as the decode steps of ``bench_serve.py
--preset document`` do. With ``--documents P`` request i reads document i % P, and with
``--layers M`` each of M layers has its own caches and a call of its own, one after another, as
a decode step runs them: ``--tokens 3328 --heads 2 --selected 0.5 --run-length 3 --documents 4
--layers 4`` is the tiny model's decode step of ``bench_serve.py --preset shared``, whose 54 MB
of prefix KV the CPU's last-level cache does not hold.
"""

from __future__ import annotations

import argparse

import torch

from bench_reference_ops import timed

from vllm_heterocache.ops import kernels
from vllm_heterocache.ops.paged import BlockLayout


def best_time(fn, repeats: int, device: str = "cpu") -> float:
    """Best of ``repeats`` runs after a warm-up, in seconds (CUDA: synchronized)."""
    if device == "cuda":
        return timed(lambda: (fn(), torch.cuda.synchronize()), repeats) / 1e3
    return timed(fn, repeats) / 1e3


def selection(n: int, k: int, run_length: float, seed: int) -> torch.Tensor:
    """``k`` sorted positions of ``0 .. n - 1`` in runs of ``run_length`` on average, at random places."""
    g = torch.Generator().manual_seed(seed)
    starts = torch.randperm(n, generator=g)[: max(1, int(k / run_length))]
    lengths = torch.distributions.Geometric(probs=torch.tensor(1 / run_length)).sample((starts.numel(),)) + 1
    chosen = torch.zeros(n, dtype=torch.bool)
    for s, l in zip(starts.tolist(), lengths.long().tolist()):
        chosen[s : s + l] = True
    picked = torch.nonzero(chosen)[:, 0]
    extra = torch.nonzero(~chosen)[:, 0][torch.randperm(int((~chosen).sum()), generator=g)][: max(0, k - picked.numel())]
    return torch.cat([picked[:k], extra]).sort().values


def copy_bandwidth(device: str, nbytes: int = 1 << 30) -> float:
    src = torch.ones(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    return 2 * nbytes / best_time(lambda: dst.copy_(src), 5, device)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=32768)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--group", type=int, default=4)
    p.add_argument("--head-size", type=int, default=64)
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--selected", type=float, default=0.18, help="fraction selected for the position-list fronts")
    p.add_argument("--run-length", type=float, default=9.5, help="mean length of the selected runs")
    p.add_argument("--requests", type=int, default=16, help="requests reading one document (the last line)")
    p.add_argument("--documents", type=int, default=1, help="documents the requests read (the last line)")
    p.add_argument("--layers", type=int, default=1, help="layers of caches, one call each (the last line)")
    a = p.parse_args()
    dev = a.device
    print(f"kernels: {kernels.describe()}; threads {torch.get_num_threads()}; device {dev}")
    bw = copy_bandwidth(dev)
    print(f"memory bandwidth (1 GiB copy, read + write): {bw / 1e9:.1f} GB/s")
    n, d, bs = a.tokens, a.head_size, a.block_size
    nb = -(-n // bs)
    for dtype in (torch.float32, torch.bfloat16):
        caches = [torch.randn(nb, 1, bs, 2 * d).to(dtype).to(dev) for _ in range(a.heads)]
        tables = [torch.randperm(nb).int()[None].to(dev) for _ in range(a.heads)]
        q = torch.randn(1, a.heads * a.group, d).to(dtype).to(dev)
        out = torch.empty_like(q)
        work = torch.tensor([[0, h, 0, n, n, n, 0, -1] for h in range(a.heads)], dtype=torch.int64, device=dev)
        nbytes = a.heads * n * 2 * d * caches[0].element_size()
        layout = BlockLayout.for_kernels(bs, d, True)  # vLLM's AVX2 layout
        t = best_time(lambda: kernels.gather_attention(q, out, caches, tables, work, layout, d**-0.5), a.repeats, dev)
        line = (f"{str(dtype):<15} {a.heads} heads x {n} tokens: kernel {t * 1e3:7.2f} ms, {nbytes / t / 1e9:6.1f} GB/s "
                f"({nbytes / t / bw:.2f} of copy bandwidth)")
        if dtype == torch.float32 and dev == "cpu":
            ref = torch.empty_like(q)
            tr = best_time(lambda: kernels.gather_attention_reference(q, ref, caches, tables, work, layout, d**-0.5), 2)
            line += f"; PyTorch reference {tr * 1e3:.1f} ms"
            torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
        print(line, flush=True)
        # the same heads attending a selection: read in place by a position list, or copied (one
        # range), in vLLM's layout (K transposed) and in the compressed pools' (K token-major)
        k = max(1, int(a.selected * n))
        fronts = torch.cat([selection(n, k, a.run_length, seed=h) for h in range(a.heads)]).int().to(dev)
        listed = torch.tensor([[0, h, 0, k, n, n, 0, h * k] for h in range(a.heads)], dtype=torch.int64, device=dev)
        ranged = torch.tensor([[0, h, 0, k, n, n, 0, -1] for h in range(a.heads)], dtype=torch.int64, device=dev)
        sel_bytes = a.heads * k * 2 * d * caches[0].element_size()
        runs = float((torch.diff(fronts.long()) != 1).sum() + 1) / a.heads
        for name, order in (("vLLM's layout (K transposed)", True), ("compressed pools' (K token-major)", False)):
            lay = BlockLayout.for_kernels(bs, d, order)
            t_list = best_time(lambda: kernels.gather_attention(q, out, caches, tables, listed, lay, d**-0.5, fronts),
                               a.repeats, dev)
            t_range = best_time(lambda: kernels.gather_attention(q, out, caches, tables, ranged, lay, d**-0.5),
                                a.repeats, dev)
            t_all = best_time(lambda: kernels.gather_attention(q, out, caches, tables, work, lay, d**-0.5),
                              a.repeats, dev)
            print(f"{'':<15} {a.selected:.2f} selected ({k} positions, runs of {k / runs:.1f} on average), {name}: "
                  f"in place {t_list * 1e3:7.2f} ms ({sel_bytes / t_list / 1e9:5.1f} GB/s of selected K and V), "
                  f"copied {t_range * 1e3:7.2f} ms ({sel_bytes / t_range / 1e9:5.1f} GB/s); in place / copied "
                  f"{t_list / t_range:.2f}x; whole cache {t_all * 1e3:7.2f} ms, / in place {t_all / t_list:.2f}x",
                  flush=True)
    shared_document(a)


def shared_document(a) -> None:
    """``--requests`` requests that each read their own selection of one of ``--documents``
    documents in place, one call per layer of ``--layers`` (the decode step of ``bench_serve.py
    --preset document``, or of ``--preset shared`` with several): every request's block table is
    its document's, each head's selections differ per request; float32, K token-major."""
    n, d, bs, dev = a.tokens, a.head_size, a.block_size, a.device
    nb, r, k, docs = -(-n // bs), a.requests, max(1, int(a.selected * n)), a.documents
    layers = [[torch.randn(docs * nb, 1, bs, 2 * d, device=dev) for _ in range(a.heads)] for _ in range(a.layers)]
    # per head, document j's blocks are a scrambled j-th share of the cache; request i reads document i % docs
    tables = [torch.randperm(docs * nb).int().view(docs, nb)[torch.arange(r) % docs].contiguous().to(dev)
              for _ in range(a.heads)]
    fronts = torch.cat([selection(n, k, a.run_length, seed=1000 * i + h) for i in range(r) for h in range(a.heads)])
    fronts = fronts.int().to(dev)
    work = torch.tensor([[i, h, i, k, n, n, 0, (i * a.heads + h) * k] for i in range(r) for h in range(a.heads)],
                        dtype=torch.int64, device=dev)
    q = torch.randn(r, a.heads * a.group, d, device=dev)
    out = torch.empty_like(q)
    lay = BlockLayout.for_kernels(bs, d, False)

    def step() -> None:
        for caches in layers:
            kernels.gather_attention(q, out, caches, tables, work, lay, d**-0.5, fronts)

    t = best_time(step, a.repeats, dev)
    where = f"one {n}-token document" if docs == 1 else f"{docs} documents of {n} tokens"
    per_layer = f" in each of {a.layers} layers (a call each)" if a.layers > 1 else ""
    print(f"shared document: {r} requests x {a.heads} heads, each its own {a.selected:.2f} of {where}{per_layer} "
          f"read in place (float32, K token-major): {t * 1e3:.2f} ms, "
          f"{t / (a.layers * r * a.heads * k) * 1e9:.1f} ns per listed position", flush=True)


if __name__ == "__main__":
    main()
