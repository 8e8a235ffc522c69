"""The import layering of the op stack, read from the source (lazy imports inside functions included).

From the bottom: ``vtprune._host`` (nothing from vtprune) <- ``_ext``, ``_library``, ``_routed_fused`` <- the
kernel glue (``vtprune.triton_kernels``, ``vtprune.cuda``) and the executable spec (``vtprune.reference``) <-
``_backend`` <- the public ops (``vtprune.ops``). Kernels import neither the ops nor the reference, the
reference imports no backend, and no import cycle runs through these modules.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"vtprune": ROOT / "python" / "vtprune", "vtprune.triton_kernels": ROOT / "triton_kernels"}

# No exceptions: every kernel launcher imports the low modules directly. Nothing may be added here.
KNOWN: set = set()

LOW = ("vtprune._host", "vtprune._ext", "vtprune._library", "vtprune._routed_fused", "vtprune._compat")
HIGH = ("vtprune.api", "vtprune.models", "vtprune.methods", "vtprune.alvts", "vtprune.cli")


def _modules() -> dict[str, Path]:
    found = {}
    for package, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = path.relative_to(folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            name = ".".join((package, *parts))
            if package == "vtprune" and parts[:1] == ("triton_kernels",):
                continue  # a build copy, if any: the source folder is the truth
            found[name] = path
    return found


def _imports(path: Path, *, top_level_only: bool = False) -> set[str]:
    """vtprune modules imported by the file (``from a import b`` counts ``a.b`` when that is a module)."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else ast.walk(tree)
    out = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
            out |= {f"{node.module}.{a.name}" for a in node.names}
    return {m for m in out if m == "vtprune" or m.startswith("vtprune.")}


MODULES = _modules()


def _edges(name: str, **kw) -> set[str]:
    return {m for m in _imports(MODULES[name], **kw) if m in MODULES and m != name}


def _under(module: str, prefixes) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def _violations(sources, forbidden) -> list[tuple[str, str]]:
    bad = []
    for name in MODULES:
        if _under(name, sources):
            bad += [(name, m) for m in sorted(_edges(name)) if _under(m, forbidden) and (name, m) not in KNOWN]
    return bad


def test_the_scan_sees_the_stack():
    for name in (
        "vtprune._host",
        "vtprune._backend",
        "vtprune.ops.attention_scores",
        "vtprune.reference._common",
        "vtprune.triton_kernels._common",
        "vtprune.cuda.attention_scores",
    ):
        assert name in MODULES
    assert "vtprune._host" in _edges("vtprune.triton_kernels._common")  # the scan reads real imports


def test_host_imports_nothing_from_vtprune():
    assert _imports(MODULES["vtprune._host"]) == set()


@pytest.mark.parametrize("low", LOW[1:])
def test_low_modules_import_only_lower_ones(low):
    assert _edges(low) <= {"vtprune._host", "vtprune._compat"}, low


def test_kernels_import_neither_ops_nor_reference():
    forbidden = ("vtprune.ops", "vtprune.reference", "vtprune._backend", *HIGH)
    assert _violations(("vtprune.triton_kernels", "vtprune.cuda"), forbidden) == []


def test_reference_imports_no_backend():
    forbidden = (
        "vtprune.ops",
        "vtprune.triton_kernels",
        "vtprune.cuda",
        "vtprune._backend",
        "vtprune._ext",
        "vtprune._library",
        *HIGH,
    )
    assert _violations(("vtprune.reference",), forbidden) == []


def test_ext_does_not_import_backend():
    assert "vtprune._backend" not in _edges("vtprune._ext")


def test_no_import_cycle_in_the_op_stack():
    stack = [
        m
        for m in MODULES
        if _under(
            m, ("vtprune.ops", "vtprune.reference", "vtprune.triton_kernels", "vtprune.cuda", *LOW, "vtprune._backend")
        )
    ]
    graph = {m: {e for e in _edges(m, top_level_only=True) if e in stack} for m in stack}
    # a package imports its submodules' names from its __init__, so a module importing its own package is
    # not a cycle through code of the stack
    graph = {m: {e for e in es if not m.startswith(e + ".")} for m, es in graph.items()}
    state: dict[str, int] = {}

    def visit(m, path):
        state[m] = 1
        for e in graph[m]:
            if state.get(e) == 1:
                raise AssertionError(f"import cycle: {' -> '.join(path + [m, e])}")
            if e not in state:
                visit(e, path + [m])
        state[m] = 2

    for m in stack:
        if m not in state:
            visit(m, [])
