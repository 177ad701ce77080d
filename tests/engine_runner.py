"""Runs real vLLM engines in a fresh process and prints one JSON line of results.

    python tests/engine_runner.py SCENARIO MODEL_DIR PROFILE.json

Used by tests/test_engine.py (a subprocess keeps engines, env vars and vLLM's process-wide state
out of the test process). In-process engine mode unless VLLM_ENABLE_V1_MULTIPROCESSING=1 is set.
"""

import json
import os
import sys

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

from vllm_heterocache.vllm_adapter import compat  # noqa: E402 (after the environment it reads)
from vllm_heterocache.vllm_adapter.runner_hooks import runtime_of  # noqa: E402


def prompts(tokenizer, lengths, shared=False):
    """Prompts of the given lengths, each from its own document (``shared``: all from one, so
    that each is a prefix of the longer ones)."""
    from vllm_heterocache.data.texts import documents

    docs = documents(1 if shared else len(lengths), 40 * max(lengths))
    docs = docs * len(lengths) if shared else docs
    out = []
    for doc, n in zip(docs, lengths):
        ids = tokenizer(doc, add_special_tokens=False).input_ids[:n]
        out.append({"prompt_token_ids": ids})
    return out


def prefix_batches(tokenizer):
    """Batches of prompts (each one ``generate`` call, in order) that hit vLLM's prefix cache in
    every way: a whole prompt again, part of one, blocks shared by requests running together,
    and a prompt again after other prompts evicted its blocks (in a small KV cache)."""
    a, b, c = (p["prompt_token_ids"] for p in prompts(tokenizer, [1100, 1100, 700]))
    return [
        [a],  # computes a; its compressed heads select, its prompt blocks go back to the cache
        [a],  # the whole prompt again: a hit up to the observation window
        [a[:900] + b[:200]],  # part of a prompt
        [a[:700] + b[:300], a[:700] + c[:300], a[:700] + b[300:600]],  # shared while running
        [c[:650] + a[:50], c[:650] + a[50:100]],  # blocks one computes while the other hits them
        [b, c[:600] + b[:500]],  # other prompts fill the cache...
        [a],  # ... so that a's blocks were evicted
    ]


def generate_batches(model, batches_of, max_tokens, batch_args=None, **kw):
    """Greedy tokens of each batch of ``batches_of(tokenizer)`` in one engine (``batch_args[i]``:
    the ``vllm_xargs`` of batch ``i``'s requests), the prompt tokens each request got from vLLM's
    prefix cache, and the engine's state once they are done."""
    from vllm import LLM, SamplingParams

    llm = LLM(model=model, dtype="float32", max_model_len=2048, enforce_eager=True, seed=0, **kw)
    scheduler = compat.engine_scheduler(llm)
    tokens, hits = [], []
    for i, batch in enumerate(batches_of(llm.get_tokenizer())):
        params = SamplingParams(temperature=0, max_tokens=max_tokens, extra_args=(batch_args or {}).get(i))
        outs = llm.generate([{"prompt_token_ids": ids} for ids in batch], params)
        tokens.append([list(o.outputs[0].token_ids) for o in outs])
        hits.append([o.num_cached_tokens for o in outs])
    while scheduler.has_requests():  # the step that tells the worker who finished
        llm.llm_engine.step()
    groups = [len(g.layer_names) for g in compat.engine_kv_cache_groups(scheduler)]
    pool = compat.engine_block_pool(scheduler)
    result = {"tokens": tokens, "hits": hits, "free_blocks": pool.get_num_free_blocks(),
              "num_blocks": pool.num_gpu_blocks, "group_layers": groups}
    if kw.get("tensor_parallel_size", 1) > 1:
        result["ranks"] = llm.collective_rpc(runtime_summary)
    else:
        rt = runtime_of(compat.driver_model_runner(llm))
        if rt is not None:
            result |= {"counters": vars(rt.counters), "states": len(rt.requests),
                       "host_used_blocks": rt.host.used_blocks if rt.host is not None else None}
    del llm
    return result


