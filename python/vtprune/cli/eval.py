"""Evaluate a method config on lmms-eval tasks (accuracy), without learning lmms-eval's command line.

``--model`` is a local checkpoint (LLaVA-1.5, LLaVA-NeXT, Qwen2.5-VL) or ``tiny:llava`` / ``tiny:llava_next`` /
``tiny:qwen2_5_vl`` (built-in random-weight models with a character-level processor: a check that the path
runs, their scores mean nothing). Without ``--method-config`` the unpatched model is evaluated, the baseline row.
The built-in tiny tasks ``vtprune_tiny_gen`` and ``vtprune_tiny_mc`` need no download; lmms-eval's own tasks
(gqa, pope, mme, ...) download their data sets from the Hugging Face hub on first use.
"""

from __future__ import annotations

import json

from vtprune.cli._args import UsageError, positive_int, readable_file, writable_output

HELP = "evaluate a method config on lmms-eval tasks"


def add_arguments(p) -> None:
    p.add_argument("--model", required=True, help="local checkpoint directory, or tiny:FAMILY")
    p.add_argument("--method-config", default=None, help="method config file (JSON / YAML); omitted: unpatched")
    p.add_argument("--tasks", required=True, help="comma-separated lmms-eval task names")
    p.add_argument("--include", action="append", default=[], help="extra lmms-eval task folder (repeatable)")
    p.add_argument("--batch-size", type=positive_int, default=1, help="requests per forward (default 1)")
    p.add_argument("--limit", type=positive_int, default=None, help="at most this many documents per task")
    p.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda when available)")
    p.add_argument("--dtype", default="auto", help="auto (the checkpoint's), float16, bfloat16 or float32")
    p.add_argument("--out", default=None, help="write the metrics (and the method's statistics) to this JSON file")


def run(args) -> None:
    from vtprune.cli._args import model_dir

    if not args.model.startswith("tiny:"):
        model_dir("--model", args.model)
    if args.method_config is not None:
        readable_file("--method-config", args.method_config)
    if args.dtype not in ("auto", "float16", "bfloat16", "float32"):
        raise UsageError(f"--dtype must be auto, float16, bfloat16 or float32, got {args.dtype!r}")
    if args.out is not None:
        writable_output("--out", args.out, extensions=(".json",))
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks:
        raise UsageError(f"--tasks: expected comma-separated task names, got {args.tasks!r}")
    from vtprune.eval.harness import evaluate

    try:
        results, model = evaluate(args.model, args.method_config, tasks, batch_size=args.batch_size,
                                  limit=args.limit, device=args.device, dtype=args.dtype, include=args.include)
    except (ImportError, ValueError) as e:
        raise UsageError(str(e).splitlines()[0]) from None
    method = model.runner.method
    print(f"model: {args.model} | method: {method!r}" if method is not None else
          f"model: {args.model} | method: none (unpatched)")
    rows = {}
    for task, metrics in results["results"].items():
        values = {k.split(",")[0]: v for k, v in metrics.items()
                  if isinstance(v, (int, float)) and "stderr" not in k}
        rows[task] = values
        print(f"  {task:<24} " + "  ".join(f"{k} {v:.4f}" for k, v in values.items()))
    stats = model.handle.stats if model.handle is not None else None
    if stats is not None:
        print(f"  last prefill: {stats.average_visual_tokens:.1f} visual tokens per layer on average, "
              f"FLOPs ratio {stats.flops_ratio:.3f}")
    if args.out is not None:
        from vtprune.config import to_config

        record = {"model": args.model, "method": None if method is None else to_config(method), "results": rows}
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(record, f, indent=2)
        print(f"metrics: {args.out}")
