"""Compiled kernels against their references (csrc/, vllm_heterocache/ops/kernels.py).

Tolerance rule (shared/STYLE.md): against a float32 reference, the kernel's error must be at
most a small multiple of the error of the same computation done by PyTorch in the kernel's dtype.
"""

import pytest
import torch

from vllm_heterocache.ops import kernels
from vllm_heterocache.ops import reference as ref
from vllm_heterocache.ops.paged import BlockLayout, read_positions

# Every test that compares a kernel with its reference carries this mark: without the extension,
# kernels.gather_attention / drift_check / refill_copy ARE the references, and such a test would
# compare the reference with itself. Tests of the references against independent oracles (dense
# attention, dense keys, hand-computed cache addresses) run either way.
needs_kernels = pytest.mark.skipif(
    not kernels.HAVE_KERNELS,
    reason=f"extension vllm_heterocache._C not built, so the kernel would be compared with itself: "
           f"{kernels.describe()}")
# every kernel test runs on the CPU and, where a GPU and the CUDA kernels are there, on CUDA
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not (torch.cuda.is_available() and kernels.has_cuda_kernels()),
    reason="needs a CUDA GPU and the extension built with its CUDA kernels (setup.py)")])]
ON_DEVICES = pytest.mark.parametrize("device", DEVICES)
IN_DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
IN_LAYOUTS = pytest.mark.parametrize("k_transposed", [True, False], ids=["k-transposed", "k-token-major"])


def layout_of(k_transposed: bool, bs: int, d: int) -> BlockLayout:
    """The block layout the compiled kernels read with ``k_transposed``."""
    return BlockLayout.for_kernels(bs, d, k_transposed)


def on(device, *tensors):
    """The tensors (or lists of tensors) moved to ``device``."""
    return [[x.to(device) for x in t] if isinstance(t, list) else t.to(device) for t in tensors]


def work_items(items, lists=()) -> tuple[list[list[int]], torch.Tensor]:
    """Items of 6 columns (front at position 0), 7 (with front_start) or 8 (the last the index of
    the item's front in ``lists``, or -1) as the kernels' 8 columns (the last an offset into the
    flat front positions), and those positions (int32)."""
    offsets = [sum(len(l) for l in lists[:i]) for i in range(len(lists))]
    out = []
    for item in items:
        item = list(item) + [0, -1][len(item) - 6:]
        if item[7] >= 0:
            item[7] = offsets[item[7]]
        out.append(item)
    return out, torch.tensor([p for l in lists for p in l], dtype=torch.int32)