def generate(model, lengths, max_tokens, max_model_len=4096, extra_args=None, refused_args=None,
             enable_prefix_caching=False, shared=False, **kw):
    """``extra_args``: per prompt, its ``SamplingParams.extra_args`` (``vllm_xargs``);
    ``refused_args``: extra args, each of which the engine must refuse (the errors go in ``refused``,
    one line each; an accepted one leaves its line empty); ``shared``: the prompts are prefixes
    of one document."""
    from vllm import LLM, SamplingParams
    from vllm.exceptions import VLLMValidationError

    llm = LLM(model=model, dtype="float32", max_model_len=max_model_len, enable_prefix_caching=enable_prefix_caching,
              enforce_eager=True, seed=0, **kw)
    refused = []
    for args in refused_args or ():
        try:
            llm.generate(prompts(llm.get_tokenizer(), lengths[:1]), SamplingParams(max_tokens=1, extra_args=args))
            refused.append("")
        except VLLMValidationError as e:  # what the API server answers with HTTP 400
            refused.append(str(e))
    refused = "\n".join(refused)
    scheduler = compat.engine_scheduler(llm)
    preemptions = compat.count_preemptions(scheduler) if scheduler is not None else []  # (in-process engines)
    params = [SamplingParams(temperature=0, max_tokens=max_tokens, extra_args=x) for x in extra_args or [None] * len(lengths)]
    outs = llm.generate(prompts(llm.get_tokenizer(), lengths, shared), params)
    result = {"tokens": [list(o.outputs[0].token_ids) for o in outs], "preemptions": len(preemptions),
              "refused": refused}
    if scheduler is not None:  # vLLM's own block accounting once every request is done
        while scheduler.has_requests():  # the step that tells the worker who finished
            llm.llm_engine.step()
        pool = compat.engine_block_pool(scheduler)
        result["free_blocks"], result["num_blocks"] = pool.get_num_free_blocks(), pool.num_gpu_blocks
    if kw.get("tensor_parallel_size", 1) > 1:  # every rank's runtime, from inside its worker process
        result["ranks"] = llm.collective_rpc(runtime_summary)
        from vllm_heterocache.vllm_adapter.metrics import metrics_dir, read_snapshots

        # what the worker processes published for /metrics (this process's own file: an earlier engine)
        result["published"] = [s for s in read_snapshots(metrics_dir()) if s["pid"] != os.getpid()]
    runner = compat.driver_model_runner(llm)
    if runner is not None:
        rt = runtime_of(runner)
        if rt is not None:
            result["counters"] = vars(rt.counters)
            result["states"] = len(rt.requests)
            result["compresses"] = rt.compresses
            result["host_used_blocks"] = rt.host.used_blocks if rt.host is not None else None
            result["kept"] = {p: h.to_dict() for p, h in rt.kept.items()}
    del llm
    return result


def runtime_summary(worker):
    """On a worker (``LLM.collective_rpc``): its rank's runtime counters and host tier."""
    from vllm.distributed import get_tensor_model_parallel_rank

    rt = runtime_of(compat.worker_model_runner(worker))
    if rt is None:
        return {"rank": get_tensor_model_parallel_rank()}
    return {"rank": get_tensor_model_parallel_rank(), "counters": vars(rt.counters), "states": len(rt.requests),
            "host_rows": rt.num_host_rows, "host_blocks": rt.host.num_blocks if rt.host is not None else 0,
            "host_used_blocks": rt.host.used_blocks if rt.host is not None else None,
            "cache_of": [list(lh.cache_of) for lh in rt.layers], "cache_pools": [list(lh.cache_pools) for lh in rt.layers]}


def heterocache(profile, **options):
    return {"attention_backend": "heterocache", "additional_config": {"heterocache": {"profile": profile, **options}}}


