"""``heterocache serve [VLLM_SERVE_ARGS...]``: the container entrypoint.

Builds a ``vllm serve`` command line from environment variables and the arguments, checks it,
and replaces this process with it (``os.execvp``): ``vllm serve`` is then the container's main
process (under ``tini``), gets the orchestrator's SIGTERM directly and drains itself with its own
handlers. Nothing of this wrapper stays behind.

    HETEROCACHE_MODEL        model folder or Hugging Face name; unset: the embedded
                             SmolLM2-135M-Instruct (with --served-model-name SmolLM2-135M-Instruct
                             --max-model-len 8192 --dtype float32, for it only)
    HETEROCACHE_CONFIG       HeteroCache options, a JSON object: {"compression_ratio": 0.25}
    HETEROCACHE_CONFIG_FILE  a file holding that object (e.g. a Kubernetes ConfigMap); not both
    HETEROCACHE_HOST         address to listen on (default 127.0.0.1; the images set 0.0.0.0)
    HETEROCACHE_PORT         port to listen on (default 8000)

Every argument is passed to ``vllm serve`` unchanged, after the ones built here (so a flag given
twice, e.g. ``--max-model-len``, takes the argument's value); the flags this command sets itself
(``--attention-backend``, ``--additional-config``, ``--model``, ``--host``, ``--port``) are refused
with the variable to set instead. Options are validated before the exec: a bad value is an error
that names the variable and the option, and no server starts. ``--print-command`` prints the
command line instead of running it.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from vllm_heterocache import env
from vllm_heterocache.config import ADDITIONAL_CONFIG_KEY, HeteroCacheConfig
from vllm_heterocache.errors import ConfigError, HeteroCacheError, PreparationError
from vllm_heterocache.models.smollm2 import MODEL_NAME, prepare_default_model

ENV_MODEL = "HETEROCACHE_MODEL"
ENV_CONFIG = "HETEROCACHE_CONFIG"
ENV_CONFIG_FILE = "HETEROCACHE_CONFIG_FILE"
ENV_HOST = "HETEROCACHE_HOST"
ENV_PORT = "HETEROCACHE_PORT"
DEFAULT_HOST = "127.0.0.1"  # the images set HETEROCACHE_HOST=0.0.0.0; outside one, stay local
ONEDNN_CACHE_ENV, ONEDNN_CACHE_CAPACITY = "ONEDNN_PRIMITIVE_CACHE_CAPACITY", "128"
DEFAULT_PORT = 8000
CONFIG_EXAMPLE = '{"compression_ratio": 0.25}'

# For the embedded default model only (any other model gets vLLM's defaults).
DEFAULT_MODEL_FLAGS = (
    "--served-model-name", MODEL_NAME, "--max-model-len", "8192",
    # float32: vLLM 0.32's CPU kernels answered garbage for this model in bfloat16 on AVX2
    # machines (measured with the stock backend too); the model is small enough for fp32.
    "--dtype", "float32",
)

# vllm serve flags this command sets itself -> what to do instead.
RESERVED_FLAGS = {
    "--attention-backend": f"remove it (it is always heterocache here); HeteroCache options go in {ENV_CONFIG}",
    "--additional-config": f"give the HeteroCache options in {ENV_CONFIG} (or {ENV_CONFIG_FILE}) instead, "
                           f"e.g. {ENV_CONFIG}='{CONFIG_EXAMPLE}'",
    "--model": f"remove it and set {ENV_MODEL}",
    "--host": f"remove it and set {ENV_HOST}",
    "--port": f"remove it and set {ENV_PORT}",
}


def _value(environ: Mapping[str, str], name: str) -> str | None:
    """The variable's value; unset, empty and blank are the same (Kubernetes renders absent values as '')."""
    value = environ.get(name, "").strip()
    return value or None


