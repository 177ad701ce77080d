"""One vLLM engine of bench_fidelity.py, in its own process: every case under every setting that
the engine's server policy serves, as per-request policies and ratios (``vllm_xargs``).

    python benchmarks/_fidelity_worker.py MODEL CASES.json RUN.json OUT.json

RUN.json: ``{"server": {heterocache options, or null for vLLM's own backend}, "settings":
[{"name", "policy", "ratio"}, ...], "prefix_caching": bool (default false)}``. With prefix
caching (on or off, when the key is there) the cases are asked one after another, each setting
in turn, so that a case hits what the cases before it left in vLLM's prefix cache; else all at
once. OUT.json: per setting, its answers, the fraction of the KV cache each request kept (the
runtime's own budget plan for its prompt) and the prompt tokens each took from the prefix cache.
"""

import dataclasses
import json
import os
import sys

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
MAX_TOKENS = 48  # three 7-digit values (multivalue needles) take ~40 of SmolLM2's tokens


def main():
    from vllm import LLM, SamplingParams

    model, cases_file, run_file, out = sys.argv[1:5]
    cases = json.loads(open(cases_file).read())
    run = json.loads(open(run_file).read())
    server, settings = run["server"], run["settings"]
    longest = max(len(c["prompt_ids"]) for c in cases)
    sequential = "prefix_caching" in run
    kw = dict(model=model, dtype="float32", max_model_len=longest + 64, enable_prefix_caching=bool(run.get("prefix_caching")),
              seed=0, enforce_eager=True)  # no torch.compile: minutes of start-up per engine saved, same for all settings
    if server is not None:
        kw.update(attention_backend="heterocache", additional_config={"heterocache": server})
    prompts, params = [], []
    for s in settings:
        xargs = None if server is None else {"heterocache_policy": s["policy"]}
        if xargs is not None and s["policy"] != "full":
            xargs["heterocache_ratio"] = s["ratio"]
        for c in cases:
            prompts.append({"prompt_token_ids": c["prompt_ids"]})
            params.append(SamplingParams(temperature=0, max_tokens=MAX_TOKENS, extra_args=xargs))
    llm = LLM(**kw)
    if sequential:
        outs = [llm.generate([prompt], param, use_tqdm=False)[0] for prompt, param in zip(prompts, params)]
    else:
        outs = llm.generate(prompts, params)
    texts = [o.outputs[0].text for o in outs]
    cached = [o.num_cached_tokens or 0 for o in outs]
    kept = _kept_fractions(llm, server, settings, cases)
    results = []
    for n, s in enumerate(settings):
        answers = texts[n * len(cases) : (n + 1) * len(cases)]
        results.append({"setting": s, "kept": kept[n], "answers": answers,
                        "cached_tokens": cached[n * len(cases) : (n + 1) * len(cases)]})
    json.dump({"server": server, "results": results}, open(out, "w"))


def _kept_fractions(llm, server, settings, cases) -> list[list[float]]:
    """Per setting and case, the fraction of the prompt's KV cache kept, as the engine planned it."""
    if server is None:
        return [[1.0] * len(cases) for _ in settings]
    from vllm_heterocache.budget import Budgeter
    from vllm_heterocache.config import HeteroCacheConfig
    from vllm_heterocache.head_profile.resolve import resolve_profile

    config = HeteroCacheConfig.from_dict(server)
    model_config = llm.llm_engine.vllm_config.model_config
    profile = resolve_profile(model_config.hf_config, model_config.model, config.profile)
    out = []
    for s in settings:
        ratio = 1.0 if s["policy"] == "full" else s["ratio"]
        budgeter = Budgeter(profile, dataclasses.replace(config, policy=s["policy"], compression_ratio=ratio,
                                                         token_budget=None))
        out.append([budgeter.budgets(len(c["prompt_ids"])).kept_fraction() for c in cases])
    return out


if __name__ == "__main__":
    main()
