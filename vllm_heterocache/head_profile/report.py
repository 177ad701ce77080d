"""Plain-text summary of a head profile (the table the profiler and `heterocache show` print)."""

from __future__ import annotations

from vllm_heterocache.head_profile.schema import HeadProfile, HeadType

_LETTER = {HeadType.VOLATILE: "V", HeadType.PIVOT: "P", HeadType.ANCHOR: "A", HeadType.SATELLITE: "s"}


def summary_table(profile: HeadProfile, *, per_layer: bool = True) -> str:
    """Counts per head type, budget-ratio range, and one line per layer (V P A s letters)."""
    counts = profile.counts()
    total = sum(counts.values())
    m = profile.model
    lines = [
        f"model {m.name} ({m.architecture}): {m.num_layers} layers x {m.num_kv_heads} KV heads "
        f"= {total} heads, head_dim {m.head_dim}",
        f"{'type':<10} {'heads':>6} {'share':>7}",
    ]
    for t in HeadType:
        lines.append(f"{t.value:<10} {counts[t.value]:>6} {counts[t.value] / total:>7.1%}")
    full = profile.num_full_heads()
    lines.append(
        f"{'full':<10} {full:>6} {full / total:>7.1%}   (volatile + pivot; a compression ratio must exceed {full / total:.3f})"
    )
    ratios = [r for row in profile.budget_ratios for r in row if r is not None]
    if ratios:
        lines.append(f"budget ratios of compressed heads: min {min(ratios):.3f}  max {max(ratios):.3f}  mean {sum(ratios) / len(ratios):.3f}")
    lines.append(f"clusters: {len(profile.clusters)} (pivot -> satellites)")
    if per_layer:
        lines.append("per layer (V volatile, P pivot, A anchor, s satellite; clusters as pivot<-satellites):")
        for layer, row in enumerate(profile.head_types):
            letters = " ".join(_LETTER[t] for t in row)
            cl = " ".join(f"{c.pivot}<-{','.join(map(str, c.satellites))}" for c in profile.clusters_of_layer(layer))
            lines.append(f"  L{layer:02d}  {letters}   {cl}")
    return "\n".join(lines)
