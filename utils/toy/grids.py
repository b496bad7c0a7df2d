"""Pictures of toy measurements: rows labelled by prompt, one block of images per model (same seeds)."""
from __future__ import annotations

from typing import Sequence

from PIL import Image, ImageDraw, ImageFont

from utils.toy.measure import Item, neighbours_of


def panel_grid(panels: Sequence[tuple[str, dict[str, list[Image.Image]]]], show: int = 6, scale: int = 2) -> Image.Image:
    """Rows labelled by prompt; one block of `show` images per panel (e.g. before | after), titled on top."""
    font = ImageFont.load_default()
    prompts = list(panels[0][1])
    show = max(1, min(show, max(len(v) for _, imgs in panels for v in imgs.values())))
    size = next(iter(panels[0][1].values()))[0].size[0]
    cell, gap, label_w, title_h = size * scale, 2, 150, 14
    block_w = show * (cell + gap)
    grid = Image.new("RGB", (label_w + len(panels) * (block_w + 12), title_h + len(prompts) * (cell + gap)), (235, 235, 235))
    draw = ImageDraw.Draw(grid)
    for b, (title, imgs) in enumerate(panels):
        x0 = label_w + b * (block_w + 12)
        draw.text((x0, 1), title, fill=(0, 0, 0), font=font)
        if b:
            draw.line([(x0 - 7, 0), (x0 - 7, grid.height)], fill=(120, 120, 120), width=2)
        for r, p in enumerate(prompts):
            for j, im in enumerate(imgs[p][:show]):
                grid.paste(im.resize((cell, cell), Image.Resampling.NEAREST), (x0 + j * (cell + gap), title_h + r * (cell + gap)))
    for r, p in enumerate(prompts):
        draw.text((2, title_h + r * (cell + gap) + cell // 2 - 6), p or '""', fill=(0, 0, 0), font=font)
    return grid


def _by_prompt(items: Sequence[Item], images: Sequence[Image.Image], keep: set[str]) -> dict[str, list[Image.Image]]:
    out: dict[str, list[Image.Image]] = {}
    for it, im in zip(items, images):
        if it.prompt in keep:
            out.setdefault(it.prompt, []).append(im)
    return out


def _pick(items: Sequence[Item], group: str, colour: str | None, k: int) -> list[str]:
    return list(dict.fromkeys(it.prompt for it in items if it.group == group and it.colour == colour))[:k]


def before_after_grid(items: Sequence[Item], before: Sequence[Image.Image], after: Sequence[Image.Image],
                      concepts: Sequence[str], show: int = 6) -> Image.Image:
    """Erased colours (explicit, paraphrase, implied rows), then the neighbour and the other colours: before | after."""
    rows: list[str] = []
    for c in concepts:
        rows += _pick(items, "explicit", c, 3) + _pick(items, "paraphrase", c, 2) + _pick(items, "implied", c, 3)
    kept = list(dict.fromkeys(it.colour for it in items if it.group == "keep"))
    neighbours = neighbours_of(concepts)
    for c in sorted(kept, key=lambda c: c not in neighbours):
        rows += _pick(items, "keep", c, 3 if c in neighbours else 1)
    keep = set(rows)
    b, a = _by_prompt(items, before, keep), _by_prompt(items, after, keep)
    return panel_grid([("before", {p: b[p] for p in rows}), ("after (same seeds)", {p: a[p] for p in rows})], show)


def quality_grid(items: Sequence[Item], images: Sequence[Image.Image], show: int = 6) -> Image.Image:
    """Per colour one explicit, one paraphrase and one implied row, then the empty prompt."""
    colours = list(dict.fromkeys(it.colour for it in items if it.colour))
    rows = [p for c in colours for g in ("explicit", "paraphrase", "implied") for p in _pick(items, g, c, 1)]
    rows += _pick(items, "empty", None, 1)
    imgs = _by_prompt(items, images, set(rows))
    return panel_grid([("base model", {p: imgs[p] for p in rows})], show)
