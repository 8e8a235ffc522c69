"""Shared benchmark plumbing: timing, environment record, result files.

Timing: warm-up first, then the median of many runs; on CUDA the region is timed with events (device work is
asynchronous, so host clocks would time the launches), on the CPU with a monotonic clock.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import time
from collections.abc import Callable

import torch

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def time_ms(fn: Callable[[], object], *, warmup: int = 3, rep: int = 10, device: str = "cpu") -> float:
    """Median wall time of ``fn()`` in milliseconds."""
    for _ in range(warmup):
        fn()
    times = []
    if device == "cuda":
        torch.cuda.synchronize()
        for _ in range(rep):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(rep):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def env_info() -> dict:
    """Device, library versions and date, recorded with every result file."""
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name()
        if torch.cuda.is_available()
        else f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "0"),
    }
    for mod in ("triton", "transformers"):
        try:
            info[mod] = __import__(mod).__version__
        except ImportError:
            info[mod] = None
    try:
        import subprocess

        info["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                        cwd=os.path.dirname(RESULTS_DIR)).stdout.strip() or None
    except OSError:
        info["commit"] = None
    return info


def write_results(name: str, rows: list[dict], *, out_dir: str | None = None) -> str:
    """Write ``{env, rows}`` as JSON to ``<out_dir>/<name>.json`` (default benchmarks/results/)."""
    out_dir = out_dir or RESULTS_DIR
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{name}.json")
    with open(path, "w") as f:
        json.dump({"env": env_info(), "rows": rows}, f, indent=1)
    return path


def print_table(rows: list[dict], columns: list[str]) -> None:
    """A plain fixed-width table of the chosen columns."""
    cells = [[_fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "-" if v is None else str(v)
