"""One kvpress setting of bench_fidelity.py, run by the kvpress venv's python (kvpress_env.py).

    <kvpress venv>/bin/python benchmarks/_kvpress_worker.py MODEL_FOLDER CASES_JSON SETTING_JSON OUT_JSON

SETTING_JSON: {"name": "kvpress-full"} (no press) or {"name": ..., "press": "streamingllm" | "snapkv" |
"pyramidkv", "kept_fraction": f} (kvpress's compression_ratio is the fraction removed, 1 - f).
Writes {"setting", "kept_fraction", "answers": [{"text", "correct"}], "seconds_per_case"}, as
_fidelity_worker.py does for vLLM.

HF transformers on the CPU, float32, one case at a time, greedy, 48 new tokens. The whole prompt
(context, question and chat-template tail, as the vLLM engine sees it) is prefilled with full
attention under the press, which then compresses each layer's KV cache; the answer is decoded
against the compressed cache at the original positions (as kvpress's own pipeline decodes, except
that its pipeline leaves the question uncompressed). The kept fraction is measured: KV entries in
the cache after prefill over prompt length x layers x KV heads.
"""

import json
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local model folder; nothing is fetched
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

MAX_NEW_TOKENS = 48  # three 7-digit values (multivalue needles) take ~40 of SmolLM2's tokens


def make_press(setting: dict):
    import kvpress

    name = setting.get("press")
    if name is None:
        return None
    f = float(setting["kept_fraction"])
    if not 0 < f <= 1:
        raise ValueError(f"kept_fraction must be in (0, 1], got {f}")
    presses = {"streamingllm": kvpress.StreamingLLMPress, "snapkv": kvpress.SnapKVPress,
               "pyramidkv": kvpress.PyramidKVPress}
    if name not in presses:
        raise ValueError(f"unknown press {name!r}; choose from {', '.join(presses)}")
    return presses[name](compression_ratio=1.0 - f, **setting.get("options", {}))


def run_case(model, press, prompt_ids, eos_ids):
    import contextlib

    import torch
    from transformers import DynamicCache

    ids = torch.tensor([prompt_ids])
    cache = DynamicCache()
    with torch.inference_mode():
        with press(model) if press is not None else contextlib.nullcontext():
            out = model(input_ids=ids, past_key_values=cache, logits_to_keep=1)
        kept = sum(layer.keys.shape[1] * layer.keys.shape[2] for layer in cache.layers)
        cfg = model.config
        full = len(prompt_ids) * cfg.num_hidden_layers * cfg.num_key_value_heads
        generated = [int(out.logits[0, -1].argmax())]
        position = len(prompt_ids)
        while len(generated) < MAX_NEW_TOKENS and generated[-1] not in eos_ids:
            out = model(input_ids=torch.tensor([[generated[-1]]]), past_key_values=cache,
                        position_ids=torch.tensor([[position]]))
            position += 1
            generated.append(int(out.logits[0, -1].argmax()))
    if generated[-1] in eos_ids:
        generated.pop()
    return generated, kept / full


def main():
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    model_dir, cases_file, setting, out = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), sys.argv[4]
    cases = json.loads(open(cases_file).read())
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    press = make_press(setting)
    eos = model.generation_config.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos]) | {tok.eos_token_id}
    answers, kept, seconds = [], [], []
    for c in cases:
        t = time.time()
        generated, fraction = run_case(model, press, c["prompt_ids"], eos_ids)
        seconds.append(round(time.time() - t, 2))
        text = tok.decode(generated, skip_special_tokens=True)
        correct = all(a in text for a in c["answers"]) and not any(a in text for a in c.get("absent", ()))
        answers.append({"text": text, "correct": correct})
        kept.append(fraction)
    json.dump({"setting": setting, "kept_fraction": sum(kept) / len(kept), "answers": answers,
               "seconds_per_case": seconds}, open(out, "w"))


if __name__ == "__main__":
    main()
