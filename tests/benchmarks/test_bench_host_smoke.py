"""CPU smoke test of the host-overhead benchmark: every public op is timed and none fails."""

import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))
pytest.importorskip("triton.language")
bench_host = pytest.importorskip("bench_host")


def test_quick_ops(tmp_path):
    bench_host.main(["--quick", "--no-model", "--out", str(tmp_path)])
    rows = json.loads((tmp_path / "host_cpu_quick.json").read_text())["rows"]
    ops = {r["name"]: r for r in rows if r["kind"] == "op"}
    assert set(ops) == {"attention_scores", "attention_with_scores", "topk_keep_order", "contextual_merge",
                        "select_and_merge", "lowrank_scores", "routed_layer"}
    for name, r in ops.items():
        assert "error" not in r and 0 < r["us_per_call"] <= r["us_median"], (name, r)
