"""The tiny local lmms-eval tasks ``vtprune_tiny_gen`` (generation, exact match) and ``vtprune_tiny_mc``
(multiple choice by loglikelihood, accuracy): six questions about the colour of a shape, each image drawn from
its record (``vtprune_tiny.jsonl``: colour, shape, size), so nothing is downloaded and no image file is stored.
They check that the evaluation path runs and that a keep-all method scores exactly like the unpatched model;
with random-weight tiny models the scores themselves mean nothing.
"""

from __future__ import annotations

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 60), "blue": (40, 60, 220), "yellow": (230, 210, 40)}
CHOICES = list(COLOURS)


def doc_to_visual(doc) -> list:
    """The record's image: a grey canvas of its size with a coloured square or disc in the middle."""
    from PIL import Image, ImageDraw

    w, h = int(doc["width"]), int(doc["height"])
    img = Image.new("RGB", (w, h), (128, 128, 128))
    box = (w // 4, h // 4, 3 * w // 4, 3 * h // 4)
    draw = ImageDraw.Draw(img)
    (draw.rectangle if doc["shape"] == "square" else draw.ellipse)(box, fill=COLOURS[doc["colour"]])
    return [img]


def doc_to_text(doc, lmms_eval_specific_kwargs=None) -> str:
    kw = lmms_eval_specific_kwargs or {}
    return f"{kw.get('pre_prompt', '')}{doc['question']}{kw.get('post_prompt', '')}"


def doc_to_choice(doc) -> list:
    return CHOICES


def doc_to_target(doc) -> int:
    return CHOICES.index(doc["answer"])


def process_results(doc, results) -> dict:
    """Exact match of the generated answer (stripped, lower case, trailing full stop dropped)."""
    answer = results[0].strip().lower().rstrip(".")
    return {"exact_match": float(answer == doc["answer"])}