def _config_source(environ: Mapping[str, str]) -> tuple[str, str] | None:
    """(JSON text, where it came from) of the HeteroCache options, or None when neither variable is set."""
    inline, file = _value(environ, ENV_CONFIG), _value(environ, ENV_CONFIG_FILE)
    if inline is not None and file is not None:
        raise ConfigError(f"both {ENV_CONFIG} and {ENV_CONFIG_FILE} are set: set one of them")
    if inline is not None:
        return inline, ENV_CONFIG
    if file is None:
        return None
    try:
        return Path(file).read_text(encoding="utf-8"), f"{ENV_CONFIG_FILE}={file}"
    except (OSError, UnicodeDecodeError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise ConfigError(f"{ENV_CONFIG_FILE}={file}: cannot read it ({reason}); point it at a JSON file "
                          f"of HeteroCache options, e.g. {CONFIG_EXAMPLE}") from None


def heterocache_options(environ: Mapping[str, str]) -> dict[str, Any]:
    """The HeteroCache options from ``HETEROCACHE_CONFIG`` or ``HETEROCACHE_CONFIG_FILE``, validated.

    Returns the object as given ({} when neither is set), after :meth:`HeteroCacheConfig.from_dict`
    accepted it. Raises :class:`ConfigError` naming the variable (and the option, if one is wrong).
    """
    source = _config_source(environ)
    if source is None:
        return {}
    text, where = source
    try:
        options = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{where} is not valid JSON ({e.msg} at line {e.lineno} column {e.colno}): "
                          f"give a JSON object of HeteroCache options, e.g. {CONFIG_EXAMPLE}") from None
    if not isinstance(options, dict):
        kind = {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(type(options), "a number")
        raise ConfigError(f"{where} must be a JSON object of HeteroCache options, e.g. {CONFIG_EXAMPLE}; got {kind}")
    if set(options) == {ADDITIONAL_CONFIG_KEY}:
        raise ConfigError(f"{where} holds {{\"{ADDITIONAL_CONFIG_KEY}\": ...}}: give the options themselves, "
                          f"e.g. {CONFIG_EXAMPLE}")
    try:
        HeteroCacheConfig.from_dict(options)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    return options


def listen_address(environ: Mapping[str, str]) -> tuple[str, int]:
    """(host, port) from ``HETEROCACHE_HOST`` and ``HETEROCACHE_PORT`` (defaults 127.0.0.1, 8000)."""
    host = _value(environ, ENV_HOST) or DEFAULT_HOST
    raw = _value(environ, ENV_PORT)
    if raw is None:
        return host, DEFAULT_PORT
    if not (raw.isascii() and raw.isdigit() and 1 <= int(raw) <= 65535):
        # Kubernetes sets <SERVICE>_PORT=tcp://IP:PORT for every Service: one named heterocache sets this one.
        link = " (a Kubernetes Service link: set enableServiceLinks: false in the pod)" if "://" in raw else ""
        raise ConfigError(f"{ENV_PORT}={raw!r} is not a TCP port{link}: set it to a number from 1 to 65535")
    return host, int(raw)


def check_vllm_args(args: Sequence[str]) -> None:
    """Refuse arguments that would silently fight the ones :func:`build_command` sets."""
    if args and not args[0].startswith("-"):
        raise ConfigError(f"heterocache serve takes the model from {ENV_MODEL}, not from its arguments "
                          f"(got {args[0]!r}): set {ENV_MODEL}={args[0]} and pass vllm serve's flags only")
    for arg in args:
        if not arg.startswith("--"):
            continue
        # vLLM reads --attention_backend as --attention-backend, and --additional-config.key=value as a
        # piece of --additional-config.
        flag = arg.split("=", 1)[0].split(".", 1)[0].replace("_", "-")
        if flag in RESERVED_FLAGS:
            raise ConfigError(f"{arg.split('=', 1)[0]} is set by heterocache serve: {RESERVED_FLAGS[flag]}")


def model_argument(environ: Mapping[str, str], default_model: Callable[[], Path]) -> tuple[str, tuple[str, ...]]:
    """(model, its flags): ``HETEROCACHE_MODEL`` with none, else the embedded default with its own."""
    raw = _value(environ, ENV_MODEL)
    if raw is None:
        try:
            return str(default_model()), DEFAULT_MODEL_FLAGS
        except PreparationError as e:
            raise ConfigError(f"{ENV_MODEL} is not set and the embedded default model is not available ({e}); "
                              f"set {ENV_MODEL} to a model folder or a Hugging Face model name") from None
    path = Path(raw).expanduser()
    if raw.startswith(("/", "./", "../", "~")) and not path.is_dir():
        raise ConfigError(f"{ENV_MODEL}={raw!r} is not a folder: mount the model there, or set {ENV_MODEL} "
                          "to a Hugging Face model name")
    return (str(path) if raw.startswith("~") else raw), ()


def vllm_command(vllm: str, model: str, host: str, port: int, options: Mapping[str, Any], *,
                 model_flags: Sequence[str] = (), extra: Sequence[str] = ()) -> list[str]:
    """The ``vllm serve`` command line serving ``model`` with the HeteroCache backend and ``options``."""
    return [
        vllm, "serve", model, "--host", host, "--port", str(port),
        "--attention-backend", "heterocache", "--additional-config", json.dumps({ADDITIONAL_CONFIG_KEY: dict(options)}),
        *model_flags, *extra,
    ]


def build_command(environ: Mapping[str, str], args: Sequence[str], *, vllm: str,
                  default_model: Callable[[], Path]) -> list[str]:
    """The ``vllm serve`` command line for ``environ`` (the variables above) and ``args``.

    ``default_model`` returns the embedded model's folder; it is called only when
    ``HETEROCACHE_MODEL`` is unset, after everything else was checked.
    """
    options = heterocache_options(environ)
    host, port = listen_address(environ)
    check_vllm_args(args)
    model, model_flags = model_argument(environ, default_model)
    return vllm_command(vllm, model, host, port, options, model_flags=model_flags, extra=args)


def vllm_executable() -> str:
    """The ``vllm`` command of this interpreter's environment, else the one on PATH."""
    found = shutil.which("vllm", path=str(Path(sys.executable).parent)) or shutil.which("vllm")
    if found is None:
        raise HeteroCacheError(f"the vllm command is neither next to {sys.executable} nor on PATH: install vLLM "
                               "into this environment (scripts/bootstrap.sh does)")
    return found


def main(argv: Sequence[str]) -> int:
    """Check the environment and ``argv``, then exec ``vllm serve`` (or print it: ``--print-command``)."""
    parser = argparse.ArgumentParser(prog="heterocache serve", description=__doc__, allow_abbrev=False,
                                     usage="%(prog)s [-h] [--print-command] [VLLM_SERVE_ARGS ...]",
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Any other argument goes to vllm serve (see `vllm serve --help`).")
    parser.add_argument("--print-command", action="store_true",
                        help="print the vllm serve command line instead of running it")
    ours, vllm_args = parser.parse_known_args(argv)
    env.check()  # the other HETEROCACHE_* variables: a bad value stops here, not in the engine
    cmd = build_command(os.environ, vllm_args, vllm=vllm_executable(), default_model=prepare_default_model)
    if ours.print_command:
        print(shlex.join(cmd))
        return 0
    # vLLM's CPU linear layers compile a oneDNN primitive per weight shape and token count; oneDNN
    # keeps 1,024 (~0.3 MiB each on SmolLM2-sized layers): RSS creeps up for thousands of requests
    # (README, Performance: soak). 128 is filled by a warm-up and then holds.
    os.environ.setdefault(ONEDNN_CACHE_ENV, ONEDNN_CACHE_CAPACITY)
    print(f"heterocache serve: exec {shlex.join(cmd)}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os.execvp(cmd[0], cmd)  # does not return: this process is vllm serve from here on
