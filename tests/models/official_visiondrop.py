"""A plain, step-by-step re-statement of the official VisionDrop algorithm (github Ruixxxx/VisionDrop,
docs/methods.md#visiondrop) for batch size 1, written with torch ops only (no vtprune code), to check the patched model.

Encoder: CLIP layer -2's [CLS] attention row summed over heads -> top (dominant-1) patches, [CLS] kept ->
merge the rest (uniform-stride targets, argmax cosine of the head-averaged keys, target + mean of members).
LLM: after each stage layer, recompute the next layer's q/k (input norm, projections, RoPE, causal mask),
softmax over all keys in fp32, mean over heads, image rows x image columns, mean over image queries ->
top-k dominant, merge the rest with the post-RoPE keys averaged over heads; positions re-compacted.
"""

import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb


def merge(x, metric, keep, contextual):
    """x [N, D], metric [N, dk], keep bool [N] -> [dominant (in order), contextual] tokens."""
    dominant = x[keep]
    rest_x, rest_m = x[~keep], F.normalize(metric[~keep], dim=-1)
    if contextual == 0:
        return dominant
    step = max(1, rest_x.shape[0] // contextual)
    targets = torch.arange(0, rest_x.shape[0], step)[:contextual]
    is_target = torch.zeros(rest_x.shape[0], dtype=torch.bool)
    is_target[targets] = True
    sim = rest_m[~is_target] @ rest_m[targets].T
    assign = sim.argmax(-1)
    members = rest_x[~is_target]
    out = []
    for j, t in enumerate(targets):
        group = members[assign == j]
        out.append(rest_x[t] + (group.mean(0) if len(group) else 0))
    return torch.cat([dominant, torch.stack(out)])


@torch.no_grad()
def official_logits(model, input_ids, pixel_values, encoder, stages):
    cfg = model.config
    tower = model.model.vision_tower
    vout = tower(pixel_values, output_hidden_states=True)
    layer = tower.encoder.layers[-2] if hasattr(tower, "encoder") else tower.vision_model.encoder.layers[-2]
    h_in = layer.layer_norm1(vout.hidden_states[-3])[0]  # input of layer -2's attention, [577, Dv]
    attn = layer.self_attn
    q = attn.q_proj(h_in).view(h_in.shape[0], attn.num_heads, -1).transpose(0, 1)
    k = attn.k_proj(h_in).view(h_in.shape[0], attn.num_heads, -1).transpose(0, 1)
    probs = torch.softmax(q @ k.transpose(1, 2) * attn.scale, dim=-1)  # [H, N, N]
    cls_attention = probs[:, 0, 1:].sum(0)
    top = cls_attention.topk(encoder[0] - 1).indices + 1
    keep = torch.zeros(h_in.shape[0], dtype=torch.bool)
    keep[0] = True
    keep[top] = True
    feats = vout.hidden_states[-2][0]
    image = merge(feats, k.mean(0), keep, encoder[1])
    image = model.model.multi_modal_projector(image)

    ids = input_ids[0]
    where = (ids == cfg.image_token_id).nonzero().flatten()
    embed = model.model.get_input_embeddings()
    hidden = torch.cat([embed(ids[: where[0]]), image, embed(ids[where[-1] + 1:])])[None]
    start, count = int(where[0]), image.shape[0]
    lm = model.model.language_model
    for i, dec in enumerate(lm.layers):
        pos = torch.arange(hidden.shape[1])[None]
        hidden = dec(hidden, attention_mask=None, position_embeddings=lm.rotary_emb(hidden, pos), position_ids=pos)
        if i + 1 in stages:
            d, c = stages[i + 1]
            nxt = lm.layers[i + 1]
            h = nxt.input_layernorm(hidden)
            a = nxt.self_attn
            L = h.shape[1]
            qs = a.q_proj(h).view(1, L, -1, a.head_dim).transpose(1, 2)
            ks = a.k_proj(h).view(1, L, -1, a.head_dim).transpose(1, 2)
            qs, ks = apply_rotary_pos_emb(qs, ks, *lm.rotary_emb(hidden, pos))
            ks_full = ks.repeat_interleave(qs.shape[1] // ks.shape[1], dim=1)
            logits = (qs @ ks_full.transpose(2, 3)).float() / a.head_dim**0.5
            logits = logits + torch.full((L, L), float("-inf")).triu(1)
            att = torch.softmax(logits, -1).mean(1)[0]  # [L, L]
            score = att[start:start + count, start:start + count].mean(0)
            keep = torch.zeros(count, dtype=torch.bool)
            keep[score.topk(d).indices] = True
            img = merge(hidden[0, start:start + count], ks[0].mean(0)[start:start + count], keep, c)
            hidden = torch.cat([hidden[:, :start], img[None], hidden[:, start + count:]], 1)
            count = img.shape[0]
    return model.lm_head(lm.norm(hidden))
