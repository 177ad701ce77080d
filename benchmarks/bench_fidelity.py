"""Answer fidelity of HeteroCache on needle-in-a-haystack tasks, against the full KV cache.

    python benchmarks/bench_fidelity.py --contexts 2048:12,4096:12,8000:8 --out /tmp/fidelity.json

(SmolLM2 has 8192 positions: the "8K" cases are 8000 tokens, leaving room for the answer.)

Runs SmolLM2-135M-Instruct (the embedded default model, chat template) in vLLM once per setting,
all cases batched, greedy. Settings: ``full`` (vLLM's own CPU backend) and HeteroCache at the
given compression settings, with refills on and off. Prints accuracy per context length and the
rate at which each setting's answer equals the full cache's answer, plus the KV fraction kept.

A ratio below the profile's share of full heads is infeasible under the paper's formula; such a
setting runs as ``token_budget = ratio * context`` (each compressed head keeps that share) and is
labelled so, with the fraction of the whole cache it actually keeps.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def run_setting(model: str, cases_file: Path, setting: dict, out: Path) -> dict:
    cmd = [sys.executable, str(HERE / "_fidelity_worker.py"), model, str(cases_file), json.dumps(setting), str(out)]
    t = time.time()
    subprocess.run(cmd, check=True)
    result = json.loads(out.read_text())
    result["seconds"] = round(time.time() - t, 1)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--contexts", default="2048:12,4096:12,8000:8", help="length:cases,...")
    p.add_argument("--settings", default="full,r0.5,b0.25,b0.25-norefill,b0.1",
                   help="full | rR (compression_ratio R) | bR (token_budget R*context); suffix -norefill")
    p.add_argument("--out", type=Path, default=Path("/tmp/heterocache-fidelity.json"))
    a = p.parse_args()
    from transformers import AutoTokenizer

    sys.path.insert(0, str(HERE))
    from needles import make_cases

    from vllm_heterocache.models.smollm2 import prepare_default_model

    model = str(prepare_default_model())
    tok = AutoTokenizer.from_pretrained(model)
    contexts = {int(c.split(":")[0]): int(c.split(":")[1]) for c in a.contexts.split(",")}
    cases = make_cases(tok, contexts)
    work = a.out.parent / (a.out.stem + "-work")
    work.mkdir(parents=True, exist_ok=True)
    cases_file = work / "cases.json"
    cases_file.write_text(json.dumps([c.__dict__ for c in cases]))
    results = {}
    for name in a.settings.split(","):
        refill = not name.endswith("-norefill")
        base = name.removesuffix("-norefill")
        setting = {"name": name, "refill": refill}
        if base != "full":
            setting[{"r": "compression_ratio", "b": "budget_fraction"}[base[0]]] = float(base[1:])
        results[name] = run_setting(model, cases_file, setting, work / f"{name}.json")
        a.out.write_text(json.dumps({"cases": len(cases), "contexts": contexts, "results": results}, indent=1))
    report(cases, results)


def report(cases, results) -> None:
    full = results.get("full")
    print(f"\n{'setting':<16} {'kept':>6} " + " ".join(f"{f'acc@{c}':>9}" for c in sorted({c.context for c in cases}))
          + f" {'acc':>6} {'=full':>6} {'secs':>6}")
    for name, r in results.items():
        rows = r["answers"]
        line = f"{name:<16} {r['kept_fraction']:>6.3f} "
        for ctx in sorted({c.context for c in cases}):
            idx = [i for i, c in enumerate(cases) if c.context == ctx]
            line += f"{sum(rows[i]['correct'] for i in idx) / len(idx):>9.2f} "
        acc = sum(x["correct"] for x in rows) / len(rows)
        same = sum(x["text"].strip() == y["text"].strip() for x, y in zip(rows, full["answers"])) / len(rows) if full else float("nan")
        print(line + f"{acc:>6.2f} {same:>6.2f} {r['seconds']:>6.0f}")


if __name__ == "__main__":
    main()
