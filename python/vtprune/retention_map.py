"""Retention maps: which image patches each stage kept, drew as one panel per stage (needs pillow).

A patch is shown as is when its token survives the stage as a dominant token, tinted orange when it is a
contextual token's target (the merged tokens carry its position), and darkened when it was dropped or merged.
"""

from __future__ import annotations


def save_retention_map(path, selections, grid: int, image=None, *, cell: int = 14) -> None:
    """Save a PNG with one panel per stage.

    Parameters
    ----------
    path : str or Path  output file
    selections : list of dict  ``handle.stats.selections`` (patch indices in raster order; -1 = [CLS])
    grid : int  patches per side (24 for LLaVA-1.5)
    image : PIL.Image, optional  drawn under the overlay (resized to the grid); gray when None
    cell : int  pixels per patch in the output
    """
    try:
        from PIL import Image, ImageDraw
    except ImportError as e:
        raise ImportError("retention maps need pillow: pip install 'vtprune[demo]'") from e
    if not selections:
        raise ValueError("selections is empty: run a prefill with an image through the patched model first")
    side = grid * cell
    base = (image.convert("RGB").resize((side, side)) if image is not None
            else Image.new("RGB", (side, side), (150, 150, 150)))
    label = 16
    sheet = Image.new("RGB", (len(selections) * (side + 4), side + label), (255, 255, 255))
    for i, sel in enumerate(selections):
        panel = base.copy()
        shade = Image.new("RGBA", (side, side), (0, 0, 0, 0))
        draw = ImageDraw.Draw(shade)
        kept = {p for p in sel["kept"] if p >= 0}
        targets = {p for p in sel["contextual"] if p >= 0}
        for p in range(grid * grid):
            box = ((p % grid) * cell, (p // grid) * cell, (p % grid + 1) * cell - 1, (p // grid + 1) * cell - 1)
            if p in targets:
                draw.rectangle(box, fill=(255, 140, 0, 120))
            elif p not in kept:
                draw.rectangle(box, fill=(0, 0, 0, 170))
        panel = Image.alpha_composite(panel.convert("RGBA"), shade).convert("RGB")
        x = i * (side + 4)
        sheet.paste(panel, (x, label))
        ImageDraw.Draw(sheet).text((x + 2, 2), f"{sel['stage']}: {len(kept)}+{len(targets)}", fill=(0, 0, 0))
    sheet.save(path)
