"""Public op ``routed_layer`` (docs/ops.md#routed_layer, ALVTS skip-and-reintegrate) and its attention-mask helper."""

from __future__ import annotations

import torch

from vtprune import _backend
from vtprune._compat import cache_kwargs
from vtprune._host import rows_summary
from vtprune.ops import _checks


def _check_index(routed_idx, B: int, L: int, device: torch.device) -> None:
    _checks.tensor("routed_idx", routed_idx, ndim=2, dtypes=(torch.int64,))
    _checks.host_device_ok("routed_idx", routed_idx, device)
    if routed_idx.shape[0] != B or not 1 <= routed_idx.shape[1] <= L:
        raise ValueError(f"routed_idx must have shape [B, K] = [{B}, K] with 1 <= K <= L = {L}, "
                         f"got {tuple(routed_idx.shape)}")


def _check_index_values(routed_idx, L: int) -> None:
    if routed_idx.is_cpu:  # values are checked where that costs no device sync (once per tensor)
        ascending, first, lasts = rows_summary(routed_idx)
        if not ascending:
            raise ValueError(f"routed_idx must be strictly ascending per row, got {routed_idx.tolist()}")
        if first < 0 or max(lasts) >= L:  # ascending: the ends bound the row
            raise ValueError(f"routed_idx: every index must lie in [0, {L}), got {routed_idx.tolist()}")


def _check_position_embeddings(position_embeddings, B: int, L: int) -> None:
    if not isinstance(position_embeddings, (tuple, list)) or len(position_embeddings) != 2:
        raise ValueError("position_embeddings must be the (cos, sin) pair of the full sequence, "
                         f"got {type(position_embeddings).__name__}")
    for name, t in zip(("cos", "sin"), position_embeddings):
        _checks.tensor(f"position_embeddings ({name})", t)
        if t.dim() < 3 or t.shape[-2] != L or t.shape[-3] not in (1, B):
            raise ValueError(f"position_embeddings ({name}) must have shape [..., B or 1, L, d] with B = {B}, "
                             f"L = {L} (the full sequence), got {tuple(t.shape)}")


def _check_shapes(hidden_states, routed_idx, position_embeddings, attention_mask, past_key_values) -> None:
    _checks.tensor("hidden_states", hidden_states, ndim=3, dtypes=_checks.FLOAT_DTYPES)
    B, L, _ = hidden_states.shape
    _check_index(routed_idx, B, L, hidden_states.device)
    _check_position_embeddings(position_embeddings, B, L)
    K = routed_idx.shape[1]
    if isinstance(attention_mask, torch.Tensor):
        # key axis: the K routed tokens, plus whatever the layer has cached
        kv_ok = attention_mask.shape[-1] == K if past_key_values is None else attention_mask.shape[-1] >= K
        if attention_mask.dim() not in (2, 4) or attention_mask.shape[0] not in (1, B) or not kv_ok or \
                (attention_mask.dim() == 4 and attention_mask.shape[-2] != K):
            raise ValueError(
                f"attention_mask must be the routed sequence's mask (2-D [B, Kkv] or 4-D [B, 1, K={K}, Kkv], "
                f"Kkv = K without a cache; see routed_attention_mask), got {tuple(attention_mask.shape)}"
            )


