"""Qwen3-VL integration on a tiny random-weight model (:mod:`vtprune.models._tiny_qwen3_vl`): full-attention ViT
with two deepstack levels (added after decoder layers 0 and 1), 4-layer Qwen3 LLM with q/k norms, GQA and
interleaved 3-D M-RoPE.

The deepstack and q/k-norm handling is checked against a step-by-step re-statement in this file (torch ops and the
model's own modules, no vtprune code): encoder selection from a materialised softmax, merges by the official rule,
the LLM stages' scores from the next layer's normed q/k, and every deepstack level selected and merged with the
tokens it belongs to. The generic properties (keep-all, batch == rows alone, cache, remove()) are in
test_generic.py, over every family.
"""

import sys

import pytest
import torch
import torch.nn.functional as F
from models_common import SCHEDULE

import vtprune
from utils import triton_installed
from vtprune.alvts.calibrate import full_rank_scores
from vtprune.alvts.factors import bilinear_form
from vtprune.models._tiny import IMAGE_TOKEN, QWEN_GRIDS, TINY_FAMILIES, VIDEO_TOKEN, tiny_qwen_inputs
from vtprune.models._tiny_qwen3_vl import tiny_qwen3_multi_inputs, tiny_qwen3_video_inputs, tiny_qwen3_vl
from vtprune.outputs import pruned_logits

GEN = dict(max_new_tokens=8, do_sample=False)
GRIDS = QWEN_GRIDS  # 24 and 36 merged tokens
row = TINY_FAMILIES["Qwen3VLForConditionalGeneration"].row  # a batch row alone, without its padding
METHODS = {
    "visiondrop": lambda: vtprune.VisionDrop(**SCHEDULE),
    "fastv": lambda: vtprune.FastV(layer=1, ratio=0.25),
    "pyramiddrop": lambda: vtprune.PyramidDrop(),
    "visionzip": lambda: vtprune.VisionZip(10, 2),
    "alvts": lambda: vtprune.ALVTS(keep=8, backend="reference"),
}


@pytest.fixture(scope="module")
def q3():
    return tiny_qwen3_vl()


@pytest.fixture
def qbatch(q3):
    out = tiny_qwen_inputs(q3, (3, 7), (6, 4), GRIDS, seed=1)
    assert not out["attention_mask"].all()
    return out


