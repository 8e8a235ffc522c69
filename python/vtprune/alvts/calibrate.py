"""ALVTS importance-consistency calibration: fit each layer's ``U, V`` to the full-rank score ``S*``.

Objective (paper, "importance consistency alignment"): per layer, minimise the mean squared error between the
selector score ``S = S_V2V * S_T2V`` of :func:`vtprune.ops.lowrank_scores` and the same score ``S*`` computed
from the layer's **own** attention: its q/k projections (biases included, and q/k norms where the layer has
them), its RoPE at the true positions, the causal/padding mask, one softmax per query head, then the mean over
query heads. RoPE and biases are in ``S*`` on purpose: they are what the selector should emulate and what the
bias-free, position-free SVD initialisation cannot express. The model is frozen; only ``U, V`` of the current
layer are optimised.

Layer by layer, as in post-training quantisation: the calibration batches are run up to the first decoder
layer once, then each layer's inputs are the unpruned outputs of the previous layer (plus Qwen3-VL's deepstack
features where the model adds them), so no layer's fit depends on another's factors. The loss is divided by
the batch's mean square of ``S*`` (a constant per batch: same minimiser as the MSE) because raw scores are
~1/L^2 and Adam's epsilon would otherwise swamp the gradients.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Iterable, Iterator, Sequence

import torch
from tqdm.auto import tqdm

from vtprune._host import host_max
from vtprune.alvts.factors import SelectorFactors, decoder_layers, init_factors
from vtprune.reference._common import head_chunk, span_index
from vtprune.reference.lowrank_scores import lowrank_scores as reference_lowrank_scores

# Keyword arguments of the first decoder layer's call that are not re-used when replaying it: the replay
# runs without a cache.
_DROP_KWARGS = ("past_key_values", "past_key_value", "cache", "use_cache", "cache_position")


class _Captured(Exception):
    """Raised by the capture hook to stop the model's forward after the first decoder layer's inputs."""


def capture_layer_inputs(model: torch.nn.Module, batches: Iterable[dict], *,
                         layers: Sequence[torch.nn.Module] | None = None) -> list[dict]:
    """Run ``model`` on each batch up to its first decoder layer and record that layer's inputs.

    Parameters
    ----------
    model : the VLM or its language model (anything whose forward reaches the decoder layers). Batches with
        images (``pixel_values``, ...) need the VLM: a language model would take the image placeholders' plain
        token embeddings for the image.
    batches : dicts of ``model(**batch)`` keyword arguments plus ``visual_spans`` (int64 [B, 2], required)
        and optionally ``key_padding_mask`` (bool [B, L]; default: the batch's 2-D ``attention_mask``). Every
        other key must be a named parameter of ``model``'s forward (``ValueError`` otherwise: a key that would
        only land in its ``**kwargs`` is most likely ignored there, such as ``pixel_values`` given to a language
        model).
    layers : the decoder layers whose first layer's inputs are recorded; default
        :func:`vtprune.alvts.factors.decoder_layers` of ``model``

    Returns
    -------
    list of records ``{"hidden_states": [B, L, D], "layer_kwargs": dict, "visual_spans", "key_padding_mask"}``,
    the format :func:`calibrate` and :func:`selector_loss` also accept directly. A model with deepstack features
    (Qwen3-VL) adds ``"deepstack": (visual_pos_masks [B, L], [levels [S, D]])``, which the layer-by-layer walk
    adds after the first layers as the model does.
    """
    first = (decoder_layers(model) if layers is None else list(layers))[0]
    if not any(m is first for m in model.modules()):
        raise ValueError(f"layers: not the decoder layers of the given {type(model).__name__}")
    named = _named_parameters(model)
    records = []
    for batch in batches:
        batch = dict(batch)
        if "visual_spans" not in batch:
            raise ValueError("batches: every batch needs 'visual_spans' (int64 [B, 2] start, count of the image)")
        spans = batch.pop("visual_spans")
        kpm = batch.pop("key_padding_mask", None)
        unknown = [k for k in batch if k not in named]
        if unknown:
            raise ValueError(
                f"batches: {', '.join(repr(k) for k in unknown)} is not a parameter of "
                f"{type(model).__name__}.forward (it takes {', '.join(sorted(named))}); a key left to its **kwargs "
                "would be ignored. Image inputs need the whole VLM as the model (vtprune.apply passes it to "
                "ALVTS.prepare)"
            )
        if kpm is None and isinstance(batch.get("attention_mask"), torch.Tensor) and batch["attention_mask"].dim() == 2:
            kpm = batch["attention_mask"].bool()
        seen = {}

        def hook(module, args, kwargs, seen=seen):
            seen["hidden_states"] = args[0] if args else kwargs["hidden_states"]
            seen["layer_kwargs"] = {k: v for k, v in kwargs.items() if k not in _DROP_KWARGS and k != "hidden_states"}
            raise _Captured

        def stack_hook(module, args, kwargs, seen=seen):  # Qwen3-VL: levels added after the first layers
            if kwargs.get("deepstack_visual_embeds") is not None:
                seen["deepstack"] = (kwargs["visual_pos_masks"], list(kwargs["deepstack_visual_embeds"]))

        handles = [first.register_forward_pre_hook(hook, with_kwargs=True)]
        owners = [m for m in model.modules()  # the language model whose layer list holds the first layer
                  if isinstance(getattr(m, "layers", None), torch.nn.ModuleList) and any(x is first for x in m.layers)]
        handles += [m.register_forward_pre_hook(stack_hook, with_kwargs=True) for m in owners]
        try:
            with torch.no_grad():
                model(**batch, use_cache=False)
        except _Captured:
            pass
        finally:
            for handle in handles:
                handle.remove()
        if "hidden_states" not in seen:
            raise ValueError("model: its forward never reached the first decoder layer")
        records.append({**seen, "visual_spans": spans, "key_padding_mask": kpm})
    return records


def _named_parameters(model: torch.nn.Module) -> set[str]:
    """Names the class's forward takes explicitly (not through ``*args`` / ``**kwargs``)."""
    params = inspect.signature(type(model).forward).parameters.values()
    return {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)} - {"self"}