def routed_layer(layer, hidden_states, routed_idx, *, position_embeddings, attention_mask=None,
                 past_key_values=None, cache_position=None, backend="auto", **layer_kwargs):
    """Run a decoder layer on the routed tokens only: ``y = x; y[I] = Layer(x[I])``, written into ``x``.

    The layer's attention runs among the routed tokens (causal in original order, since ``routed_idx`` is
    ascending), each at its **original** RoPE position; skipped tokens pass through bit-for-bit unchanged.
    With ``routed_idx = arange(L)`` the result equals the unpatched layer exactly (reference backend).

    **In place:** the routed rows of ``hidden_states`` are overwritten and ``hidden_states`` itself is
    returned (no full-size copy). Clone first if the input is still needed (e.g. recorded hidden states).
    Inference only (no autograd through the in-place write).

    Backends: ``reference`` gathers, calls ``layer`` itself and scatters (any decoder layer). ``triton`` and
    ``cuda`` (one walk, :mod:`vtprune._routed_fused`, with their own row kernels) re-run the layer as
    norm -> self_attn -> residual -> norm -> mlp -> residual with the gather fused into the first RMSNorm,
    residual + second RMSNorm fused, and the scatter fused into the last residual add; the attention and MLP
    are the layer's own modules on the compact ``[B, K, D]`` batch. They take LLaMA, Mistral, Qwen2 and
    Qwen2.5-VL text decoder layers (RMSNorms with ``weight``/``variance_epsilon``) and raise ``ValueError``
    for others. No backend loops over batch rows or reads device values on the host.

    Parameters
    ----------
    layer : Hugging Face decoder layer (``input_layernorm``, ``self_attn``, ``post_attention_layernorm``,
        ``mlp``)
    hidden_states : Tensor [B, L, D]
    routed_idx : int64 Tensor [B, K], strictly ascending per row, ``1 <= K <= L``. On the CPU its values are
        checked; on the GPU they are trusted (a check would synchronise every layer), and the Triton and CUDA
        kernels mask any out-of-range index rather than touch memory outside ``hidden_states``.
    position_embeddings : (cos, sin) of the **full** sequence, each ``[..., B or 1, L, d]``
    attention_mask : what the layer's attention expects for the **routed** sequence (None, 4-D
        ``[B, 1, K, Kkv]``, or the 2-D mask of flash-attention); build it with :func:`routed_attention_mask`
    past_key_values : Cache, optional; the layer appends only its K routed tokens to it
    cache_position : optional, passed through to the layer
    backend : "auto" | "reference" | "triton" | "cuda"
    **layer_kwargs : passed through to the layer (``use_cache``, ...); ``position_ids`` is accepted and not
        forwarded: positions come from ``position_embeddings``, and non-contiguous ids would make
        FlashAttention-2 read a batch-1 routed sequence as packed sequences.

    Returns
    -------
    ``hidden_states`` (the same tensor), [B, L, D].

    Example
    -------
    >>> idx = torch.tensor([[0, 1, 4, 6, 7]])          # text + 3 picked image tokens of 8
    >>> mask = routed_attention_mask(model.config, idx)
    >>> y = routed_layer(model.model.layers[5], h, idx, position_embeddings=(cos, sin), attention_mask=mask)
    """
    pe = position_embeddings
    pair = isinstance(pe, (tuple, list)) and len(pe) == 2
    sig = _checks.signature("routed", past_key_values is None,
                            tensors=(hidden_states, routed_idx, attention_mask, *pe)) if pair else None
    if not _checks.passed(sig):
        _check_shapes(hidden_states, routed_idx, position_embeddings, attention_mask, past_key_values)
        _checks.remember(sig)
    _check_index_values(routed_idx, hidden_states.shape[1])
    position_ids = layer_kwargs.pop("position_ids", None)
    if position_ids is not None and not isinstance(position_ids, torch.Tensor):
        raise ValueError(f"position_ids must be a Tensor or None, got {type(position_ids).__name__}")
    impl = _backend.implementation("routed_layer", backend, hidden_states)
    return impl(layer, hidden_states, routed_idx, position_embeddings=position_embeddings,
                attention_mask=attention_mask, past_key_values=past_key_values, cache_position=cache_position,
                **layer_kwargs)


def routed_key_padding_mask(routed_idx, key_padding_mask, past_length: int = 0) -> torch.Tensor:
    """The 2-D key padding mask of a routed call: ``[B, past_length + K]`` (cached columns, then routed).

    ``key_padding_mask [B, past_length + L]``: the layer's cached tokens, then the current full sequence.
    """
    cur = key_padding_mask[:, past_length:].gather(1, routed_idx.to(key_padding_mask.device))
    return torch.cat([key_padding_mask[:, :past_length], cur], dim=1)