def make_case(g, hkv, d, bs, items, dtype, k_transposed, pad=0, seed=0, lists=()):
    """Random single-head caches holding dense K/V ``[rows, L, hkv, D]`` in scrambled blocks;
    ``lists``: the front position lists the items' eighth column indexes."""
    gen = torch.Generator().manual_seed(seed)
    items, fronts = work_items(items, lists)
    rows = 1 + max(i[2] for i in items)
    length = max(max(i[5], i[6] + i[3]) for i in items) + 1
    length = max([length] + [max(l) + 1 for l in lists if l])
    nblk = -(-length // bs)
    nb = rows * nblk + 3
    k = torch.randn(rows, nblk * bs, hkv, d, generator=gen)
    v = torch.randn(rows, nblk * bs, hkv, d, generator=gen)
    caches, tables = [], []
    for h in range(hkv):
        page = bs * 2 * d
        flat = torch.zeros(nb, page + pad, dtype=dtype)
        cache = flat.as_strided((nb, 1, bs, 2 * d), (page + pad, page, 2 * d, 1))
        table = torch.randperm(nb, generator=gen)[: rows * nblk].view(rows, nblk).int()
        for r in range(rows):
            for b in range(nblk):
                kb = k[r, b * bs : (b + 1) * bs, h]  # [bs, D]
                vb = v[r, b * bs : (b + 1) * bs, h]
                region = flat[int(table[r, b]), :page]
                region[: bs * d] = (kb.t() if k_transposed else kb).reshape(-1).to(dtype)
                region[bs * d :] = vb.reshape(-1).to(dtype)
        caches.append(cache)
        tables.append(table)
    t = 1 + max(i[0] for i in items)
    q = torch.randn(t, hkv * g, d, generator=gen)
    return q, k, v, caches, tables, torch.tensor(items, dtype=torch.int64), fronts


def dense_reference(q, k, v, items, g, scale, dtype=torch.float32, fronts=None):
    """Each item's attention computed densely in ``dtype`` (float32 for the oracle)."""
    out = torch.zeros(q.shape, dtype=dtype)
    for t, h, row, n_front, gen_start, gen_end, front_start, front_list in items.tolist():
        front = (torch.arange(front_start, front_start + n_front) if front_list < 0
                 else fronts[front_list : front_list + n_front].long())
        pos = torch.cat([front, torch.arange(gen_start, gen_end)])
        if pos.numel() == 0:
            continue
        qq = q[t, h * g : (h + 1) * g].to(dtype)
        kk, vv = k[row, pos, h].to(dtype), v[row, pos, h].to(dtype)
        p = ((qq @ kk.t()).float() * scale).softmax(-1).to(dtype)
        out[t, h * g : (h + 1) * g] = p @ vv
    return out


CASES = {
    # name: (G, Hkv, D, block_size, items)
    "gqa1-d64-odd-lengths": (1, 2, 64, 16, [[0, 0, 0, 37, 50, 53], [0, 1, 1, 5, 40, 41]]),
    "gqa3-d128": (3, 2, 128, 32, [[0, 0, 0, 70, 100, 133], [1, 1, 0, 33, 33, 97]]),
    "gqa4-d64-scrambled": (4, 3, 64, 16, [[0, 2, 1, 16, 64, 65], [1, 0, 0, 48, 48, 48], [2, 1, 2, 1, 90, 90]]),
    "gqa8-d128-long": (8, 1, 128, 64, [[0, 0, 0, 300, 512, 777]]),
    "empty-and-single-token": (4, 2, 64, 16, [[0, 0, 0, 0, 20, 20], [0, 1, 0, 1, 20, 20], [1, 1, 0, 0, 19, 20]]),
    # a long item is cut into several tasks; here a cut falls inside the front range and a task
    # spans both ranges; G = 16 runs the value accumulation in two groups of 8
    "gqa16-split-across-ranges": (16, 1, 64, 16, [[0, 0, 0, 150, 200, 300]]),
    # full-head style items (all positions as one range) of several tasks each, next to a short one
    "gqa4-many-tasks": (4, 2, 64, 16, [[0, 0, 0, 0, 0, 1000], [0, 1, 1, 500, 600, 900], [1, 1, 0, 3, 3, 4]]),
    # a head size that is not a multiple of the widest value slice (32): its tail runs 8 wide
    "gqa2-d80": (2, 1, 80, 16, [[0, 0, 0, 20, 30, 41]]),
    # blocks wide enough for the widest logit tiles of one and two query heads (64 and 32 tokens
    # of transposed K), with ranges that start and end inside blocks (narrower tiles, scalar tail)
    "gqa1-bs128-wide-tiles": (1, 2, 64, 128, [[0, 0, 0, 200, 300, 333], [0, 1, 0, 0, 5, 262]]),
    "gqa2-bs64-wide-tiles": (2, 1, 64, 64, [[0, 0, 0, 70, 100, 190]]),
    # fronts that start away from position 0 (a compressed head's selection after its prompt,
    # runtime/placement): inside a block, at a block boundary, and next to a front at 0
    "gqa4-front-start": (4, 2, 64, 16, [[0, 0, 0, 37, 200, 230, 101], [0, 1, 1, 20, 96, 97, 48],
                                        [1, 1, 0, 10, 10, 12, 0]]),
    "gqa1-bs128-front-start-long": (1, 1, 64, 128, [[0, 0, 0, 700, 1000, 1100, 257]]),
    # fronts given as position lists (a selection that points into shared prompt blocks, then
    # its private slots): runs that cross block boundaries, single positions, a list cut by a
    # task boundary, and items with a list beside items with a range
    "gqa4-front-lists": (4, 2, 64, 16, [[0, 0, 0, 9, 100, 104, 0, 0], [0, 1, 1, 6, 60, 61, 0, 1],
                                        [1, 0, 0, 4, 20, 25, 0, -1]],
                         [[0, 1, 2, 14, 15, 16, 17, 40, 80], [3, 31, 32, 33, 34, 50]]),
    # refills rewrite a list's entries in place: not sorted, and a block's entries that span
    # exactly their count (10 .. 13 for 4 entries) without being consecutive
    "gqa4-front-list-unsorted": (4, 1, 64, 16, [[0, 0, 0, 6, 60, 62, 0, 0]], [[10, 14, 12, 13, 40, 3]]),
    "gqa1-bs128-front-list-long": (1, 1, 64, 128, [[0, 0, 0, 700, 2000, 2100, 0, 0]],
                                   [sorted(set(range(0, 1800, 2)) - set(range(200, 700, 2)) | set(range(300, 420)))
                                    [:700]]),
}


@IN_LAYOUTS
@pytest.mark.parametrize("name", list(CASES))
def test_reference_fallback_matches_dense(name, k_transposed):
    g, hkv, d, bs, items, *lists = CASES[name]
    q, k, v, caches, tables, work, fronts = make_case(g, hkv, d, bs, items, torch.float32, k_transposed, pad=8,
                                                      lists=lists[0] if lists else ())
    out = torch.full(q.shape, 9.0)
    kernels.gather_attention_reference(q, out, caches, tables, work, layout_of(k_transposed, bs, d), 0.1, fronts)
    want = dense_reference(q, k, v, work, g, 0.1, fronts=fronts)
    for t, h, *_ in items:
        torch.testing.assert_close(out[t, h * g : (h + 1) * g], want[t, h * g : (h + 1) * g], rtol=1e-5, atol=1e-5)


@needs_kernels
@ON_DEVICES
@IN_DTYPES
@IN_LAYOUTS
@pytest.mark.parametrize("name", list(CASES))
def test_gather_attention_kernel(name, k_transposed, dtype, device):
    g, hkv, d, bs, items, *lists = CASES[name]
    q, k, v, caches, tables, work, fronts = make_case(g, hkv, d, bs, items, dtype, k_transposed, pad=16,
                                                      lists=lists[0] if lists else ())
    q_in = q.to(dtype)
    out = torch.full(q.shape, 9.0, dtype=dtype, device=device)
    c, t, w, f = on(device, caches, tables, work, fronts)
    kernels.gather_attention(*on(device, q_in), out, c, t, w, layout_of(k_transposed, bs, d), 0.1, f)
    out = out.cpu()
    # oracle: float32 on the same (rounded) inputs; baseline: PyTorch in the kernel's dtype
    kq, vq = k.to(dtype).float(), v.to(dtype).float()
    want = dense_reference(q_in.float(), kq, vq, work, g, 0.1, fronts=fronts)
    torch_err = (dense_reference(q_in.float(), kq, vq, work, g, 0.1, dtype, fronts).float() - want).abs().max()
    touched = torch.zeros(q.shape[:2], dtype=torch.bool)
    for t, h, *_ in items:
        touched[t, h * g : (h + 1) * g] = True
    err = (out.float() - want)[touched].abs().max()
    assert err <= 2 * torch_err + 1e-5, (float(err), float(torch_err))
    assert torch.all(out[~touched] == 9.0)  # nothing else written


def test_describe_names_the_path():
    assert ("compiled" in kernels.describe()) == kernels.HAVE_KERNELS


DRIFT_CASES = {
    # name: (P, N, G, D, block_size, key_len, candidates, topk)
    "odd-length-gqa3": (3, 5, 3, 64, 16, 101, 90, 12),
    "gqa1-d128": (2, 5, 1, 128, 32, 64, 60, 60),
    "gqa4-even-steps": (2, 4, 4, 64, 16, 77, 70, 9),
    "gqa8-single-block": (1, 3, 8, 64, 128, 40, 33, 5),
    "gqa4-many-blocks": (1, 5, 4, 64, 16, 1000, 968, 200),
    "keys-fewer-than-pool-kernel": (2, 3, 2, 64, 16, 3, 3, 2),
    # a head size that is not a multiple of 8: the token-major logit tiles add the last D % 8
    # products one at a time
    "d36-head-size-tail": (2, 3, 2, 36, 16, 50, 45, 7),
}


def make_drift_case(name, dtype, k_transposed):
    """Paged caches of P pivots, their dense keys, queries and reference sets; even pivots' reference
    is their own latest top-K over the same query every step (so they do not drift)."""
    p, n, g, d, bs, key_len, cand, topk = DRIFT_CASES[name]
    items = [[0, h, 0, key_len, key_len, key_len] for h in range(p)]
    _, k, v, caches, tables, _, _ = make_case(1, p, d, bs, items, dtype, k_transposed, pad=8, seed=3)
    gen = torch.Generator().manual_seed(4)
    queries = torch.randn(p, n, g, d, generator=gen) * 2
    queries[::2] = queries[::2, :1].clone()  # even pivots: the same query every step
    # a reference set per pivot; even pivots: their own latest top-K (no drift)
    reference = torch.randint(0, cand, (p, topk), generator=gen).sort().values
    want0 = kernels.drift_check_reference(queries, caches, tables, 0, key_len, cand, reference, topk, 0.6, 5,
                                          layout_of(k_transposed, bs, d))
    reference[::2] = want0.latest_topk[::2]
    dense_keys = k[0, :key_len].transpose(0, 1).to(dtype).contiguous()  # [P, key_len, D], rounded as stored
    return queries, caches, tables, reference, dense_keys


@IN_DTYPES
@IN_LAYOUTS
@pytest.mark.parametrize("name", list(DRIFT_CASES))
def test_drift_check_reference_matches_dense_keys(name, k_transposed, dtype):
    """Oracle: ``reference.drift_check`` on the dense keys the paged caches were filled from."""
    p, n, g, d, bs, key_len, cand, topk = DRIFT_CASES[name]
    queries, caches, tables, reference, dense_keys = make_drift_case(name, dtype, k_transposed)
    got = kernels.drift_check_reference(queries, caches, tables, 0, key_len, cand, reference, topk, 0.6, 5,
                                        layout_of(k_transposed, bs, d))
    want = ref.drift_check(queries, dense_keys, torch.full((p,), key_len), torch.full((p,), cand), reference,
                           torch.full((p,), topk), 0.6, 5)
    for field in ("latest_scores", "latest_topk", "median_overlap", "drift"):
        assert torch.equal(getattr(got, field), getattr(want, field)), field
    assert not bool(got.drift[0]) and float(got.median_overlap[0]) == 1.0


@needs_kernels
@ON_DEVICES
@IN_DTYPES
@IN_LAYOUTS
@pytest.mark.parametrize("name", list(DRIFT_CASES))
def test_drift_check_kernel_matches_reference(name, k_transposed, dtype, device):
    """The reference reads the same (rounded) keys in float32, so results agree up to summation order."""
    p, n, g, d, bs, key_len, cand, topk = DRIFT_CASES[name]
    queries, caches, tables, reference, _ = make_drift_case(name, dtype, k_transposed)
    want = kernels.drift_check_reference(queries, caches, tables, 0, key_len, cand, reference, topk, 0.6, 5,
                                         layout_of(k_transposed, bs, d))
    got = kernels.drift_check(*on(device, queries, caches, tables), 0, key_len, cand, *on(device, reference), topk,
                              0.6, 5, layout_of(k_transposed, bs, d))
    got = type(got)(*(x.cpu() for x in got))
    torch.testing.assert_close(got.latest_scores, want.latest_scores, rtol=1e-4, atol=1e-6)
    assert torch.equal(got.latest_topk, want.latest_topk)
    torch.testing.assert_close(got.median_overlap, want.median_overlap)
    assert torch.equal(got.drift, want.drift)
    assert not bool(want.drift[0]) and float(want.median_overlap[0]) == 1.0


REFILL_CASES = {
    # name: (D, cache block size, host block size, counts per satellite, some slots left (-1))
    "d64-odd-counts": (64, 16, 8, [37, 5], False),
    "d128-one-satellite-empty": (128, 32, 16, [0, 70, 33], False),
    "d64-single-slot": (64, 16, 32, [1], False),
    "d64-slots-left-between": (64, 16, 8, [45, 20], True),
}
REFILL_NB, REFILL_PAD = 12, 8  # cache blocks per satellite, elements of padding between blocks


def refill_caches_of(flats, bs, d):
    """Single-head caches ``[nb, 1, bs, 2 * D]`` over flat ``[nb, page + pad]`` buffers."""
    page = bs * 2 * d
    return [f.as_strided((REFILL_NB, 1, bs, 2 * d), (page + REFILL_PAD, page, 2 * d, 1)) for f in flats]


def make_refill_case(name, dtype):
    """Host tier, request and satellites of a refill; ``before`` are the satellites' flat buffers."""
    d, bs, hbs, counts, holes = REFILL_CASES[name]
    gen = torch.Generator().manual_seed(5)
    prompt, rows, s = 150, 4, len(counts)
    storage = torch.randn(40, rows, hbs, 2, d, generator=gen).to(dtype)
    host_blocks = torch.randperm(40, generator=gen)[: -(-prompt // hbs)]
    host_rows = torch.randperm(rows, generator=gen)[:s]
    width = max(counts)
    positions = torch.full((s, width), -1, dtype=torch.int64)
    for i, c in enumerate(counts):
        positions[i, :c] = torch.randperm(prompt, generator=gen)[:c].sort().values
        if holes:  # a refill that rewrites only the slots whose position changed
            positions[i, :c][torch.rand(c, generator=gen) < 0.4] = -1
    page = bs * 2 * d
    before = [torch.randn(REFILL_NB, page + REFILL_PAD, generator=torch.Generator().manual_seed(i)).to(dtype)
              for i in range(s)]
    tables = [torch.randperm(REFILL_NB, generator=gen)[: -(-width // bs) + 1].int() for _ in range(s)]
    return storage, host_blocks, host_rows, positions, before, tables


@IN_DTYPES
@IN_LAYOUTS
@pytest.mark.parametrize("name", list(REFILL_CASES))
def test_refill_copy_reference_matches_hand_addressing(name, k_transposed, dtype):
    """Oracle: slot ``i`` of a satellite lives in block ``table[i // bs]`` at offset ``i % bs``; its K
    is column ``i % bs`` of a ``[D, bs]`` region (k-transposed) or row ``i % bs`` of ``[bs, D]``, its
    V row ``i % bs`` of the ``[bs, D]`` region after it. Every other element, and every slot whose
    position is -1, is left as it was."""
    d, bs, hbs, counts, _ = REFILL_CASES[name]
    storage, host_blocks, host_rows, positions, before, tables = make_refill_case(name, dtype)
    got = [f.clone() for f in before]
    kernels.refill_copy_reference(storage, host_blocks, host_rows, positions, refill_caches_of(got, bs, d), tables,
                                  layout_of(k_transposed, bs, d))
    for s in range(len(counts)):
        want = before[s].clone()
        for i in torch.nonzero(positions[s] >= 0)[:, 0].tolist():
            pos = int(positions[s, i])
            src = storage[int(host_blocks[pos // hbs]), int(host_rows[s]), pos % hbs]  # [2, D]
            region = want[int(tables[s][i // bs]), : bs * 2 * d]
            k_region = region[: bs * d].view(d, bs) if k_transposed else region[: bs * d].view(bs, d)
            if k_transposed:
                k_region[:, i % bs] = src[0]
            else:
                k_region[i % bs] = src[0]
            region[bs * d :].view(bs, d)[i % bs] = src[1]
        assert torch.equal(got[s], want)


@needs_kernels
@ON_DEVICES
@IN_DTYPES
@IN_LAYOUTS
@pytest.mark.parametrize("name", list(REFILL_CASES))
def test_refill_copy_kernel_matches_reference(name, k_transposed, dtype, device):
    """Exact copies: the kernel's caches equal the reference's, bit for bit, and slots beyond
    each satellite's count, slots whose position is -1, other blocks and the padding between
    blocks are untouched."""
    d, bs, hbs, counts, _ = REFILL_CASES[name]
    storage, host_blocks, host_rows, positions, before, tables = make_refill_case(name, dtype)
    s, nb, page, pad = len(counts), REFILL_NB, bs * 2 * d, REFILL_PAD

    def caches_of(flats):  # single-head caches whose blocks are `pad` elements apart
        return refill_caches_of(flats, bs, d)

    on_device = [f.clone().to(device) for f in before]
    layout = layout_of(k_transposed, bs, d)
    kernels.refill_copy(*on(device, storage), host_blocks, host_rows, positions, caches_of(on_device),
                        *on(device, tables), layout)
    got = [f.cpu() for f in on_device]
    want = [f.clone() for f in before]
    kernels.refill_copy_reference(storage, host_blocks, host_rows, positions, caches_of(want), tables, layout)
    for i in range(s):
        assert torch.equal(got[i], want[i])
        slots = torch.nonzero(positions[i] >= 0)[:, 0]
        k, v = read_positions(caches_of(got)[i], layout, tables[i], slots)
        pos = positions[i, slots]
        src = storage[host_blocks[pos // hbs], int(host_rows[i]), pos % hbs]
        assert torch.equal(k, src[:, 0]) and torch.equal(v, src[:, 1])
        written = torch.zeros(nb, page + pad, dtype=torch.bool)
        # slot i: block table[i // bs], offset i % bs (hand addressing)
        blocks, off, dims = tables[i][slots // bs].long(), (slots % bs)[:, None], torch.arange(d)[None]
        written[blocks[:, None], dims * bs + off if k_transposed else off * d + dims] = True
        written[blocks[:, None], bs * d + off * d + dims] = True
        assert torch.equal(got[i][~written], before[i][~written])


# --- registration of the extension's ops (torch.library) -----------------------------------------

OPS = ("heterocache::gather_attention", "heterocache::drift_check", "heterocache::refill_copy",
       "heterocache::stage_blocks", "heterocache::window_scores", "heterocache::write_slots")
# (stage_blocks stages blocks for vLLM's CPU kernel; window_scores and write_slots: CUDA takes the reference)
CPU_ONLY_OPS = ("heterocache::stage_blocks", "heterocache::window_scores", "heterocache::write_slots")
needs_extension = pytest.mark.skipif(
    not kernels.HAVE_KERNELS,
    reason=f"extension vllm_heterocache._C not built, so no torch.ops.heterocache ops are registered: "
           f"{kernels.describe()}")


def op_args(qualname, device):
    """Small real arguments of each op, built as in the kernel tests above (outputs included)."""
    if qualname == "heterocache::stage_blocks":
        g = torch.Generator().manual_seed(0)
        src, dst = torch.randn(6, 1, 16, 128, generator=g), torch.zeros(3, 1, 16, 128)
        return src, torch.tensor([4, 1, 4]), dst, False, True
    if qualname == "heterocache::window_scores":
        g = torch.Generator().manual_seed(0)
        return torch.randn(2, 3 * 4, 37, generator=g), 4, 5, torch.empty(2, 37)
    if qualname == "heterocache::write_slots":
        g = torch.Generator().manual_seed(0)
        kv = torch.randn(5, 2, 16, generator=g)
        return torch.zeros(6, 1, 16, 32), torch.tensor([17, -1, 90, 3, 40]), kv[:, 1], kv[:, 0], False
    if qualname == "heterocache::gather_attention":
        g, hkv, d, bs, items = CASES["gqa4-d64-scrambled"]
        q, _, _, caches, tables, work, fronts = make_case(g, hkv, d, bs, items, torch.float32, True, pad=8)
        return (*on(device, q, torch.zeros(q.shape), caches, tables, work, fronts), True, 0.1)
    if qualname == "heterocache::drift_check":
        p, n, g, d, bs, key_len, cand, topk = DRIFT_CASES["odd-length-gqa3"]
        queries, caches, tables, reference, _ = make_drift_case("odd-length-gqa3", torch.float32, True)
        outputs = (torch.empty(p, dtype=torch.bool), torch.empty(p), torch.empty(p, topk, dtype=torch.int64),
                   torch.empty(p, key_len))
        return (*on(device, queries, caches, tables), 0, key_len, cand, *on(device, reference), topk, 0.6, 5, True,
                *on(device, *outputs))
    d, bs, hbs, counts, _ = REFILL_CASES["d64-odd-counts"]
    storage, host_blocks, host_rows, positions, before, tables = make_refill_case("d64-odd-counts", torch.float32)
    flats = on(device, [f.clone() for f in before])[0]
    return (*on(device, storage, host_blocks, host_rows, positions), refill_caches_of(flats, bs, d),
            on(device, tables)[0], True)


@needs_extension
def test_extension_registers_exactly_its_ops_each_with_cpu_kernel_and_fake():
    """Every op of the namespace is one of OPS (a new op must be added here, with its fake), has a
    CPU kernel, and has the fake implementation of ops/kernels.py registered (which torch.compile /
    FakeTensor tracing use; register_fake installs it as the op's Meta kernel too)."""
    from torch._library import simple_registry

    registered = {name for name in torch._C._dispatch_get_all_op_names() if name.startswith("heterocache::")}
    assert registered == set(OPS)
    for qualname in OPS:
        assert hasattr(torch.ops.heterocache, qualname.split("::")[1]), qualname
        assert torch._C._dispatch_has_kernel_for_dispatch_key(qualname, "CPU"), qualname
        assert torch._C._dispatch_has_kernel_for_dispatch_key(qualname, "Meta"), qualname
        fake = simple_registry.singleton.find(qualname).fake_impl.kernel
        assert fake is not None and "vllm_heterocache/ops/kernels.py" in fake.source.replace("\\", "/"), qualname


@needs_extension
@ON_DEVICES
@pytest.mark.parametrize("qualname", OPS)
def test_opcheck(qualname, device):
    """torch.library.opcheck on real inputs: the schema's mutation/alias annotations match what the
    kernel does (test_schema), no autograd registration is missing (test_autograd_registration), the
    op runs under FakeTensorMode with the results of the real kernel (test_faketensor) and through
    AOT dispatch with dynamic shapes (test_aot_dispatch_dynamic). All four apply: the ops only
    mutate annotated arguments (``Tensor(a!)``, ``Tensor(a!)[]``) and return nothing.

    Ops that mutate and return nothing would also pass test_faketensor with the trivial fake PyTorch
    generates (torch._library.utils.can_generate_trivial_fake_impl), so that ours is registered is
    asserted by test_extension_registers_exactly_its_ops_each_with_cpu_kernel_and_fake."""
    if device != "cpu" and qualname in CPU_ONLY_OPS:
        pytest.skip(f"{qualname} has a CPU kernel only")
    op = getattr(torch.ops.heterocache, qualname.split("::")[1]).default
    torch.library.opcheck(op, op_args(qualname, device))


@needs_kernels
@IN_DTYPES
@pytest.mark.parametrize("src_transposed", [True, False], ids=["from-k-transposed", "from-k-token-major"])
@pytest.mark.parametrize("dst_transposed", [True, False], ids=["to-k-transposed", "to-k-token-major"])
@pytest.mark.parametrize("bs,d", [(16, 64), (128, 64), (32, 80)])
def test_stage_blocks_kernel_matches_reference(bs, d, dst_transposed, src_transposed, dtype):
    """Block staging (a compressed pool's blocks into vLLM's layout for its kernel): the kernel's
    blocks equal ops.paged.copy_blocks', bit for bit, from caches whose blocks are padded apart,
    and dst's blocks past the staged ones and its padding are untouched."""
    from vllm_heterocache.ops.paged import copy_blocks

    g = torch.Generator().manual_seed(bs + d)
    page, pad = bs * 2 * d, 24
    src = torch.randn(20, page + pad, generator=g).to(dtype).as_strided((20, 1, bs, 2 * d), (page + pad, page, 2 * d, 1))
    blocks = torch.tensor([13, 2, 19, 2, 7])
    dst_flat = torch.randn(8, page + pad, generator=g).to(dtype)
    want_flat = dst_flat.clone()
    view = lambda flat: flat.as_strided((8, 1, bs, 2 * d), (page + pad, page, 2 * d, 1))  # noqa: E731
    src_layout, dst_layout = layout_of(src_transposed, bs, d), layout_of(dst_transposed, bs, d)
    kernels.stage_blocks(src, src_layout, blocks, view(dst_flat), dst_layout)
    copy_blocks(src, src_layout, blocks, view(want_flat), dst_layout)
    assert torch.equal(dst_flat, want_flat)


@needs_kernels
@IN_DTYPES
@IN_LAYOUTS
@pytest.mark.parametrize("tokens", [3, 700], ids=["decode-rows", "prefill-chunk"])
def test_write_slots_kernel_matches_reference(tokens, k_transposed, dtype):
    """The cache write at vLLM's slots (the compressed pools' own write): the kernel's cache equals
    ops.paged.write_slots', bit for bit, for one head of a step's [T, H, D] K/V (rows strided),
    with negative slots skipped, blocks padded apart, and the padding and unwritten slots untouched;
    a prefill chunk's many rows take the parallel path."""
    from vllm_heterocache.ops.paged import write_slots

    g = torch.Generator().manual_seed(tokens)
    nb, bs, d, pad = 40, 32, 64, 24
    page = bs * 2 * d
    flat = torch.randn(nb, page + pad, generator=g).to(dtype)
    want_flat = flat.clone()
    view = lambda f: f.as_strided((nb, 1, bs, 2 * d), (page + pad, page, 2 * d, 1))  # noqa: E731
    slots = torch.randperm(nb * bs, generator=g)[:tokens]
    slots[::3] = -1
    k, v = torch.randn(tokens, 3, d, generator=g).to(dtype), torch.randn(tokens, 3, d, generator=g).to(dtype)
    layout = layout_of(k_transposed, bs, d)
    kernels.write_slots(view(flat), layout, slots, k[:, 1], v[:, 2])
    write_slots(view(want_flat), layout, slots, k[:, 1], v[:, 2])
    assert torch.equal(flat, want_flat)


# --- prompt-end scores -----------------------------------------------------------------------------

WINDOW_CASES = {  # (W, Hq, Hkv, D, L, pool_kernel)
    "gqa4-window32": (32, 8, 2, 64, 700, 5),
    "mha-last-query": (1, 4, 4, 16, 5, 3),
    "mqa-window7-shorter-than-pool": (7, 8, 1, 16, 9, 11),
    "gqa3-odd-length": (5, 9, 3, 80, 203, 5),
    "no-pooling": (4, 4, 2, 32, 100, 1),
}


@needs_kernels
@pytest.mark.parametrize("name", list(WINDOW_CASES))
def test_prefill_scores_kernel_matches_reference(name):
    """The compiled softmax, window mean, pooling and GQA max (csrc/window_scores.h) against
    ref.prefill_scores: equal within float32 rounding (its exponential's relative error is ~1e-7),
    and the selection they make equal."""
    w, hq, hkv, d, length, pool = WINDOW_CASES[name]
    g = torch.Generator().manual_seed(length)
    q, k = 3 * torch.randn(w, hq, d, generator=g), torch.randn(length, hkv, d, generator=g)
    want, got = ref.prefill_scores(q, k, pool), kernels.prefill_scores(q, k, pool)
    torch.testing.assert_close(got, want, rtol=2e-5, atol=1e-9)
    budgets = torch.full((hkv,), max(1, length // 3))
    assert torch.equal(ref.select_tokens(got, budgets, min(w, length)), ref.select_tokens(want, budgets, min(w, length)))


@needs_kernels
@pytest.mark.parametrize("heads_per_piece", [1, 2, 3, 4], ids=["a-head", "half-a-group", "odd-part", "a-kv-head"])
def test_prefill_scores_kernel_in_pieces(monkeypatch, heads_per_piece):
    """Logits larger than SCORE_WHOLE_BYTES are made a few query heads at a time: pieces of
    whole KV heads, or parts of one head's group whose maxima are maxed, give the same scores."""
    w, hq, hkv, d, length = 6, 8, 2, 16, 300
    g = torch.Generator().manual_seed(heads_per_piece)
    q, k = torch.randn(w, hq, d, generator=g), torch.randn(length, hkv, d, generator=g)
    want = kernels.prefill_scores(q, k, 5)  # one piece
    # (against the reference as it runs: with the smaller setting it too would take another path,
    # its chunks of keys, whose rounding differs by more than this bound on some elements)
    torch.testing.assert_close(want, ref.prefill_scores(q, k, 5), rtol=2e-5, atol=1e-9)
    monkeypatch.setattr(ref, "SCORE_WHOLE_BYTES", 4 * w * length * heads_per_piece)
    torch.testing.assert_close(kernels.prefill_scores(q, k, 5), want, rtol=1e-6, atol=0)