def main():
    scenario, model, profile = sys.argv[1:4]
    lengths = [37, 300, 1100, 90]
    results = {}
    if scenario == "identity":
        results["stock"] = generate(model, lengths, 24)
        results["ratio1"] = generate(model, lengths, 24, **heterocache(profile, compression_ratio=1.0))
        results["keep_all_budget"] = generate(model, lengths, 24, **heterocache(profile, token_budget=100_000))
        # 128-token chunks: later prompts are prefilled in steps where earlier ones decode
        chunked = {"max_num_batched_tokens": 128, "max_num_seqs": 4}
        results["stock_chunked"] = generate(model, lengths, 24, **chunked)
        results["keep_all_chunked"] = generate(model, lengths, 24, **chunked,
                                               **heterocache(profile, token_budget=100_000))
    elif scenario == "serving":
        many = [40 + 90 * (i % 9) for i in range(24)]
        results["compressed"] = generate(
            model, many, 100, max_model_len=896,
            max_num_batched_tokens=256,  # chunked prefill: prompts longer than this come in chunks
            max_num_seqs=8,
            num_gpu_blocks_override=18,  # 18 blocks of 128 tokens for all pools: requests wait, get preempted
            **heterocache(profile, compression_ratio=0.6, window=8, drift_interval=3, stats_interval_s=1),
        )
    elif scenario == "serving_shared":  # the same with vLLM's prefix cache, prompts sharing prefixes
        many = [40 + 90 * (i % 9) for i in range(24)]
        results["compressed"] = generate(
            model, many, 100, max_model_len=896, max_num_batched_tokens=256, max_num_seqs=8,
            num_gpu_blocks_override=18, enable_prefix_caching=True, shared=True,
            **heterocache(profile, compression_ratio=0.6, window=8, drift_interval=3, stats_interval_s=1),
        )
    elif scenario == "tp2":  # two tensor-parallel ranks, one core each
        tp = {"tensor_parallel_size": 2, "distributed_executor_backend": "mp"}
        results["stock"] = generate(model, lengths, 24, **tp)
        results["keep_all"] = generate(model, lengths, 24, **tp, **heterocache(profile, token_budget=100_000))
        options = {"compression_ratio": 0.6, "window": 8, "drift_interval": 3}
        results["compressed_tp1"] = generate(model, lengths, 48, **heterocache(profile, **options))
        results["compressed"] = generate(model, lengths, 48, **tp, **heterocache(profile, **options))
    elif scenario == "tp2_real":  # a real profile's layout (uneven mixes, clusters across ranks) at TP 1 and 2
        options = {"compression_ratio": 0.5, "window": 8, "drift_interval": 3}
        long = [300, 1100, 700]
        results["compressed_tp1"] = generate(model, long, 32, **heterocache(profile, **options))
        results["compressed"] = generate(model, long, 32, tensor_parallel_size=2, distributed_executor_backend="mp",
                                         **heterocache(profile, **options))
    elif scenario == "policies":  # every policy for the server, and mixed policies per request in one batch
        long = [300, 1100, 700, 500]
        results["stock"] = generate(model, long, 24, refused_args=[{"heterocache_policy": "full"},
                                                                   {"heterocache_polcy": "full"}])
        options = {"window": 8, "drift_interval": 3}
        for policy, ratio in (("streamingllm", 0.3), ("snapkv", 0.3), ("pyramidkv", 0.3), ("duo", 0.7), ("full", 0.5)):
            results[policy] = generate(model, long, 24, **heterocache(profile, policy=policy, compression_ratio=ratio,
                                                                      **options))
        mixed = [{"heterocache_policy": "full"}, {"heterocache_policy": "duo", "heterocache_ratio": 0.9}, None,
                 {"heterocache_ratio": 0.9}]
        results["mixed"] = generate(model, long, 24, extra_args=mixed, refused_args=[{"heterocache_policy": "snapkv"}],
                                    **heterocache(profile, compression_ratio=0.6, **options))
        mixed_snapkv = [{"heterocache_policy": "full"}, {"heterocache_policy": "streamingllm"},
                        {"heterocache_policy": "pyramidkv", "heterocache_ratio": 0.2}, {"heterocache_policy": "duo",
                                                                                         "heterocache_ratio": 0.8}]
        results["mixed_snapkv"] = generate(model, long, 24, extra_args=mixed_snapkv,
                                           **heterocache(profile, policy="snapkv", compression_ratio=0.3, **options))
    elif scenario == "prefix":  # vLLM's prefix cache on and off, stock and HeteroCache, the same batches
        small = {"num_gpu_blocks_override": int(os.environ.get("PREFIX_BLOCKS", "48")), "max_num_seqs": 4}
        options = {"compression_ratio": 0.6, "window": 8, "drift_interval": 3}
        for caching in (True, False):
            tag = "pc" if caching else "nopc"
            results[f"stock_{tag}"] = generate_batches(model, prefix_batches, 24, enable_prefix_caching=caching,
                                                       **small)
            results[f"hc_{tag}"] = generate_batches(model, prefix_batches, 24, enable_prefix_caching=caching,
                                                    **small, **heterocache(profile, **options))
        results["ratio1_pc"] = generate_batches(model, prefix_batches, 24, **small,
                                                **heterocache(profile, compression_ratio=1.0))
        # selections of a hit copied into each request's blocks instead of pointing into the shared ones
        results["hc_copy_pc"] = generate_batches(model, prefix_batches, 24, **small,
                                                 **heterocache(profile, shared_prefixes="copy", **options))
        # a full request hitting blocks that compressed requests cached
        results["full_after_compressed"] = generate_batches(
            model, lambda tok: prefix_batches(tok)[:2], 24, batch_args={1: {"heterocache_policy": "full"}}, **small,
            **heterocache(profile, **options))
    elif scenario == "prefix_tp2":
        options = {"compression_ratio": 0.6, "window": 8, "drift_interval": 3}
        tp = {"tensor_parallel_size": 2, "distributed_executor_backend": "mp", "max_num_seqs": 4}
        for caching in (True, False):
            tag = "pc" if caching else "nopc"
            results[f"hc_{tag}"] = generate_batches(model, lambda tok: prefix_batches(tok)[:4], 24,
                                                    enable_prefix_caching=caching, **tp,
                                                    **heterocache(profile, **options))
    elif scenario == "multiprocess":
        results["compressed"] = generate(model, lengths[:2], 12, **heterocache(profile, compression_ratio=0.6))
    print("RESULT " + json.dumps(results))


if __name__ == "__main__":
    main()
