"""Accuracy evaluation through lmms-eval: the registered model ``vtprune`` (:mod:`vtprune.eval.lmms_model`) over a
harness-free :class:`~vtprune.eval.runner.Runner`, the tiny local tasks (:mod:`vtprune.eval.tasks`), the built-in
tiny checkpoints (:mod:`vtprune.eval.tiny`) and :func:`vtprune.eval.harness.evaluate`, which ``vtprune eval``
calls. Importing this package needs no lmms-eval; the modules that use it import it themselves.
"""