def _records(model_or_layers, batches) -> list[dict]:
    batches = list(batches)
    if not batches:
        raise ValueError("batches must contain at least one batch, got none")
    if all("hidden_states" in b for b in batches):
        for b in batches:
            for key in ("layer_kwargs", "visual_spans"):
                if key not in b:
                    raise ValueError(f"batches: a layer-input record needs '{key}', got keys {sorted(b)}")
        return batches
    if not isinstance(model_or_layers, torch.nn.Module) or isinstance(model_or_layers, torch.nn.ModuleList):
        raise ValueError(
            "batches: model inputs need a model to run; pass the model as model_or_layers, or pass layer-input "
            "records (see capture_layer_inputs)"
        )
    return capture_layer_inputs(model_or_layers, batches)


def _masked_probs(logits: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Row softmax over allowed keys; rows with none are zero. Finite fill so gradients never see NaN."""
    logits = logits.masked_fill(~allowed, torch.finfo(logits.dtype).min)
    return torch.softmax(logits, dim=-1) * allowed


def _allowed(L: int, key_padding_mask, device) -> torch.Tensor:
    """bool [B or 1, L, L]: causal and not padding."""
    i = torch.arange(L, device=device)
    allowed = (i[None, :] <= i[:, None])[None]
    return allowed if key_padding_mask is None else allowed & key_padding_mask[:, None, :].to(device)


def _score_from_probs(probs: torch.Tensor, visual_spans, key_padding_mask) -> torch.Tensor:
    """``S = S_V2V * S_T2V`` (docs/ops.md#lowrank_scores) from a row-stochastic ``probs [B, L, L]``: float32 [B, V]."""
    B, L, _ = probs.shape
    dev = probs.device
    vpos, vvalid = span_index(visual_spans, host_max(visual_spans), L, dev)  # [B, V]
    cols = probs.gather(2, vpos[:, None, :].expand(B, L, vpos.shape[1]))  # [B, L(query), V(key)]
    spans = visual_spans.to(dev)
    rows = torch.arange(L, device=dev)
    is_vis = (rows >= spans[:, :1]) & (rows < spans[:, :1] + spans[:, 1:])  # [B, L]
    is_txt = ~is_vis if key_padding_mask is None else key_padding_mask.to(dev) & ~is_vis
    n_txt = is_txt.sum(1, keepdim=True)
    s_v2v = (cols * is_vis[:, :, None]).sum(1) / spans[:, 1:]
    s_t2v = torch.where(n_txt > 0, (cols * is_txt[:, :, None]).sum(1) / n_txt.clamp(min=1), 1.0)
    return torch.where(vvalid, s_v2v * s_t2v, 0.0).float()


def selector_scores(h, u, v, visual_spans, key_padding_mask=None) -> torch.Tensor:
    """The selector score of :func:`vtprune.ops.lowrank_scores`, differentiable in ``u`` and ``v``: the reference
    implementation itself (plain torch ops, so autograd runs through it), so calibration fits exactly what the
    ops compute. float32 [B, largest visual count]."""
    scores = reference_lowrank_scores(h, u, v, visual_spans=visual_spans, key_padding_mask=key_padding_mask)
    return scores[:, :host_max(visual_spans)].float()  # device spans: the reference is L wide, zero past counts


def _rope(attn):
    fn = getattr(sys.modules[type(attn).__module__], "apply_rotary_pos_emb", None)
    if fn is None:
        raise ValueError(f"layer: no apply_rotary_pos_emb next to {type(attn).__name__} to compute the oracle S*")
    return fn


@torch.no_grad()
def full_rank_scores(layer, h, position_embeddings, visual_spans, key_padding_mask=None) -> torch.Tensor:
    """The oracle ``S*`` of a layer: its own post-RoPE, per-head causal attention averaged over query heads.

    Parameters
    ----------
    layer : decoder layer; h : Tensor [B, L, D], its normalised input; position_embeddings : (cos, sin) of
    the layer's call; visual_spans : int64 [B, 2]; key_padding_mask : bool [B, L], optional

    Returns
    -------
    float32 Tensor [B, max visual count]
    """
    attn = layer.self_attn
    B, L, _ = h.shape
    d = attn.head_dim
    q, k = attn.q_proj(h).view(B, L, -1, d), attn.k_proj(h).view(B, L, -1, d)
    if getattr(attn, "q_norm", None) is not None:  # Qwen3: per-head RMS norms of q and k before RoPE
        q, k = attn.q_norm(q), attn.k_norm(k)
    q, k = _rope(attn)(q.transpose(1, 2), k.transpose(1, 2), *position_embeddings)  # [B, H | Hkv, L, d]
    H, group = q.shape[1], q.shape[1] // k.shape[1]
    scaling = float(getattr(attn, "scaling", d**-0.5))
    allowed = _allowed(L, key_padding_mask, h.device)[:, None]  # [B, 1, L, L]
    probs = torch.zeros(B, L, L, dtype=torch.float32, device=h.device)
    step = head_chunk(B, H, L, L)
    for h0 in range(0, H, step):  # head chunks bound the [B, h, L, L] block (LLaVA-NeXT: L ~ 3k)
        heads = torch.arange(h0, min(H, h0 + step), device=h.device)
        logits = q[:, heads].float() @ k[:, heads // group].float().transpose(-1, -2) * scaling
        probs += _masked_probs(logits, allowed).sum(1)
    return _score_from_probs(probs / H, visual_spans, key_padding_mask)


def _relative_mse(s: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return ((s - target) ** 2).sum() / (target**2).sum().clamp(min=1e-30)


def _walk(layers: Sequence[torch.nn.Module], records: list[dict], desc: str, progress: bool) -> Iterator:
    """Yield ``(l, [(h, S*, record), ...])`` per layer, then advance every record through layer ``l``."""
    xs = [r["hidden_states"] for r in records]
    for l, layer in enumerate(tqdm(layers, desc=desc, disable=not progress)):
        items = []
        with torch.no_grad():
            for x, r in zip(xs, records):
                h = layer.input_layernorm(x)
                pe = r["layer_kwargs"]["position_embeddings"]
                items.append((h, full_rank_scores(layer, h, pe, r["visual_spans"], r.get("key_padding_mask")), r))
        yield l, items
        with torch.no_grad():
            outs = [layer(x, **r["layer_kwargs"]) for x, r in zip(xs, records)]
        xs = [_deepstack(o[0] if isinstance(o, tuple) else o, r, l) for o, r in zip(outs, records)]


def _deepstack(x: torch.Tensor, record: dict, l: int) -> torch.Tensor:
    """``x`` with deepstack level ``l`` added to the image positions, as Qwen3-VL's language model does after
    decoder layer ``l`` (records without ``deepstack``: unchanged)."""
    stack = record.get("deepstack")
    if stack is None or l >= len(stack[1]):
        return x
    mask, levels = stack
    x = x.clone()
    x[mask.to(x.device)] += levels[l].to(x.device, x.dtype)
    return x


def selector_loss(model_or_layers, batches, factors: SelectorFactors, *, progress: bool = False) -> list[float]:
    """Per-layer calibration loss (relative MSE of ``S`` vs ``S*``, averaged over batches) of ``factors``.

    ``batches`` as in :func:`calibrate`. Returns one float per decoder layer.
    """
    layers = decoder_layers(model_or_layers)
    _check_factors(factors, layers)
    losses = []
    for l, items in _walk(layers, _records(model_or_layers, batches), "ALVTS selector loss", progress):
        u, v = factors[l]
        with torch.no_grad():
            vals = [_relative_mse(selector_scores(h, u, v, r["visual_spans"], r.get("key_padding_mask")), t)
                    for h, t, r in items]
        losses.append(float(torch.stack(vals).mean()))
    return losses


def _check_factors(factors, layers) -> None:
    if not isinstance(factors, SelectorFactors):
        raise ValueError(f"factors must be a SelectorFactors, got {type(factors).__name__}")
    if factors.num_layers != len(layers):
        raise ValueError(f"factors has {factors.num_layers} layers, the model has {len(layers)} decoder layers")


def calibrate(
    model_or_layers,
    batches: Iterable[dict],
    *,
    factors: SelectorFactors | None = None,
    rank: int | None = None,
    steps: int = 100,
    lr: float = 1e-2,
    progress: bool = True,
) -> SelectorFactors:
    """Fit every layer's selector factors to its full-rank score ``S*`` (model frozen, one layer at a time).

    Parameters
    ----------
    model_or_layers : the (vision-)language model, or its list of decoder layers when ``batches`` are
        layer-input records
    batches : model-input dicts (see :func:`capture_layer_inputs`: forward kwargs + ``visual_spans``) or
        layer-input records ``{"hidden_states", "layer_kwargs", "visual_spans", "key_padding_mask"}``
    factors : starting point, default the SVD initialisation (:func:`vtprune.alvts.init_factors`)
    rank : R of the default initialisation
    steps : Adam steps per layer (each on one batch, cycling through the batches)
    lr : Adam step size relative to the RMS of the layer's initial factors (scale-free across models)
    progress : tqdm bar over the layers

    Returns
    -------
    SelectorFactors (new tensors, the input factors' dtype/device) with ``meta["source"] == "calibrated"``.

    Example
    -------
    >>> f = calibrate(model, [{"input_ids": ids, "pixel_values": px, "visual_spans": spans}], steps=200)
    """
    layers = decoder_layers(model_or_layers)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be an int >= 0, got {steps!r}")
    if not isinstance(lr, (int, float)) or not lr > 0:
        raise ValueError(f"lr must be a positive float, got {lr!r}")
    factors = init_factors(layers, rank) if factors is None else factors
    _check_factors(factors, layers)
    records = _records(model_or_layers, batches)
    us, vs = [], []
    for l, items in _walk(layers, records, "ALVTS calibration", progress):
        u0, v0 = factors[l]
        u = u0.detach().float().clone().requires_grad_(True)
        v = v0.detach().float().clone().requires_grad_(True)
        scale = float(torch.cat([u.detach(), v.detach()]).pow(2).mean().sqrt())
        opt = torch.optim.Adam([u, v], lr=lr * max(scale, 1e-12))
        with torch.enable_grad():
            for step in range(steps):
                h, target, r = items[step % len(items)]
                loss = _relative_mse(selector_scores(h, u, v, r["visual_spans"], r.get("key_padding_mask")), target)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        us.append(u.detach().to(u0.dtype))
        vs.append(v.detach().to(v0.dtype))
    meta = {**factors.meta, "source": "calibrated", "calibration_steps": str(steps)}
    return SelectorFactors(us, vs, meta)
