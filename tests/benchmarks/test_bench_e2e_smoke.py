"""CPU smoke test of the end-to-end benchmark: the quick grid runs and its rows are self-consistent."""

import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))
bench_e2e = pytest.importorskip("bench_e2e")


def test_quick_grid(tmp_path, capsys):
    bench_e2e.main(["--device", "cpu", "--quick", "--batches", "1", "--budgets", "192,64",
                    "--methods", "visiondrop,visionzip,pyramiddrop,fastv", "--rep", "1", "--out", str(tmp_path)])
    rows = json.loads((tmp_path / "e2e_cpu_quick.json").read_text())["rows"]
    by = {(r["method"], r["budget"]): r for r in rows}
    base = by[("unpruned", 576)]
    assert base["avg_visual"] == 576 and base["tflops"] == base["tflops_unpruned"]
    for key in [("visiondrop", 192), ("visiondrop", 64), ("visionzip", 64), ("pyramiddrop", 192)]:
        r = by[key]
        assert r["avg_visual"] == pytest.approx(key[1], abs=1.0), key  # the solved knobs hit the budget
        assert r["tflops"] < base["tflops"] and r["prefill_ms"] > 0 and r["ideal_ms"] > 0
    assert ("pyramiddrop", 64) not in by and ("fastv", 64) not in by  # unreachable budgets are skipped
    assert "cannot average 64" in capsys.readouterr().err