def routed_attention_mask(config, routed_idx, key_padding_mask=None, past_key_values=None, cache_position=None,
                          *, layer_idx: int = 0, dtype: torch.dtype = torch.float32, materialize: bool = False):
    """The attention mask a decoder layer expects for the routed sequence, for the config's attention backend.

    Causal among the routed tokens (their order is the original order), padding excluded, and with a cache
    every token the layer cached earlier is visible. Built by ``transformers.masking_utils.create_causal_mask``
    for ``config._attn_implementation``: ``None`` or a 4-D bool mask for ``sdpa``, a 4-D additive mask for
    ``eager``, a 2-D mask or ``None`` for ``flash_attention_2``.

    Parameters
    ----------
    config : the language model's config (its ``_attn_implementation`` decides the mask's form)
    routed_idx : int64 Tensor [B, K]  routed positions in the current input (decode step: ``[[0]] * B``)
    key_padding_mask : bool/int Tensor [B, P + L], optional  True/1 for a real token, where ``P`` is the number
        of tokens **this layer** has cached (``past_key_values.get_seq_length(layer_idx)``) and ``L`` the length
        of the current (full, un-routed) input. Its last ``L`` columns are gathered at ``routed_idx``; the first
        ``P`` are the cached tokens' own padding (a caller that routed them earlier gathers them the same way:
        :func:`routed_key_padding_mask`).
    past_key_values : Cache, optional  its layer ``layer_idx`` sizes the key axis (``P + K``)
    cache_position : optional  accepted for callers that carry it; transformers >= 5.17 derives the cache
        offset from ``past_key_values``, so only its length (K) is checked
    layer_idx : the decoder layer this mask is for (each routed layer caches a different number of tokens)
    dtype : the attention's dtype (sets the additive mask's minimum for ``eager``)
    materialize : bool, default False. False: transformers reads ``key_padding_mask`` on the host (one
        device-to-host sync per call) to see whether a plain causal mask will do (then ``sdpa`` gets ``None``).
        True: the mask is built from ``key_padding_mask`` without that read, for a caller that knows on the host
        that it holds padding (``sdpa`` / ``eager``; flash-attention's mask builder still reads it). A caller
        that knows there is no padding passes ``key_padding_mask=None``: no read either.

    Returns
    -------
    None or Tensor (on ``key_padding_mask``'s device, else ``routed_idx``'s), to pass as ``attention_mask`` to
    :func:`routed_layer`.

    Example
    -------
    >>> mask = routed_attention_mask(model.config, idx, attention_mask_2d, cache, layer_idx=5,
    ...                              dtype=torch.bfloat16)
    """
    from transformers.masking_utils import create_causal_mask

    _checks.tensor("routed_idx", routed_idx, ndim=2, dtypes=(torch.int64,))
    B, K = routed_idx.shape
    if materialize and key_padding_mask is None:
        raise ValueError("materialize=True needs the key_padding_mask to build the mask from, got None")
    types = getattr(config, "layer_types", None)
    if types is not None and layer_idx < len(types) and types[layer_idx] != "full_attention":
        raise ValueError(f"layer_idx {layer_idx}: routed layers need full attention, the config says "
                         f"{types[layer_idx]!r} (a sliding window is defined on original distances)")
    past = 0 if past_key_values is None else int(past_key_values.get_seq_length(layer_idx))
    if cache_position is not None and cache_position.shape[-1] != K:
        raise ValueError(f"cache_position must have K = {K} entries (one per routed token), "
                         f"got shape {tuple(cache_position.shape)}")
    mask2d = None
    if key_padding_mask is not None:
        _checks.tensor("key_padding_mask", key_padding_mask, ndim=2)
        if key_padding_mask.shape[0] != B or key_padding_mask.shape[1] < past + 1:
            raise ValueError(f"key_padding_mask must have shape [B, P + L] = [{B}, {past} + L] (P = tokens layer "
                             f"{layer_idx} has cached), got {tuple(key_padding_mask.shape)}")
        mask2d = routed_key_padding_mask(routed_idx, key_padding_mask.bool(), past)
    device = routed_idx.device if key_padding_mask is None else key_padding_mask.device
    shape_only = torch.empty(B, K, 0, dtype=dtype, device=device)  # create_causal_mask reads shape/dtype/device
    return create_causal_mask(config=config, inputs_embeds=shape_only, attention_mask=mask2d,
                              **cache_kwargs(past_key_values), layer_idx=layer_idx,
                              allow_is_causal_skip=not materialize)
