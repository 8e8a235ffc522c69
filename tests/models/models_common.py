"""Helpers shared by the model tests (not in conftest.py: test modules import them by name, and another test
folder's conftest module would shadow this folder's in a session that collects both)."""



SCHEDULE = dict(encoder=(12, 2), stages={1: (8, 2), 2: (6, 1), 3: (4, 1)})


_FAMILY_MODELS = {}


def family_model(family: str):
    """The tiny model of ``family`` (a ``TINY_FAMILIES`` key), built once per test process."""
    from vtprune.models._tiny import TINY_FAMILIES

    if family not in _FAMILY_MODELS:
        _FAMILY_MODELS[family] = TINY_FAMILIES[family].build()
    return _FAMILY_MODELS[family]


def family_model_and_batch(family: str):
    """(tiny model, two different prompts of different lengths, left-padded) of ``family``."""
    from vtprune.models._tiny import TINY_FAMILIES

    model = family_model(family)
    batch = TINY_FAMILIES[family].batch(model, (3, 7), (6, 4), seed=1)
    assert not batch["attention_mask"].all()  # row 0 really is padded
    return model, batch
