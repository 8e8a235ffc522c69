"""The lmms-eval integration end to end: the registered ``vtprune`` model on the tiny local tasks (generation and
multiple choice), on a tiny model of each family, unpatched, keep-all and pruned (VisionDrop, ALVTS)."""

import ast
import os
import re

import pytest
import torch

pytest.importorskip("lmms_eval", reason="lmms-eval is not installed (scripts/env.sh installs requirements/eval.txt)")

from vtprune.eval.harness import evaluate  # noqa: E402
from vtprune.eval.runner import Runner  # noqa: E402

CONFIGS = os.path.join(os.path.dirname(__file__), "configs")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))
TASKS = ("vtprune_tiny_gen", "vtprune_tiny_mc")


def config(name):
    return os.path.join(CONFIGS, f"{name}.json")


def run(family, method=None, **kw):
    results, model = evaluate(f"tiny:{family}", None if method is None else config(method), TASKS, batch_size=2,
                              device="cpu", log_samples=True, **kw)
    return results, model


def answers(results):
    """Per task, per document: the generated text, or the (logprob, is_greedy) of each choice."""
    out = {}
    for task in TASKS:
        docs = sorted(results["samples"][task], key=lambda s: s["doc_id"])
        if task.endswith("_gen"):
            out[task] = [s["resps"][0][0] for s in docs]
        else:
            out[task] = [[ast.literal_eval(r[0]) for r in s["resps"]] for s in docs]
    return out


def metrics(results):
    return {t: {k: v for k, v in m.items() if "stderr" not in k} for t, m in results["results"].items()}


@pytest.mark.parametrize("family", ["llava", "llava_next", "qwen2_5_vl"])
def test_tiny_tasks_keep_all_scores_exactly_as_unpatched_and_pruned_runs(family):
    ref, _ = run(family)
    want = answers(ref)
    assert len(want["vtprune_tiny_gen"]) == 6 and all(len(c) == 4 for c in want["vtprune_tiny_mc"])
    for keep_all in ("visiondrop-keepall", "alvts-keepall"):
        got, model = run(family, keep_all)
        assert model.handle is not None and not model.handle.active  # applied for the run, removed after
        assert metrics(got) == metrics(ref), keep_all
        assert answers(got)["vtprune_tiny_gen"] == want["vtprune_tiny_gen"], keep_all
        for mine, theirs in zip(answers(got)["vtprune_tiny_mc"], want["vtprune_tiny_mc"]):
            assert [g for _, g in mine] == [g for _, g in theirs]
            # VisionDrop's keep-all runs CLIP's feature layer through attention_with_scores: float rounding only
            torch.testing.assert_close([lp for lp, _ in mine], [lp for lp, _ in theirs], atol=1e-4, rtol=1e-5)
    for pruned in ("visiondrop-ratio0.25", "alvts-keep8"):
        got, model = run(family, pruned)
        stats = model.handle.stats
        assert stats.average_visual_tokens < stats.visual_tokens_per_layer[0] or stats.flops < stats.flops_unpruned
        lls = [lp for choices in answers(got)["vtprune_tiny_mc"] for lp, _ in choices]
        assert all(lp < 0 for lp in lls) and lls != [lp for c in want["vtprune_tiny_mc"] for lp, _ in c]
        assert set(metrics(got)) == set(TASKS)


def test_registered_as_an_lmms_eval_model():
    from lmms_eval.models import get_model

    from vtprune.eval.lmms_model import VTPrune

    assert get_model("vtprune") is VTPrune


def test_loglikelihood_is_batched_and_matches_the_labels_loss():
    runner = Runner("tiny:qwen2_5_vl", config("visiondrop-ratio0.25"), batch_size=3)
    from vtprune.eval.tasks.tiny_task import doc_to_visual

    docs = [dict(colour="red", shape="disc", width=w, height=h) for w, h in ((40, 30), (60, 90), (100, 50))]
    images = [doc_to_visual(d) for d in docs]
    contexts, conts = ["What colour?", "Which colour is the disc?", "Colour?"], [" red", " blue", " yellow"]
    batched = runner.loglikelihood(contexts, conts, images)
    runner.batch_size = 1
    alone = runner.loglikelihood(contexts, conts, images)
    torch.testing.assert_close([b for b, _ in batched], [a for a, _ in alone], atol=1e-4, rtol=1e-5)
    # the same continuation scored through labels= (mean NLL over its tokens): -loss * tokens
    prompt = runner.prompt(contexts[1], 1)
    batch = runner.inputs([prompt + conts[1]], [images[1]])
    n = len(conts[1])  # character-level tokenizer: one token per character
    labels = torch.full_like(batch["input_ids"], -100)
    labels[:, -n:] = batch["input_ids"][:, -n:]
    with torch.no_grad():
        loss = runner.model(**batch, labels=labels).loss
    torch.testing.assert_close(-float(loss) * n, alone[1][0], atol=1e-4, rtol=1e-5)
    runner.close()


def test_alvts_routing_layer_0_runs_without_a_cache(tmp_path):
    # the papers' ALVTS recipes route every layer (first_layer=0), which refuses a KV cache
    path = tmp_path / "alvts0.json"
    path.write_text('{"method": "alvts", "args": {"keep": 8, "first_layer": 0, "backend": "reference"}}')
    runner = Runner("tiny:llava", str(path), batch_size=2)
    from vtprune.eval.tasks.tiny_task import doc_to_visual

    image = doc_to_visual(dict(colour="red", shape="disc", width=40, height=30))  # [one PIL image]
    assert len(runner.generate(["Colour?", "Which colour?"], [image, image], max_new_tokens=3)) == 2
    assert runner.handle.stats.visual_tokens_per_layer[0] == 8  # layer 0 routed too
    (lp, _), = runner.loglikelihood(["Colour?"], [" red"], [image])
    assert lp < 0
    runner.close()


def test_cli_eval(tmp_path, capsys):
    from vtprune.cli import main

    out = tmp_path / "m.json"
    main(["eval", "--model", "tiny:llava", "--method-config", config("alvts-keep8"), "--tasks",
          "vtprune_tiny_mc", "--limit", "2", "--batch-size", "2", "--out", str(out)])
    text = capsys.readouterr().out
    assert "method: ALVTS(keep=8" in text and re.search(r"vtprune_tiny_mc\s+acc \d\.\d{4}", text)
    assert '"alvts"' in out.read_text()
    with pytest.raises(SystemExit) as e:
        main(["eval", "--model", "tiny:llava", "--tasks", "no_such_task"])
    assert e.value.code == 2 and "no_such_task" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["eval", "--model", "tiny:llava", "--method-config", str(tmp_path / "missing.json"), "--tasks", "x"])
    assert "--method-config" in capsys.readouterr().err


def test_eval_set_leaves_the_locked_torch():
    from importlib.metadata import version

    def pins(name):
        with open(os.path.join(ROOT, "requirements", name)) as f:
            return dict(line.strip().split("==") for line in f if "==" in line and not line.startswith("#"))

    names = {n.lower().replace("_", "-") for n in pins("eval.txt")}
    assert not {n for n in names if n.startswith(("torch", "nvidia", "triton"))}
    assert version("torch").split("+")[0] == pins("lock.txt")["torch"]
    assert version("lmms_eval") == "0.7.3"
