"""Per-head top-k attention sets of a Hugging Face causal LM at prefill and over decode steps.

For each calibration prompt of L tokens and each (layer, KV head) this records, as int64:

    prefill_topk  [layers, Hkv, k]     from the attention row of the last prompt token
    decode_topk   [T, layers, Hkv, k]  from the attention row of each of T greedy decode steps

A row's scores over the L prompt positions are pooled (odd kernel) and reduced over the query
heads of the GQA group (max or mean), exactly like the runtime scoring, then the top k positions
(ties: lower position) form the set. The model runs with eager attention so that attention
probabilities are visible; forward hooks on every attention module keep only the last row.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from vllm_heterocache.ops.reference import pool_scores


@dataclass(frozen=True)
class PromptTopK:
    prompt_len: int
    prefill_topk: torch.Tensor  # int64 [layers, Hkv, k]
    decode_topk: torch.Tensor  # int64 [T, layers, Hkv, k]


def attention_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The self-attention module of every decoder layer, in layer order."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    layers = getattr(decoder, "layers", None)
    if layers is None or not all(hasattr(layer, "self_attn") for layer in layers):
        raise ValueError(
            f"{type(model).__name__}: cannot find decoder layers with a `self_attn` module; "
            "the profiler supports Llama-style decoder-only models"
        )
    return [layer.self_attn for layer in layers]


def _reduce(rows: torch.Tensor, prompt_len: int, num_kv_heads: int, pool_kernel: int, gqa: str) -> torch.Tensor:
    """``[Hq, T]`` probabilities -> ``[Hkv, L]`` scores over the prompt positions."""
    scores = pool_scores(rows[:, :prompt_len].float(), pool_kernel)
    grouped = scores.reshape(num_kv_heads, -1, prompt_len)
    return grouped.amax(1) if gqa == "max" else grouped.mean(1)


def _topk(scores: torch.Tensor, k: int) -> torch.Tensor:
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    return order[..., :k].sort(dim=-1).values


class _LastRowRecorder:
    """Forward hooks that keep only the last query row of each layer's attention weights."""

    def __init__(self, modules: list[torch.nn.Module]):
        self.rows: list[torch.Tensor | None] = [None] * len(modules)
        self.handles = [m.register_forward_hook(self._hook(i)) for i, m in enumerate(modules)]

    def _hook(self, index: int):
        def hook(module, args, output):
            weights = output[1] if isinstance(output, tuple) and len(output) > 1 else None
            if weights is None:
                raise RuntimeError(
                    "attention module returned no weights: load the model with attn_implementation='eager'"
                )
            self.rows[index] = weights[0, :, -1, :].detach().float()  # [Hq, T]
            return (output[0], None, *output[2:])

        return hook

    def close(self) -> None:
        for h in self.handles:
            h.remove()


@torch.inference_mode()
def collect_prompt(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    *,
    num_kv_heads: int,
    decode_steps: int,
    topk: int,
    pool_kernel: int,
    gqa_reduce: str,
    progress=None,
) -> PromptTopK:
    """Prefill ``input_ids`` (``[1, L]``), then decode greedily, recording top-k sets.

    ``progress`` (a tqdm bar or None) advances by one per forward pass.
    """
    tick = progress.update if progress is not None else (lambda n: None)
    modules = attention_modules(model)
    prompt_len = input_ids.shape[1]
    recorder = _LastRowRecorder(modules)
    try:
        def sets() -> torch.Tensor:
            return torch.stack(
                [_topk(_reduce(r, prompt_len, num_kv_heads, pool_kernel, gqa_reduce), topk) for r in recorder.rows]
            )

        out = model(input_ids=input_ids, use_cache=True)
        prefill = sets()
        tick(1)
        cache, decode = out.past_key_values, []
        token = out.logits[:, -1:].argmax(-1)
        for _ in range(decode_steps):
            out = model(input_ids=token, past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            decode.append(sets())
            tick(1)
            token = out.logits[:, -1:].argmax(-1)
    finally:
        recorder.close()
    return PromptTopK(prompt_len, prefill, torch.stack(decode))


def collect(
    model: torch.nn.Module,
    prompts: Iterable[torch.Tensor],
    *,
    num_kv_heads: int,
    decode_steps: int,
    topk_fraction: float | None,
    topk: int | None,
    pool_kernel: int,
    gqa_reduce: str,
    progress=None,
) -> list[PromptTopK]:
    """:func:`collect_prompt` over several prompts; k is ``topk`` or ``topk_fraction * L``."""
    results = []
    for ids in prompts:
        k = topk if topk is not None else max(1, int(round(topk_fraction * ids.shape[1])))
        k = min(k, ids.shape[1])
        results.append(
            collect_prompt(
                model, ids, num_kv_heads=num_kv_heads, decode_steps=decode_steps, topk=k,
                pool_kernel=pool_kernel, gqa_reduce=gqa_reduce, progress=progress,
            )
        )
    return results
