"""Write the method configs of the papers' tables (``python recipes/make_recipes.py``); tests check that the
committed files equal what this script writes and that each config meets its stated average budget.

Budgets are average visual tokens over the LLM layers (the papers' convention). LLaVA-1.5-7B: 576 image tokens,
32 decoder layers. LLaVA-NeXT-7B: the integer budgets of VisionDrop, FastV, VisionZip and UniformPool are per
336 px tile, so 128 / 64 / 32 per tile are 640 / 320 / 160 on a 5-tile image; ALVTS ``keep`` is per image.
"""

from __future__ import annotations

import json
import math
import os
import sys

from vtprune import ALVTS, FastV, PyramidDrop, UniformPool, VisionDrop, VisionZip
from vtprune.config import save_method
from vtprune.methods.visiondrop import preset

HERE = os.path.dirname(os.path.abspath(__file__))
LAYERS, IMAGE = 32, 576


def visiondrop(tokens: int) -> VisionDrop:
    """The preset schedule written out, so the config is fixed data (official rule: encoder 1.5x the average,
    stages after 8/16/24 layers, totals scaled from the official 48/35/26/19 at average 32, 7:1 splits)."""
    enc, *stages = preset(tokens)
    return VisionDrop(encoder=enc, stages=dict(zip((8, 16, 24), stages)))


def fastv(average: int) -> FastV:
    """FastV keeping T tokens after layer K: (K * 576 + (32 - K) T) / 32 = average; K = 2 (FastV's default) unless
    the first two full layers alone exceed the budget (average below 36), then K = 1."""
    for k in (2, 1):
        tokens = round((average * LAYERS - k * IMAGE) / (LAYERS - k))
        if tokens >= 1:
            return FastV(layer=k, tokens=tokens)
    raise ValueError(f"FastV cannot average {average} tokens of {IMAGE}")


def pyramiddrop(average: float) -> PyramidDrop:
    """PyramidDrop keeping lambda, lambda^2, lambda^3 of the image after its stage layers, lambda chosen so the
    mean over the 32 layers is ``average`` tokens of 576. Stages after 8/16/24 (the default) cannot go below an
    average of 144 (the first 8 layers see all 576), so smaller budgets move the stages to after 2/8/16 (1/8/16
    below an average of 40)."""
    layers = (8, 16, 24) if average >= 160 else (2, 8, 16) if average >= 40 else (1, 8, 16)
    spans = [b - a for a, b in zip((0, *layers), (*layers, LAYERS))]  # layers at each stage's count

    def mean(lam):
        return IMAGE * sum(n * lam**i for i, n in enumerate(spans)) / LAYERS

    lo, hi = 0.0, 1.0
    for _ in range(60):  # bisection on the increasing mean
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if mean(mid) < average else (lo, mid)
    return PyramidDrop(ratio=round(hi, 4), layers=None if layers == (8, 16, 24) else layers)


def visionzip(total: int) -> VisionZip:
    contextual = total * 10 // 64  # VisionZip's 54 + 10 split
    return VisionZip(dominant=total - contextual, contextual=contextual)


def pool(total: int) -> UniformPool:
    return UniformPool(tokens=round(math.sqrt(total)) ** 2)  # the nearest square grid


def recipes() -> dict[str, object]:
    out = {}
    for t in (192, 128, 64):  # VisionDrop Table 1 budgets, ALVTS keep 192/128/64 (down 67/78/89 %)
        out[f"llava-1.5-7b/visiondrop-{t}.json"] = visiondrop(t)
        out[f"llava-1.5-7b/alvts-keep{t}.json"] = ALVTS(keep=t, rank=256, first_layer=0,
                                                       factors="llava-1.5-7b.alvts.safetensors")
        out[f"llava-1.5-7b/fastv-{t}.json"] = fastv(t)
        out[f"llava-1.5-7b/pyramiddrop-{t}.json"] = pyramiddrop(t)
        out[f"llava-1.5-7b/visionzip-{t}.json"] = visionzip(t)
        out[f"llava-1.5-7b/pool-{t}.json"] = pool(t)
    out["llava-1.5-7b/visiondrop-32-official.json"] = VisionDrop(encoder=(42, 6),
                                                                 stages={8: (30, 5), 16: (22, 4), 24: (16, 3)})
    for per_tile, total in ((128, 640), (64, 320), (32, 160)):  # 5 tiles
        out[f"llava-next-7b/visiondrop-{total}.json"] = visiondrop(per_tile)
        out[f"llava-next-7b/fastv-{total}.json"] = fastv(per_tile)
        out[f"llava-next-7b/pyramiddrop-{total}.json"] = pyramiddrop(per_tile)
        out[f"llava-next-7b/visionzip-{total}.json"] = visionzip(per_tile)
    out["llava-next-7b/alvts-keep320.json"] = ALVTS(keep=320, rank=256, first_layer=0,
                                                    factors="llava-next-7b.alvts.safetensors")
    out["qwen2.5-vl-3b/alvts-r0.11.json"] = ALVTS(ratio=0.11, rank=128, first_layer=0,
                                                  factors="qwen2.5-vl-3b.alvts.safetensors")
    out["qwen2.5-vl-3b/visiondrop-r0.11.json"] = VisionDrop(ratio=0.11)
    out["qwen2.5-vl-3b/pyramiddrop-r0.11.json"] = pyramiddrop(0.11 * IMAGE)  # fractions: the image size cancels
    return out


def write(root: str = HERE) -> list[str]:
    paths = []
    for name, method in recipes().items():
        path = os.path.join(root, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        cfg = save_method(method, path)
        # the version is recorded by save_method; recipes are version-independent data, so drop it for stable diffs
        cfg.pop("vtprune_version")
        with open(path, "w", encoding="utf-8") as f:
            json.dump(cfg, f, indent=2)
            f.write("\n")
        paths.append(path)
    return paths


if __name__ == "__main__":
    for p in write(sys.argv[1] if len(sys.argv) > 1 else HERE):
        print(p)
