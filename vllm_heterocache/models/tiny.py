"""A tiny random-weight Llama with grouped-query attention, built locally in a few seconds.

For tests and profiling: no downloads. The tokenizer is a byte-level BPE trained on a bounded sample
of the public-domain texts in :mod:`vllm_heterocache.data.texts`, with ChatML special tokens and
chat template. The weights are random (seeded), with the query/key projections scaled up per head
so attention is peaky in some heads and diffuse in others, as in trained models. Two builds with
the same parameters give byte-identical files.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from vllm_heterocache.errors import ConfigError
from vllm_heterocache.models.cache import cache_dir, ensure_built


# Bump when the build changes in a way the parameters do not show, so existing folders are rebuilt.
RECIPE_VERSION = 1
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
BOS_TOKEN, EOS_TOKEN, PAD_TOKEN = "<|im_start|>", "<|im_end|>", "<|endoftext|>"
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Tokenizer training text: TRAIN_DOCS passages of TRAIN_CHARS characters (~2 MB, < 1 s to train).
TRAIN_DOCS, TRAIN_CHARS = 64, 32_000
INITIALIZER_RANGE = 0.02
# Per-query-head scale of q_proj, spread geometrically over this range, and the scale of k_proj.
# Unscaled random attention logits have a std of ~0.1 (nearly uniform attention); these give
# logit stds from ~0.4 (diffuse heads) to ~5 (peaky heads).
Q_SCALE_RANGE = (1.0, 12.0)
K_SCALE = 4.0


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"build_tiny_model: {name} must be a positive int, got {value!r}")
    return value


def _recipe(params: dict[str, Any]) -> dict[str, Any]:
    for name, value in params.items():
        if name == "seed":
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"build_tiny_model: seed must be a non-negative int, got {value!r}")
        elif name == "rope_theta":
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise ConfigError(f"build_tiny_model: rope_theta must be a positive number, got {value!r}")
        else:
            _positive_int(name, value)
    if params["num_attention_heads"] % params["num_key_value_heads"]:
        raise ConfigError(
            "build_tiny_model: num_attention_heads must be a multiple of num_key_value_heads, "
            f"got {params['num_attention_heads']} and {params['num_key_value_heads']}"
        )
    if params["head_dim"] % 2:
        raise ConfigError(f"build_tiny_model: head_dim must be even (RoPE rotates pairs), got {params['head_dim']}")
    minimum_vocab = 256 + len(SPECIAL_TOKENS) + 1
    if params["vocab_size"] < minimum_vocab:
        raise ConfigError(
            f"build_tiny_model: vocab_size must be at least {minimum_vocab} (256 bytes + special "
            f"tokens + merges), got {params['vocab_size']}"
        )
    return {
        "recipe_version": RECIPE_VERSION,
        "model": "LlamaForCausalLM",
        **params,
        "rope_theta": float(params["rope_theta"]),
        "tokenizer": {"train_docs": TRAIN_DOCS, "train_chars": TRAIN_CHARS, "special_tokens": list(SPECIAL_TOKENS)},
        "init": {"initializer_range": INITIALIZER_RANGE, "q_scale_range": list(Q_SCALE_RANGE), "k_scale": K_SCALE},
    }


def recipe_hash(recipe: dict[str, Any]) -> str:
    """Short (12 hex digits) hash of a recipe, used in the default folder name."""
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]


def _train_tokenizer(vocab_size: int, max_len: int) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from vllm_heterocache.data.texts import documents

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(documents(TRAIN_DOCS, TRAIN_CHARS), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        chat_template=CHAT_TEMPLATE,
        model_max_length=max_len,
    )


def _build(recipe: dict[str, Any], out: Path) -> None:
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    tokenizer = _train_tokenizer(recipe["vocab_size"], recipe["max_position_embeddings"])
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in SPECIAL_TOKENS}
    config = LlamaConfig(
        vocab_size=recipe["vocab_size"],
        hidden_size=recipe["hidden_size"],
        intermediate_size=recipe["intermediate_size"],
        num_hidden_layers=recipe["num_layers"],
        num_attention_heads=recipe["num_attention_heads"],
        num_key_value_heads=recipe["num_key_value_heads"],
        head_dim=recipe["head_dim"],
        max_position_embeddings=recipe["max_position_embeddings"],
        rope_parameters={"rope_type": "default", "rope_theta": recipe["rope_theta"]},
        initializer_range=INITIALIZER_RANGE,
        tie_word_embeddings=False,
        bos_token_id=ids[BOS_TOKEN],
        eos_token_id=ids[EOS_TOKEN],
        pad_token_id=ids[PAD_TOKEN],
        dtype="float32",
    )
    heads, head_dim = recipe["num_attention_heads"], recipe["head_dim"]
    low, high = Q_SCALE_RANGE
    with torch.random.fork_rng(devices=[]):  # leave the caller's RNG state alone
        torch.manual_seed(recipe["seed"])
        model = LlamaForCausalLM(config).to(torch.float32).eval()
        with torch.no_grad():
            for layer_index, layer in enumerate(model.model.layers):
                # Rotate the spread per layer so each layer has peaky and diffuse heads in other places.
                order = (torch.arange(heads) + layer_index) % heads
                scales = low * (high / low) ** (order / max(heads - 1, 1))
                attn = layer.self_attn
                attn.q_proj.weight.mul_(scales.repeat_interleave(head_dim)[:, None])
                attn.k_proj.weight.mul_(K_SCALE)
    model.generation_config = GenerationConfig(
        bos_token_id=ids[BOS_TOKEN], eos_token_id=ids[EOS_TOKEN], pad_token_id=ids[PAD_TOKEN]
    )
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    config_path = out / "config.json"
    saved = json.loads(config_path.read_text())
    saved["rope_theta"] = recipe["rope_theta"]  # older loaders and vLLM read the top-level key
    saved["torch_dtype"] = saved["dtype"]  # transformers < 5 reads torch_dtype
    config_path.write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n")


def build_tiny_model(
    out_dir: Path | None = None,
    *,
    num_layers: int = 4,
    hidden_size: int = 256,
    num_attention_heads: int = 8,
    num_key_value_heads: int = 2,
    head_dim: int = 64,
    intermediate_size: int = 512,
    vocab_size: int = 4096,
    max_position_embeddings: int = 131072,
    seed: int = 0,
    rope_theta: float = 500_000.0,
    force: bool = False,
) -> Path:
    """Build (or reuse) a tiny random-weight ``LlamaForCausalLM`` and return its folder.

    The default folder is ``<cache_dir()>/models/tiny-llama-<hash of the parameters>``. A folder
    whose manifest verifies against the same parameters is returned as is unless ``force=True``.
    Weights are float32 safetensors; the tokenizer is a byte-level BPE with ChatML tokens
    (``eos_token_id`` is ``<|im_end|>``). Raises :class:`ConfigError` for invalid parameters.
    """
    params = {
        "num_layers": num_layers,
        "hidden_size": hidden_size,
        "num_attention_heads": num_attention_heads,
        "num_key_value_heads": num_key_value_heads,
        "head_dim": head_dim,
        "intermediate_size": intermediate_size,
        "vocab_size": vocab_size,
        "max_position_embeddings": max_position_embeddings,
        "seed": seed,
        "rope_theta": rope_theta,
    }
    recipe = _recipe(params)
    target = Path(out_dir) if out_dir is not None else cache_dir() / "models" / f"tiny-llama-{recipe_hash(recipe)}"
    return ensure_built(target, recipe, lambda staging: _build(recipe, staging), force=force, what="tiny Llama")
