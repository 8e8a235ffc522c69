"""recipes/: the committed method configs are what recipes/make_recipes.py writes, all load, and each meets the
average visual-token budget its name states (LLaVA-1.5-7B: 576 image tokens, 32 decoder layers)."""

import importlib.util
import json
import pathlib

import pytest

from vtprune.config import load_method
from vtprune.methods.schedule import resolve_count

ROOT = pathlib.Path(__file__).resolve().parents[1] / "recipes"
FILES = sorted(ROOT.glob("*/*.json"))


def make_recipes():
    spec = importlib.util.spec_from_file_location("make_recipes", ROOT / "make_recipes.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_recipes_are_generated(tmp_path):
    written = make_recipes().write(str(tmp_path))
    assert sorted(pathlib.Path(p).relative_to(tmp_path) for p in written) == [f.relative_to(ROOT) for f in FILES]
    for f in FILES:
        assert json.loads(f.read_text()) == json.loads((tmp_path / f.relative_to(ROOT)).read_text()), f


def average_tokens(method, layers=32, image=576):
    """Mean visual tokens over the decoder layers of a plan (per 576-token image / tile)."""
    plan = method.plan(layers)
    current = image
    if plan.encoder is not None:
        enc = plan.encoder
        current = resolve_count(enc.dominant, image, image) + resolve_count(enc.contextual, image, image)
    per_layer, stages = [], {s.layer: s for s in plan.stages}
    for layer in range(layers):
        if layer in stages:
            s = stages[layer]
            current = resolve_count(s.dominant, image, current) + resolve_count(s.contextual, image, current)
        per_layer.append(current)
    return sum(per_layer) / layers


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_recipe_loads_and_meets_its_budget(path):
    method = load_method(path)
    stem = path.stem
    if method.name == "alvts":
        assert method.factors.endswith(".alvts.safetensors") and method.first_layer == 0
        return
    per_tile = {"640": 128, "320": 64, "160": 32}
    budget = stem.rsplit("-", 1)[-1] if "official" not in stem else "32"
    if budget.startswith("r"):  # a fraction of the image (dynamic resolution)
        if method.name == "visiondrop":
            assert method.ratio == float(budget[1:])
        else:
            assert average_tokens(method) == pytest.approx(576 * float(budget[1:]), abs=1)
        return
    target = per_tile[budget] if path.parent.name == "llava-next-7b" else int(budget)
    got = average_tokens(method)
    if method.name == "pool":
        assert got == round(target**0.5) ** 2  # the nearest square grid
    else:
        assert got == pytest.approx(target, abs=1), (path.name, got)
