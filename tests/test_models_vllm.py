"""vLLM loads the tiny test model and decodes greedily exactly as transformers does.

vLLM runs in a subprocess: its environment (no engine subprocess, one OpenMP thread, a 1 GiB CPU KV
cache) must be set before ``vllm`` is imported, and it forces the spawn start method, which needs
a script with an ``if __name__ == "__main__":`` guard.

The model is the default tiny build in the project cache (built once per machine): vLLM keys its
torch.compile cache (``~/.cache/vllm``) by the model path, so a stable path lets later runs reuse
the compiled graph (~25 s instead of ~50 s) instead of adding a cache entry per run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from vllm_heterocache.models.tiny import build_tiny_model

PROMPT = "The king said unto"
MAX_TOKENS = 16

SCRIPT = textwrap.dedent(
    """
    import json
    import sys


    def main() -> None:
        from vllm import LLM, SamplingParams

        model, prompt, max_tokens = sys.argv[1], sys.argv[2], int(sys.argv[3])
        llm = LLM(model=model, dtype="float32", max_model_len=2048)
        out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=max_tokens))[0]
        result = {"prompt_token_ids": list(out.prompt_token_ids), "token_ids": list(out.outputs[0].token_ids)}
        print("HETEROCACHE_RESULT " + json.dumps(result), flush=True)


    if __name__ == "__main__":
        main()
    """
)


@pytest.mark.slow
def test_vllm_greedy_matches_transformers(tmp_path: Path) -> None:
    pytest.importorskip("vllm", reason="vLLM is not installed (pip install -e .[cpu] or .[gpu])")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = build_tiny_model()
    script = tmp_path / "run_vllm.py"
    script.write_text(SCRIPT)
    env = {
        **os.environ,
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        "OMP_NUM_THREADS": "1",
        "VLLM_CPU_KVCACHE_SPACE": "1",
    }
    proc = subprocess.run(
        [sys.executable, str(script), str(model_dir), PROMPT, str(MAX_TOKENS)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("HETEROCACHE_RESULT ")]
    assert proc.returncode == 0 and lines, (
        f"vLLM run failed (exit {proc.returncode}).\nstdout tail:\n{proc.stdout[-3000:]}\n"
        f"stderr tail:\n{proc.stderr[-6000:]}"
    )
    result = json.loads(lines[-1].split(" ", 1)[1])

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    inputs = tokenizer(PROMPT, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=MAX_TOKENS, do_sample=False)
    expected = out[0, inputs["input_ids"].shape[1]:].tolist()

    assert result["prompt_token_ids"] == inputs["input_ids"][0].tolist()
    assert len(result["token_ids"]) > 0
    assert result["token_ids"] == expected
