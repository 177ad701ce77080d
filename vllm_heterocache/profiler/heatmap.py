"""Heatmap PNG of a profile's head types: one row per layer, one column per KV head.

Cells are coloured by type; a satellite cell shows the index of its pivot, a pivot cell its own
index, anchor cells their budget ratio. Drawn with Pillow (a vLLM dependency) only.
"""

from __future__ import annotations

import os

from PIL import Image, ImageDraw, ImageFont

from vllm_heterocache.head_profile.schema import HeadProfile, HeadType

COLORS = {
    HeadType.VOLATILE: (214, 69, 65),
    HeadType.PIVOT: (240, 160, 40),
    HeadType.ANCHOR: (60, 110, 200),
    HeadType.SATELLITE: (120, 190, 120),
}
_CELL_W, _CELL_H, _LEFT, _TOP = 44, 16, 44, 64


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has one fixed-size bitmap font
        return ImageFont.load_default()


def render_heatmap(profile: HeadProfile, path: str | os.PathLike) -> None:
    layers, heads = profile.num_layers, profile.num_kv_heads
    legend_h = 22
    width = _LEFT + heads * _CELL_W + 16
    width = max(width, 430)
    height = _TOP + layers * _CELL_H + legend_h + 16
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    font, small = _font(12), _font(10)
    draw.text((8, 6), f"Head types: {profile.model.name}", fill="black", font=font)
    counts = profile.counts()
    draw.text((8, 24), "  ".join(f"{k} {v}" for k, v in counts.items()), fill="black", font=small)
    for h in range(heads):
        draw.text((_LEFT + h * _CELL_W + _CELL_W // 2 - 6, _TOP - 16), f"h{h}", fill="black", font=small)
    for layer in range(layers):
        y = _TOP + layer * _CELL_H
        draw.text((8, y + 2), f"L{layer}", fill="black", font=small)
        for h, t in enumerate(profile.head_types[layer]):
            x = _LEFT + h * _CELL_W
            draw.rectangle([x, y, x + _CELL_W - 2, y + _CELL_H - 2], fill=COLORS[t])
            if t is HeadType.SATELLITE:
                label = f"<{profile.pivot_of(layer, h)}"
            elif t is HeadType.PIVOT:
                label = f"P{h}"
            elif t is HeadType.ANCHOR:
                label = f"{profile.budget_ratios[layer][h]:.2f}"
            else:
                label = ""
            draw.text((x + 4, y + 2), label, fill="black", font=small)
    y = _TOP + layers * _CELL_H + 8
    x = 8
    for t, color in COLORS.items():
        draw.rectangle([x, y, x + 12, y + 12], fill=color)
        draw.text((x + 16, y), t.value, fill="black", font=small)
        x += 100
    img.save(path, format="PNG")
