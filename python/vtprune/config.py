"""Method configs as data: every method round-trips through a small dict, JSON or YAML file.

A config is ``{"method": name, "args": {...}, "vtprune_version": ..., "model_fingerprint": {...}}``: ``args``
are the method's public constructor arguments (only those that differ from a plain construction are needed;
the shared budget ``average`` replaces a method's native budget knobs),
``model_fingerprint`` (optional) names the model the config was made for (see
:func:`vtprune.alvts.factors.model_fingerprint`) and is checked when a model is given at load time. An ALVTS
``factors`` file is referenced by path; a relative path in a config file is relative to that file.

Example
-------
>>> cfg = to_config(VisionDrop(tokens=128))
>>> cfg["method"], cfg["args"]
('visiondrop', {'tokens': 128, 'backend': 'auto'})
>>> save_method(VisionDrop(tokens=128), "vd128.json"); method = load_method("vd128.json")
"""

from __future__ import annotations

import json
import os

from vtprune import methods

FORMAT_KEYS = ("method", "args", "vtprune_version", "model_fingerprint")


def _visiondrop(m) -> dict:
    if m.average is not None:
        return {"average": m.average, "backend": m.backend}
    if m._explicit:
        enc = None if m._encoder is None else [m._encoder.dominant, m._encoder.contextual]
        stages = None if m._stages is None else {str(s.layer): [s.dominant, s.contextual] for s in m._stages}
        return {"encoder": enc, "stages": stages, "backend": m.backend}
    if m.ratio is not None:
        return {"ratio": m.ratio, "backend": m.backend}
    return {"tokens": m.tokens, "backend": m.backend}


def _alvts(m) -> dict:
    from vtprune.alvts.factors import SelectorFactors

    if isinstance(m.factors, SelectorFactors):
        raise ValueError("ALVTS factors are an in-memory SelectorFactors: save them (factors.save(path)) and pass "
                         "ALVTS(factors=path) to make a config that refers to the file")
    if m.calibration is not None:
        raise ValueError("ALVTS calibration= holds data batches that a config cannot carry: calibrate once "
                         "(vtprune calibrate ... --out factors.safetensors) and pass ALVTS(factors=path)")
    budget = {"average": m.average} if m.average is not None else \
        {"ratio": m.ratio} if m.ratio is not None else {"keep": m.keep}
    factors = None if m.factors is None else os.fspath(m.factors)
    return {**budget, "rank": m.rank, "first_layer": m.first_layer, "factors": factors, "backend": m.backend}


def _budget(m, **native) -> dict:
    """The budget arguments: the shared ``average`` where it was given, else the method's native knobs."""
    return {"average": m.average} if m.average is not None else native


# name -> (class name in vtprune.methods, public constructor arguments of an instance)
REGISTRY = {
    "visiondrop": ("VisionDrop", _visiondrop),
    "alvts": ("ALVTS", _alvts),
    "fastv": ("FastV", lambda m: {"layer": m.layer, **_budget(m, **({"tokens": m.tokens} if m.tokens is not None
                                                                    else {"ratio": m.ratio})),
                                  "backend": m.backend}),
    "visionzip": ("VisionZip", lambda m: {**_budget(m, dominant=m.encoder.dominant, contextual=m.encoder.contextual),
                                          "backend": m.backend}),
    "pyramiddrop": ("PyramidDrop", lambda m: {**_budget(m, ratio=m.ratio), "layers": None if m.layers is None
                                              else list(m.layers), "backend": m.backend}),
    "pool": ("UniformPool", lambda m: {**_budget(m, tokens=m.tokens), "backend": m.backend}),
}


def _version() -> str:
    from vtprune import __version__

    return __version__


def to_config(method, *, model=None) -> dict:
    """The config dict of a method object (JSON-serialisable).

    Parameters
    ----------
    method : a VisionDrop, ALVTS, FastV, VisionZip, PyramidDrop or UniformPool
    model : optional model (or its decoder layers) whose fingerprint is recorded

    Returns
    -------
    dict ``{"method", "args", "vtprune_version"[, "model_fingerprint"]}``
    """
    name = getattr(method, "name", None)
    if name not in REGISTRY or type(method).__name__ != REGISTRY[name][0]:
        raise ValueError(f"method must be one of {', '.join(c for c, _ in REGISTRY.values())}, got "
                         f"{type(method).__name__}")
    cfg = {"method": name, "args": REGISTRY[name][1](method), "vtprune_version": _version()}
    if model is not None:
        from vtprune.alvts.factors import model_fingerprint

        cfg["model_fingerprint"] = model_fingerprint(model)
    return cfg


