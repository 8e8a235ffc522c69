"""``vtprune calibrate`` on a tiny LLaVA saved with save_pretrained (a word-level tokenizer and a CLIP image
processor built here, no download) and a few generated images."""

import json

import pytest
import torch

from vtprune.cli import main


def tiny_processor():
    """A LlavaProcessor for the tiny test LLaVA (56 px images, 7 px patches: 64 image tokens, token id 255)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import CLIPImageProcessor, LlavaProcessor, PreTrainedTokenizerFast

    words = ["[PAD]", "[UNK]", "USER:", "ASSISTANT:", "describe", "the", "image", "what", "colour", "is", "it?"]
    vocab = {w: i for i, w in enumerate(words)}
    vocab["<image>"] = 255
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    assert tokenizer.convert_tokens_to_ids("<image>") == 255
    images = CLIPImageProcessor(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56})
    return LlavaProcessor(image_processor=images, tokenizer=tokenizer, patch_size=7,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from vtprune.models._tiny import tiny_llava

    path = tmp_path_factory.mktemp("tiny-llava")
    model = tiny_llava("test")
    model.config.architectures = ["LlavaForConditionalGeneration"]
    model.save_pretrained(path)
    tiny_processor().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    from PIL import Image

    folder = tmp_path_factory.mktemp("images")
    g = torch.Generator().manual_seed(0)
    for i in range(3):
        pixels = (torch.rand(40 + 8 * i, 48, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / f"img{i}.png")
    return folder


def test_calibrate_folder(checkpoint, images, tmp_path, capsys):
    from transformers import LlavaForConditionalGeneration

    from vtprune import ALVTS
    from vtprune.alvts import SelectorFactors
    from vtprune.alvts.factors import model_fingerprint

    out = tmp_path / "f.safetensors"
    main(["calibrate", "--model", str(checkpoint), "--data", str(images), "--out", str(out), "--steps", "30",
          "--question", "describe the image"])
    text = capsys.readouterr()
    assert "3 samples, 4 decoder layers, rank 4" in text.out
    mean = [line for line in text.out.splitlines() if line.strip().startswith("mean")][0]
    before, after = (float(x) for x in mean.split(":")[1].split("->"))
    assert after < before  # the fit improved
    assert "ALVTS calibration" in text.err  # the progress bar
    model = LlavaForConditionalGeneration.from_pretrained(checkpoint)
    f = SelectorFactors.load(out)
    assert f.meta["source"] == "calibrated" and f.meta["calibration_samples"] == "3"
    assert f.fingerprint == model_fingerprint(model)
    ALVTS(keep=16, factors=str(out)).prepare(model.model.language_model)  # loads and fits its model


def test_calibrate_jsonl(checkpoint, images, tmp_path, capsys):
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps({"image": str(images / f"img{i}.png"), "question": "what colour is it?"})
                              for i in range(2)) + "\n")
    out = tmp_path / "g.safetensors"
    main(["calibrate", "--model", str(checkpoint), "--data", str(data), "--out", str(out), "--steps", "2"])
    assert "2 samples" in capsys.readouterr().out and out.exists()


def refused(capsys, argv, match):
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and match in err, err


def test_calibrate_errors(checkpoint, images, tmp_path, capsys):
    out = str(tmp_path / "f.safetensors")
    base = ["calibrate", "--model", str(checkpoint), "--out", out]
    refused(capsys, [*base, "--data", str(tmp_path)], "no image files")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "no image"}\n')
    refused(capsys, [*base, "--data", str(bad)], "line 1: expected a JSON object with \"image\"")
    bad.write_text('{"image": "missing.png"}\n')
    refused(capsys, [*base, "--data", str(bad)], "image 'missing.png' not found")
    refused(capsys, ["calibrate", "--model", str(checkpoint), "--data", str(images), "--out", str(tmp_path / "f.bin")],
            "ending in one of .safetensors")
    refused(capsys, ["calibrate", "--model", str(tmp_path), "--data", str(images), "--out", out], "no config.json")
    refused(capsys, [*base, "--data", str(images), "--steps", "0"], "argument --steps")


class _QwenProcessor:
    """A stand-in for a Qwen-VL processor (the real ones need torchvision for their video half): an image of
    ``h x w`` pixels becomes an ``(h // 8 * 2) x (w // 8 * 2)`` patch grid of the tiny model, its pixels a
    deterministic function of the image, wrapped in vision start / end tokens as Qwen's chat format does."""

    def __init__(self, model):
        self.model = model

    def __call__(self, *, images, text, return_tensors):
        import numpy as np

        from vtprune.models._tiny import tiny_qwen_inputs

        w, h = images.size
        grid = (max(2, h // 8 * 2), max(2, w // 8 * 2))
        seed = int(np.asarray(images).sum()) % 1000
        return tiny_qwen_inputs(self.model, prefix_lengths=(3,), suffix_lengths=(len(text.split()),), grids=(grid,),
                                seed=seed)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_calibrate_qwen_families(family, images, tmp_path, monkeypatch, capsys):
    """The CLI takes the Qwen-VL architectures: it reads each sample's image span from the processor's input_ids,
    fits factors that lower the fit error, and the file loads into ALVTS on that model (a Qwen3-VL fit goes through
    its q/k norms and deepstack levels)."""
    import transformers
    from PIL import Image

    import vtprune
    from vtprune import ALVTS
    from vtprune.alvts import SelectorFactors
    from vtprune.models._tiny import tiny_qwen2_5_vl
    from vtprune.models._tiny_qwen3_vl import tiny_qwen3_vl

    model = (tiny_qwen2_5_vl if family == "qwen2_5_vl" else tiny_qwen3_vl)()
    arch = type(model).__name__
    model.config.architectures = [arch]
    path = tmp_path / family
    model.save_pretrained(path)
    monkeypatch.setattr(transformers.AutoProcessor, "from_pretrained",
                        classmethod(lambda cls, p, **k: _QwenProcessor(model)))
    out = tmp_path / "f.safetensors"
    main(["calibrate", "--model", str(path), "--data", str(images), "--out", str(out), "--steps", "20"])
    text = capsys.readouterr().out
    assert "3 samples, 4 decoder layers" in text
    before, after = (float(x) for x in text.split("mean     :")[1].split()[0:3:2])
    assert after < before
    f = SelectorFactors.load(str(out))
    assert f.meta["source"] == "calibrated" and len(f.u) == 4
    inputs = _QwenProcessor(model)(images=Image.open(next(images.iterdir())), text="describe it", return_tensors="pt")
    with torch.no_grad(), vtprune.apply(model, ALVTS(ratio=0.5, factors=str(out))) as handle:
        logits = model(**inputs).logits
    image_tokens = int(inputs["image_grid_thw"][0].prod()) // 4
    assert torch.isfinite(logits[0, -1]).all() and handle.stats.average_visual_tokens < image_tokens
