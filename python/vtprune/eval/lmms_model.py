"""The lmms-eval model ``vtprune``: any supported checkpoint with any vtprune method, for every lmms-eval task.

    lmms-eval --model vtprune --model_args pretrained=PATH,method_config=recipes/...yaml,batch_size=8 --tasks ...

Registered through the ``lmms_eval.models`` entry point in vtprune's package metadata (:func:`manifest`), so the
``vtprune`` name exists once vtprune is installed. A model of our own rather than a wrapper around lmms-eval's
per-family HF models: one code path serves LLaVA-1.5, LLaVA-NeXT and Qwen2.5-VL, loglikelihood requests work for
all three (lmms-eval's Qwen2.5-VL model has none) and are batched, and each continuation is scored from the
input-coordinate logits, the same code for the patched and the unpatched model (:mod:`vtprune.eval.runner`).

``model_args``: ``pretrained`` (checkpoint directory or ``tiny:FAMILY``), ``method_config`` (JSON / YAML file;
omitted: the unpatched model), ``batch_size`` (default 1), ``device`` (default ``cuda`` when available),
``dtype`` (default ``auto``), ``max_new_tokens`` (default 32, a task's ``generation_kwargs`` override it).
"""

from __future__ import annotations

from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms

from vtprune.eval.runner import Runner


def manifest():
    """The ``lmms_eval.models`` entry point: lmms-eval's manifest of the ``vtprune`` model."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id="vtprune", simple_class_path="vtprune.eval.lmms_model.VTPrune")


class Scored(str):
    """A loglikelihood answer ``(logprob, is_greedy)`` that lmms-eval 0.7.3 passes through intact.

    Its evaluator sends every response through ``unwrap_generation_output``, which keeps a ``str`` as it is but
    turns any other object, a ``(float, bool)`` tuple included, into its ``str()``; the multiple-choice scoring
    then fails to unpack it. A ``str`` that unpacks (iterates, indexes) as the two values survives both steps,
    and its text is the tuple's repr in logs."""

    def __new__(cls, logprob: float, is_greedy: bool):
        self = super().__new__(cls, repr((float(logprob), bool(is_greedy))))
        self.pair = (float(logprob), bool(is_greedy))
        return self

    def __iter__(self):
        return iter(self.pair)

    def __getitem__(self, i):
        return self.pair[i]

    def __len__(self):
        return 2


class VTPrune(lmms):
    """lmms-eval model over :class:`~vtprune.eval.runner.Runner` (``generate_until`` and ``loglikelihood``)."""

    def __init__(self, pretrained: str, method_config: str | None = None, batch_size: int | str = 1,
                 device: str | None = None, dtype: str = "auto", max_new_tokens: int | str = 32, **kwargs):
        super().__init__()
        if kwargs:
            raise ValueError(f"vtprune model_args: unknown {sorted(kwargs)}; known: pretrained, method_config, "
                             "batch_size, device, dtype, max_new_tokens")
        import torch

        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.runner = Runner(pretrained, method_config or None, device=device, dtype=dtype,
                             batch_size=int(batch_size))
        self.max_new_tokens = int(max_new_tokens)
        self.batch_size_per_gpu = int(batch_size)

    @property
    def device(self):
        return self.runner.device

    @property
    def handle(self):
        """The method's :class:`vtprune.api.Handle` (``stats`` of the last prefill), or None when unpatched."""
        return self.runner.handle

    def _doc(self, task, split, doc_id):
        return self.task_dict[task][split][doc_id]

    def _visuals(self, doc_to_visual, task, split, doc_id) -> list:
        visuals = doc_to_visual(self._doc(task, split, doc_id)) if doc_to_visual is not None else []
        return [v for v in (visuals or []) if v is not None]

    def generate_until(self, requests: list[Instance]) -> list[str]:
        # requests sharing generation settings are batched together, answers returned in request order
        groups: dict = {}
        for i, req in enumerate(requests):
            context, gen_kwargs, doc_to_visual, doc_id, task, split = req.args
            gen_kwargs = dict(gen_kwargs or {})
            until = gen_kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            key = (int(gen_kwargs.get("max_new_tokens", self.max_new_tokens)), tuple(until))
            groups.setdefault(key, []).append((i, context, self._visuals(doc_to_visual, task, split, doc_id)))
        out = [None] * len(requests)
        for (max_new, until), items in groups.items():
            texts = self.runner.generate([c for _, c, _ in items], [v for _, _, v in items], max_new, until)
            for (i, _, _), text in zip(items, texts):
                out[i] = text
        return out

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        """``(logprob, is_greedy)`` per request, as :class:`Scored` (see there why not a plain tuple)."""
        contexts, continuations, visuals = [], [], []
        for req in requests:
            context, target, doc_to_visual, doc_id, task, split = req.args
            if not isinstance(target, str):  # doc_to_target given as a function of the document
                target = target(self._doc(task, split, doc_id))
            contexts.append(context)
            continuations.append(target)
            visuals.append(self._visuals(doc_to_visual, task, split, doc_id))
        return [Scored(ll, greedy) for ll, greedy in self.runner.loglikelihood(contexts, continuations, visuals)]

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError("vtprune: multi-round generation continues a pruned KV cache with a new prompt, "
                                  "which vtprune does not support; run each round's whole conversation instead")
