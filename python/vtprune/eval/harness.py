"""Run lmms-eval tasks on a checkpoint with a method config: what ``vtprune eval`` calls.

The built-in tiny tasks (``vtprune_tiny_gen``, ``vtprune_tiny_mc``) are always on the task path; ``include``
adds task folders of your own. lmms-eval is an optional dependency (``pip install "vtprune[eval]"``, or
``requirements/eval.txt`` for the exact set CI uses).
"""

from __future__ import annotations


def _lmms_eval():
    try:
        import lmms_eval.evaluator as evaluator
        from lmms_eval.tasks import TaskManager
    except ImportError as e:
        raise ImportError(f"vtprune eval needs lmms-eval ({e}); install it with: pip install 'vtprune[eval]' (or, "
                          "without changing torch: pip install --no-deps -r requirements/eval.txt)") from None
    # lmms-eval 0.7.3 wraps FileLock construction through filelock < 4's private ``filelock._api`` (a guard
    # against nested dataset loads deadlocking); filelock 4 has no such module and the wrapper fails at start.
    # The tasks here load one local file per task, so the guard is skipped rather than filelock downgraded.
    guard = getattr(evaluator, "_enable_reentrant_filelocks", None)
    if guard is not None:
        try:
            import filelock._api  # noqa: F401
        except ImportError:
            guard._patched = True
    return evaluator, TaskManager


def evaluate(pretrained: str, method_config=None, tasks=("vtprune_tiny_gen", "vtprune_tiny_mc"), *,
             batch_size: int = 1, limit: int | None = None, device: str | None = None, dtype: str = "auto",
             include: list | None = None, log_samples: bool = False):
    """Evaluate ``pretrained`` with ``method_config`` (None: unpatched) on lmms-eval ``tasks``.

    Returns ``(results, model)``: lmms-eval's results dict (``results["results"][task]`` holds the metrics,
    ``results["samples"]`` the per-request outputs when ``log_samples``) and the :class:`~vtprune.eval.lmms_model.
    VTPrune` model (``model.handle.stats``: the method's statistics of the last prefill).
    """
    import os

    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # local data files only: never look anything up online
    evaluator, TaskManager = _lmms_eval()
    from vtprune.eval.lmms_model import VTPrune
    from vtprune.eval.tasks import include_path

    model = VTPrune(pretrained=pretrained, method_config=method_config, batch_size=batch_size, device=device,
                    dtype=dtype)
    try:
        # indexing lmms-eval's own few hundred task folders takes seconds: only when a task may be one of them
        from vtprune.eval.tasks import TASKS

        defaults = bool(include) or any(t not in TASKS for t in tasks)
        manager = TaskManager(include_path=[include_path(), *(include or [])], include_defaults=defaults)
        unknown = [t for t in tasks if t not in manager.all_tasks]
        if unknown:
            raise ValueError(f"tasks: unknown {unknown}; lmms-eval knows {len(manager.all_tasks)} tasks (the tiny "
                             f"ones: vtprune_tiny_gen, vtprune_tiny_mc); add a task folder with include=")
        results = evaluator.simple_evaluate(model=model, tasks=list(tasks), task_manager=manager, limit=limit,
                                            batch_size=batch_size, log_samples=log_samples, verbosity="WARNING")
    finally:
        model.runner.close()
    return results, model