# ---------------------------------------------------------------------------------------------- step-by-step truth
def encoder_selection(model, x, d, c):
    """The encoder stage of one image, recomputed: (kept merged-token indices ascending, contextual targets,
    members of each target). Score: the last ViT block's softmax (materialised), mean over heads and queries, then
    over each 2x2 group; metric: pre-RoPE keys averaged over heads and the group."""
    visual = model.model.visual
    hf = sys.modules[type(visual).__module__]
    seen = {}
    hook = visual.blocks[-1].attn.register_forward_pre_hook(
        lambda m, a, k: seen.update(h=a[0], pos=k["position_embeddings"]), with_kwargs=True)
    visual(x["pixel_values"], grid_thw=x["image_grid_thw"])
    hook.remove()
    a = visual.blocks[-1].attn
    n = seen["h"].shape[0]
    q, k, _ = a.qkv(seen["h"]).reshape(n, 3, a.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
    metric = k.mean(1).view(n // 4, 4, -1).mean(1)
    q, k = hf.apply_rotary_pos_emb_vision(q, k, *seen["pos"])
    probs = torch.softmax(torch.einsum("qhd,khd->hqk", q, k) * a.scaling, -1)
    score = probs.mean(0).mean(0).view(n // 4, 4).mean(1)
    return merge_plan(score, metric, d, c)


def merge_plan(score, metric, d, c):
    """Official rule: top-d kept; the rest ascending, targets every max(1, n // c)-th, members join the target of
    largest cosine similarity."""
    keep = score.topk(d).indices.sort().values
    rest = torch.tensor([i for i in range(score.shape[0]) if i not in keep.tolist()], dtype=torch.long)
    if c == 0:
        return keep, rest[:0], []
    targets = rest[::max(1, len(rest) // c)][:c]
    others = torch.tensor([i for i in rest.tolist() if i not in targets.tolist()], dtype=torch.long)
    m = F.normalize(metric, dim=-1)
    join = (m[others] @ m[targets].T).argmax(-1)
    return keep, targets, [others[join == j] for j in range(len(targets))]


def merged(x, plan):
    """[kept tokens, target + mean of its members] of x [n, D]."""
    keep, targets, members = plan
    ctx = [x[t] + (x[g].mean(0) if len(g) else 0) for t, g in zip(targets.tolist(), members)]
    return torch.cat([x[keep], *(v[None] for v in ctx)])


@torch.no_grad()
def reference_logits(model, x, encoder, stages, *, qk_norm=True, deepstack="carry"):
    """Batch size 1. ``qk_norm=False`` / ``deepstack="none" | "kept_only"`` are deliberate mistakes (scores without
    the q/k norms; no deepstack; merged tokens given only their target's deepstack features) that the patched
    model must not match."""
    mm = model.model
    ids = x["input_ids"][0]
    out = mm.visual(x["pixel_values"], grid_thw=x["image_grid_thw"])
    feats, deep = out.pooler_output, list(out.deepstack_features)
    plan = encoder_selection(model, x, *encoder)
    pos = mm.get_rope_index(x["input_ids"], mm_token_type_ids=(x["input_ids"] == IMAGE_TOKEN).int(),
                            image_grid_thw=x["image_grid_thw"])[0][:, 0]  # [3, L]
    where = (ids == IMAGE_TOKEN).nonzero().flatten()
    start, end = int(where[0]), int(where[-1]) + 1

    def carry(levels, plan):
        if deepstack == "kept_only":
            return [torch.cat([f[plan[0]], f[plan[1]]]) for f in levels]
        return [merged(f, plan) for f in levels]

    def new_positions(p, plan):  # kept tokens their own, contextual tokens their target's
        return torch.cat([p[:, plan[0]], p[:, plan[1]]], 1)

    image = merged(feats, plan)
    deep = carry(deep, plan)
    img_pos = new_positions(pos[:, start:end], plan)
    embed = mm.get_input_embeddings()
    hidden = torch.cat([embed(ids[:start]), image, embed(ids[end:])])[None]
    pos = torch.cat([pos[:, :start], img_pos, pos[:, end:]], 1)
    count = image.shape[0]
    lm = mm.language_model
    for i, dec in enumerate(lm.layers):
        hidden = dec(hidden, attention_mask=None, position_embeddings=lm.rotary_emb(hidden, pos[:, None]),
                     position_ids=None)
        if i < len(deep) and deepstack != "none":
            hidden = hidden.clone()
            hidden[0, start:start + count] += deep[i]
        if i + 1 in stages:
            d, c = stages[i + 1]
            nxt = lm.layers[i + 1]
            a = nxt.self_attn
            h = nxt.input_layernorm(hidden)
            L = h.shape[1]
            qs, ks = a.q_proj(h).view(1, L, -1, a.head_dim), a.k_proj(h).view(1, L, -1, a.head_dim)
            if qk_norm:
                qs, ks = a.q_norm(qs), a.k_norm(ks)
            qs, ks = sys.modules[type(a).__module__].apply_rotary_pos_emb(
                qs.transpose(1, 2), ks.transpose(1, 2), *lm.rotary_emb(hidden, pos[:, None]))
            logits = qs @ ks.repeat_interleave(qs.shape[1] // ks.shape[1], 1).transpose(2, 3) * a.scaling
            att = torch.softmax(logits.float() + torch.full((L, L), float("-inf")).triu(1), -1).mean(1)[0]
            score = att[start:start + count, start:start + count].mean(0)
            plan = merge_plan(score, ks[0].mean(0)[start:start + count], d, c)
            img = merged(hidden[0, start:start + count], plan)
            deep = deep[:i + 1] + carry(deep[i + 1:], plan)
            pos = torch.cat([pos[:, :start], new_positions(pos[:, start:start + count], plan),
                             pos[:, start + count:]], 1)
            hidden = torch.cat([hidden[:, :start], img[None], hidden[:, start + count:]], 1)
            count = img.shape[0]
    return model.lm_head(lm.norm(hidden))


def test_matches_step_by_step_reference(q3, qbatch):
    """VisionDrop with an encoder stage and LLM stages after layers 0, 1 and 2: the first LLM stage runs before
    deepstack level 1 is added, so that level must be selected and merged with the tokens; the stage after layer 1
    must score with level 1 added."""
    x = row(qbatch, 0)
    with vtprune.apply(q3, vtprune.VisionDrop(**SCHEDULE)):
        out = q3(**x)
    got = pruned_logits(out.logits, out.kept_positions)  # the rows the language model computed
    truth = reference_logits(q3, x, SCHEDULE["encoder"], SCHEDULE["stages"])
    torch.testing.assert_close(got, truth, atol=1e-4, rtol=1e-4)
    for wrong in (dict(qk_norm=False), dict(deepstack="none"), dict(deepstack="kept_only")):
        off = reference_logits(q3, x, SCHEDULE["encoder"], SCHEDULE["stages"], **wrong)
        assert off.shape != got.shape or (off - got).abs().max() > 1e-3, wrong


@pytest.mark.parametrize("d, c", [(6, 0), (6, 3)])
def test_deepstack_follows_the_encoder_selection(q3, qbatch, d, c):
    """Marker deepstack features (level j, merged token r: r + 1 in channel j, zero elsewhere) are what each
    position of the pruned sequence receives: a kept token its own marker, a contextual token its target's plus
    the mean of its members', a text token nothing. No dropped token's marker reaches the decoder."""
    x = row(qbatch, 0)
    visual, lm = q3.model.visual, q3.model.language_model

    def marker(j):
        def hook(module, args, out):
            m = torch.zeros_like(out)
            m[:, j] = torch.arange(1, out.shape[0] + 1, dtype=out.dtype)
            return m
        return hook

    hooks = [mg.register_forward_hook(marker(j)) for j, mg in enumerate(visual.deepstack_merger_list)]
    seen = {}
    for i in (0, 1):
        hooks.append(lm.layers[i].register_forward_hook(lambda m, a, o, i=i: seen.update({f"out{i}": o})))
        hooks.append(lm.layers[i + 1].input_layernorm.register_forward_pre_hook(
            lambda m, a, i=i: seen.update({f"in{i + 1}": a[0]})))
    try:
        with vtprune.apply(q3, vtprune.VisionZip(d, c)):
            q3(**x)
    finally:
        for h in hooks:
            h.remove()
    plan = encoder_selection(q3, x, d, c)
    n = int((x["input_ids"] == IMAGE_TOKEN).sum())
    ids = torch.arange(1, n + 1, dtype=torch.float32)[:, None]
    expected = merged(ids, plan)[:, 0]  # [d + c] marker values of the new tokens
    start = int((x["input_ids"][0] == IMAGE_TOKEN).nonzero()[0])
    for j in (0, 1):
        added = (seen[f"in{j + 1}"] - seen[f"out{j}"])[0]  # [L', D] what was added after layer j
        torch.testing.assert_close(added[start:start + d + c, j], expected)
        rest = added.clone()
        rest[start:start + d + c, j] = 0
        assert rest.abs().max() < 1e-5  # nothing else: no other channel, no text token, no dropped token's marker
        if c == 0:  # without merging, the markers are exactly the kept tokens'
            assert added[start:start + d, j].tolist() == (plan[0] + 1).float().tolist()


# ---------------------------------------------------------------------------------------------- generic properties
@pytest.mark.parametrize("method", [vtprune.VisionDrop(tokens=None), vtprune.FastV(layer=1, ratio=1.0),
                                    vtprune.ALVTS(keep=None, backend="reference")], ids=lambda m: m.name)
def test_keep_all_records_the_unpatched_hidden_states(q3, qbatch, method):
    """Logits, greedy tokens and the recorded hidden states (each layer's output before its deepstack level is
    added, as the unpatched model records them)."""
    ref = q3(**qbatch, output_hidden_states=True)
    ref_gen = q3.generate(**qbatch, **GEN)
    with vtprune.apply(q3, method) as h:
        out = q3(**qbatch, output_hidden_states=True)
        assert h.stats.visual_tokens_per_layer == [24] * 4
        gen = q3.generate(**qbatch, **GEN)
    torch.testing.assert_close(out.logits, ref.logits, atol=1e-5, rtol=1e-5)
    for a, b in zip(out.hidden_states, ref.hidden_states, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert torch.equal(gen, ref_gen)


def test_counts_follow_schedule(q3, qbatch):
    with vtprune.apply(q3, vtprune.VisionDrop(**SCHEDULE)) as h:
        q3(**qbatch)
        assert h.stats.visual_tokens_per_layer == [14, 10, 7, 5]
        assert h.stats.tokens_per_layer == [3 + 6 + 2 + n for n in (14, 10, 7, 5)]


def test_bad_input(q3, qbatch):
    with pytest.raises(ValueError, match="square grid"):
        vtprune.apply(q3, vtprune.UniformPool(16))
    assert "forward" not in q3.model.__dict__
    with vtprune.apply(q3, vtprune.VisionZip(10, 2)):
        with pytest.raises(ValueError, match="image_grid_thw"):
            q3(**{k: v for k, v in qbatch.items() if k != "image_grid_thw"})
        video = tiny_qwen3_video_inputs(q3, frames=1)
        with pytest.raises(ValueError, match="1 frame groups left over"):  # a video but no video placeholders
            q3(**qbatch, pixel_values_videos=video["pixel_values_videos"], video_grid_thw=video["video_grid_thw"])


# ---------------------------------------------------------------------------------------------- images and videos
TWO = [[3, (8, 8), 2, (8, 12), 4], [5, (8, 8), 3]]  # row 0: two images (16 + 24 tokens), row 1: one


def _spans(ids, token):
    """[(start, end)] of each run of ``token`` in a 1-D id row."""
    where = (ids == token).nonzero().flatten().tolist()
    runs = []
    for p in where:
        if runs and runs[-1][1] == p:
            runs[-1][1] = p + 1
        else:
            runs.append([p, p + 1])
    return runs


@pytest.mark.parametrize("name", ["visiondrop", "fastv", "pyramiddrop", "alvts"])
def test_several_images_span_readers(q3, name):
    """Two images in a prompt: each is its own unit in the language model too (budgets per image)."""
    x = tiny_qwen3_multi_inputs(q3, TWO)
    with vtprune.apply(q3, METHODS[name]()) as h:
        q3(**x)
        assert [u[0] for u in h.stats.unit_tokens] == [16, 24]


def test_several_images_encoder_only(q3):
    """Keep-all reproduces the unpatched model; with pruning each image's tokens stay in their own span and carry
    positions of their own image only (budgets per image)."""
    x = tiny_qwen3_multi_inputs(q3, TWO, seed=2)
    ref = q3(**x).logits
    with vtprune.apply(q3, vtprune.VisionZip(None, 0)):
        torch.testing.assert_close(q3(**x).logits, ref, atol=1e-5, rtol=1e-5)
    full = q3.model.get_rope_index(x["input_ids"], x["mm_token_type_ids"], image_grid_thw=x["image_grid_thw"],
                                   attention_mask=x["attention_mask"])[0]
    seen = {}
    hook = q3.model.language_model.register_forward_pre_hook(lambda m, a, k: seen.update(pos=k["position_ids"]),
                                                             with_kwargs=True)
    try:
        with vtprune.apply(q3, vtprune.VisionZip(0.5, 0.125)) as h:
            q3(**x)
            assert h.stats.visual_tokens_per_row[0] == [(8 + 2) + (12 + 3)] * 4
            assert h.stats.visual_tokens_per_row[1] == [8 + 2] * 4
    finally:
        hook.remove()
    ids = x["input_ids"][0]
    runs = _spans(ids, IMAGE_TOKEN)
    out_runs, shift = [], 0
    for (s, e), n in zip(runs, (10, 15)):  # the pruned row: each image span shortened to its kept tokens
        out_runs.append((s - shift, s - shift + n))
        shift += (e - s) - n
    pad = seen["pos"].shape[-1] - (ids.shape[0] - shift)  # row 0 is the longest: no padding
    assert pad == 0
    for (s, e), (os_, oe) in zip(runs, out_runs):
        own = {tuple(full[:, 0, p].tolist()) for p in range(s, e)}
        got = {tuple(seen["pos"][:, 0, p].tolist()) for p in range(os_, oe)}
        assert got <= own and len(got) == oe - os_


def test_video_encoder_only(q3):
    """A 3-frame-group video: one span per frame group, pruned per frame group; keep-all reproduces the unpatched
    model, also through generate."""
    v = tiny_qwen3_video_inputs(q3, frames=3)
    ref, ref_gen = q3(**v).logits, q3.generate(**v, **GEN)
    with vtprune.apply(q3, vtprune.VisionZip(None, 0)):
        torch.testing.assert_close(q3(**v).logits, ref, atol=1e-5, rtol=1e-5)
        assert torch.equal(q3.generate(**v, **GEN), ref_gen)
    with vtprune.apply(q3, vtprune.VisionZip(0.25, 0.125)) as h:
        q3(**v)
        assert h.stats.visual_tokens_per_layer == [3 * (4 + 2)] * 4
        assert torch.equal(q3.generate(**v, **GEN), q3.generate(**v, **GEN, use_cache=False))
    assert len(_spans(v["input_ids"][0], VIDEO_TOKEN)) == 3


@pytest.mark.parametrize("name", ["visiondrop", "fastv", "alvts"])
def test_video_span_readers(q3, name):
    """Span readers take a video of one or several frame groups (one span each, a timestamp between them)."""
    keep_all = {"visiondrop": vtprune.VisionDrop(tokens=None), "fastv": vtprune.FastV(layer=1, ratio=1.0),
                "alvts": vtprune.ALVTS(keep=None, backend="reference")}[name]
    for frames in (1, 2):
        one = tiny_qwen3_video_inputs(q3, frames=frames, grid=(8, 12))
        ref = q3(**one).logits
        with vtprune.apply(q3, keep_all):
            torch.testing.assert_close(q3(**one).logits, ref, atol=1e-5, rtol=1e-5)
        with vtprune.apply(q3, METHODS[name]()) as h:
            q3.generate(**one, **GEN)
            assert h.stats.visual_tokens_per_layer[-1] < 24 * frames
            assert [u[0] for u in h.stats.unit_tokens] == [24] * frames


# ---------------------------------------------------------------------------------------------- ALVTS and q/k norms
def test_alvts_oracle_applies_qk_norms(q3, qbatch):
    """Calibration's target S* for a Qwen3 layer equals the score built from the layer's own (eager) attention
    probabilities, which pass through q_norm / k_norm."""
    lm = q3.model.language_model
    x = row(qbatch, 1)
    seen = {}
    hook = lm.layers[1].register_forward_pre_hook(lambda m, a, k: seen.update(h=a[0], k=k), with_kwargs=True)
    q3(**x)
    hook.remove()
    layer = lm.layers[1]
    h = layer.input_layernorm(seen["h"])
    attn = layer.self_attn
    impl = attn.config._attn_implementation
    attn.config._attn_implementation = "eager"
    try:
        causal = torch.full((h.shape[1],) * 2, float("-inf")).triu(1)[None, None]
        probs = attn(h, position_embeddings=seen["k"]["position_embeddings"], attention_mask=causal)[1].mean(1)[0]
    finally:
        attn.config._attn_implementation = impl
    ids = x["input_ids"][0]
    where = (ids == IMAGE_TOKEN).nonzero().flatten()
    s, n = int(where[0]), len(where)
    cols = probs[:, s:s + n]
    text = torch.ones(len(ids), dtype=torch.bool)
    text[s:s + n] = False
    truth = cols[s:s + n].mean(0) * cols[text].mean(0)
    got = full_rank_scores(layer, h, seen["k"]["position_embeddings"], torch.tensor([[s, n]]))[0]
    torch.testing.assert_close(got, truth, atol=1e-6, rtol=1e-4)


def test_alvts_svd_form_accounts_for_qk_norms(q3, qbatch):
    """The SVD initialisation's bilinear form folds in the q/k norm gains and the heads' RMS: its pre-RoPE logits
    are much closer to the layer's normed ones than those of the plain ``W_q^T W_k`` form."""
    lm = q3.model.language_model
    seen = {}
    hook = lm.layers[2].register_forward_pre_hook(lambda m, a, k: seen.update(h=a[0]), with_kwargs=True)
    q3(**row(qbatch, 0))
    hook.remove()
    layer = lm.layers[2]
    attn = layer.self_attn
    h = layer.input_layernorm(seen["h"])[0].double()  # [L, D]
    L, d = h.shape[0], attn.head_dim
    q = attn.q_norm(attn.q_proj(h.float()).view(L, -1, d)).double().transpose(0, 1)  # [H, L, d]
    k = attn.k_norm(attn.k_proj(h.float()).view(L, -1, d)).double().transpose(0, 1)
    k = k.repeat_interleave(q.shape[0] // k.shape[0], 0)
    truth = (q @ k.transpose(1, 2)).mean(0) * attn.scaling  # [L, L] head-averaged pre-RoPE logits
    wq = attn.q_proj.weight.double().view(-1, d, h.shape[1])
    wk = attn.k_proj.weight.double().view(-1, d, h.shape[1])
    wk = wk.repeat_interleave(wq.shape[0] // wk.shape[0], 0)
    plain = torch.einsum("hdi,hdj->ij", wq, wk) * attn.scaling / wq.shape[0]
    folded = bilinear_form(layer)

    def err(m):
        return float((h @ m @ h.T - truth).norm() / truth.norm())

    assert err(folded) < 0.5 * err(plain)


@pytest.mark.skipif(not triton_installed(), reason="Triton is not installed (pip install 'vtprune[triton]')")
def test_alvts_triton_routed_layer_matches_reference(q3, qbatch):
    """The fused routed layer re-runs Qwen3's decoder layer (q/k norms inside its self_attn) as the reference does."""
    with vtprune.apply(q3, vtprune.ALVTS(keep=8, backend="reference")):
        ref = q3(**qbatch).logits
    with vtprune.apply(q3, vtprune.ALVTS(keep=8, backend="triton")):
        out = q3(**qbatch).logits
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


def test_alvts_calibration_walk_adds_deepstack(q3, qbatch):
    """Calibration replays the decoder layer by layer from the first layer's inputs; with Qwen3-VL it must add the
    deepstack levels after layers 0 and 1 as the model does, or layers 1 and 2 would be fitted on other inputs."""
    from vtprune.alvts.calibrate import _walk, capture_layer_inputs

    x = row(qbatch, 0)
    lm = q3.model.language_model
    truth = {}
    hooks = [lm.layers[i].input_layernorm.register_forward_pre_hook(lambda m, a, i=i: truth.update({i: a[0]}))
             for i in range(4)]
    q3(**x)
    for h in hooks:
        h.remove()
    s = int((x["input_ids"][0] == IMAGE_TOKEN).nonzero()[0])
    records = capture_layer_inputs(q3, [dict(x, visual_spans=torch.tensor([[s, 24]]))])
    assert len(records[0]["deepstack"][1]) == 2
    for i, items in _walk(lm.layers, records, "", False):
        torch.testing.assert_close(items[0][0], lm.layers[i].input_layernorm(truth[i]), atol=1e-5, rtol=1e-5)


def test_images_and_video_in_one_prompt(q3):
    """An image, a 2-frame-group video and another image in one prompt (and a video-only row): the units are placed
    in prompt order, so a keep-all encoder stage reproduces the unpatched model; a pruning one keeps each unit's
    budget in its own span."""
    x = tiny_qwen3_multi_inputs(q3, [[3, (8, 8), 2, (2, 8, 12), 2, (8, 12), 4], [5, (1, 8, 8), 3]], seed=4)
    ref = q3(**x).logits
    with vtprune.apply(q3, vtprune.VisionZip(None, 0)):
        torch.testing.assert_close(q3(**x).logits, ref, atol=1e-5, rtol=1e-5)
    with vtprune.apply(q3, vtprune.VisionZip(0.5, 0)) as h:
        out = q3(**x)
        assert h.stats.visual_tokens_per_row[0] == [8 + 12 + 12 + 12] * 4
        assert h.stats.visual_tokens_per_row[1] == [8] * 4
    assert out.kept_positions.shape[1] == ref.shape[1] - (16 + 24 + 24 + 24) // 2
    with vtprune.apply(q3, METHODS["fastv"]()) as h:  # ratio 0.25 of each unit, in its own span
        q3(**x)
        assert h.stats.unit_tokens == [[16, 4], [24, 6], [24, 6], [24, 6]]
        assert h.stats.unit_tokens_per_row[1] == [[16, 4]]