def load_method(cfg, *, model=None):
    """A method object from a config dict or a config file path (``.json``, or ``.yaml``/``.yml`` with PyYAML).

    ``model`` (optional): the model the method will be applied to; a recorded ``model_fingerprint`` must match
    it. Every defect (unknown method, unknown or invalid argument, fingerprint mismatch) is a ``ValueError``.
    """
    if isinstance(cfg, (str, os.PathLike)):
        return load_method_file(cfg, model=model)
    if not isinstance(cfg, dict):
        raise ValueError(f"cfg must be a config dict or a file path, got {type(cfg).__name__}")
    unknown = sorted(set(cfg) - set(FORMAT_KEYS))
    if unknown:
        raise ValueError(f"config: unknown keys {unknown}; a config has {', '.join(FORMAT_KEYS)}")
    name = cfg.get("method")
    if name not in REGISTRY:
        raise ValueError(f"config: method must be one of {', '.join(REGISTRY)}, got {name!r}")
    args = cfg.get("args", {})
    if not isinstance(args, dict):
        raise ValueError(f"config: args must be a mapping of constructor arguments, got {args!r}")
    args = dict(args)
    if name == "visiondrop" and args.get("stages") is not None:
        stages = args["stages"]
        if not isinstance(stages, dict):
            raise ValueError(f"config: visiondrop stages must be a mapping layer -> [dominant, contextual], "
                             f"got {stages!r}")
        try:
            args["stages"] = {int(k): tuple(v) for k, v in stages.items()}
        except (TypeError, ValueError):
            raise ValueError(f"config: visiondrop stages keys must be layer numbers, got {list(stages)}") from None
    if name == "visiondrop" and args.get("encoder") is not None:
        args["encoder"] = tuple(args["encoder"])
    if name == "visiondrop" and args.get("encoder") is None and args.get("stages") is None:
        args.pop("encoder", None)
        args.pop("stages", None)
    cls = getattr(methods, REGISTRY[name][0])
    try:
        method = cls(**args)
    except TypeError as e:  # an argument the constructor does not take
        raise ValueError(f"config: {name} args {sorted(args)}: {e}") from None
    except ValueError as e:
        raise ValueError(f"config: {e}") from None
    if model is not None and cfg.get("model_fingerprint") is not None:
        _check_fingerprint(cfg["model_fingerprint"], model)
    return method


def _check_fingerprint(recorded: dict, model) -> None:
    from vtprune.alvts.factors import fingerprint_differences, model_fingerprint

    differ = fingerprint_differences(recorded, model_fingerprint(model), what="config")
    if differ:
        raise ValueError("config: made for a different model: " + "; ".join(differ))


def _is_yaml(path: str) -> bool:
    return path.lower().endswith((".yaml", ".yml"))


def _yaml():
    try:
        import yaml
    except ImportError:
        raise ValueError("YAML configs need PyYAML (pip install pyyaml); JSON configs work without it") from None
    return yaml


def load_method_file(path, *, model=None):
    """:func:`load_method` of a JSON or YAML file; a relative ALVTS ``factors`` path is relative to the file."""
    path = os.fspath(path)
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        cfg = _yaml().safe_load(text) if _is_yaml(path) else json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    except Exception as e:  # yaml.YAMLError and its subclasses
        if type(e).__module__.startswith("yaml"):
            raise ValueError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
        raise
    if isinstance(cfg, dict) and cfg.get("method") == "alvts" and isinstance(cfg.get("args"), dict):
        factors = cfg["args"].get("factors")
        if isinstance(factors, str) and not os.path.isabs(factors):
            cfg["args"] = {**cfg["args"], "factors": os.path.join(os.path.dirname(os.path.abspath(path)), factors)}
    try:
        return load_method(cfg, model=model)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


def save_method(method, path, *, model=None) -> dict:
    """Write :func:`to_config` of ``method`` to ``path`` (YAML for ``.yaml``/``.yml``, else JSON); returns it."""
    cfg = to_config(method, model=model)
    path = os.fspath(path)
    with open(path, "w", encoding="utf-8") as f:
        if _is_yaml(path):
            _yaml().safe_dump(cfg, f, sort_keys=False)
        else:
            json.dump(cfg, f, indent=2)
            f.write("\n")
    return cfg
