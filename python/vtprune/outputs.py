"""A patched prefill's outputs in the caller's (input) coordinates: logits, ``labels=`` loss and the position map.

A pruned prefill runs the language model on a shorter sequence (image tokens dropped or merged, left padding a
row no longer needs removed), so the model's own head gives logits for that sequence. Callers index logits by
input position (``logits[:, t]`` scores ``input_ids[:, t + 1]``: perplexity, multiple-choice loglikelihood,
lmms-eval's HF wrappers), so a patched forward with ``pixel_values`` (or a video's ``pixel_values_videos``) returns
them in input coordinates:

* ``out.kept_positions`` int64 [B, L'] (on the device): the input index of each position of the sequence the
  language model ran on after the last prune; -1 where a compaction added left padding (input padding that stays
  keeps its index). Text tokens are never pruned, so every text position of the input appears in it.
* ``out.logits`` [B, L, V] when the model computed logits for every position (the default ``logits_to_keep=0``):
  the pruned sequence's logit rows placed so that ``logits[:, t]`` is the model's prediction of input token
  ``t + 1``: the row of pruned position ``j`` goes to input index ``kept_positions[:, j + 1] - 1`` (the last real
  position of a row to its own index). For text this is the position itself; the last kept image token's row
  goes to the last image placeholder, which is what predicts the text after the image. Input positions without a
  row (pruned image placeholders) hold NaN, so using them cannot go unnoticed. A keep-all method gives exactly the
  unpatched model's logits. With ``logits_to_keep=k > 0`` (what ``generate`` asks for) the logits are those of the
  pruned sequence's last ``k`` positions, as computed: ``kept_positions[:, -k:]`` maps them.
* ``labels=`` [B, L] (input coordinates, -100 = ignored) gives ``out.loss`` from the model's own
  ``loss_function`` over the pruned sequence with each pruned position labelled by its input position
  (``labels.gather(1, kept_positions)``): every labelled text token is a target exactly as in the unpatched model,
  predicted by the token before it in the sequence the model ran on. A labelled position that was pruned (an
  image placeholder) is refused with a ``ValueError``, not dropped. A keep-all method gives exactly the unpatched
  loss. One target is not the unpatched model's: a left-padded row's first real token, which the unpatched model
  predicts from a padding position, is no target when the method dropped that padding (a pruned batch is re-packed
  to its longest row); label it -100 for a loss that every method computes alike.

:func:`pruned_logits` maps input-coordinate logits back to the pruned sequence.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100


def prediction_index(kept_positions: torch.Tensor) -> torch.Tensor:
    """Input index that each pruned position's logit row goes to (-1: none, added padding).

    kept_positions : int64 [B, L'] input index per pruned position (-1: added padding), increasing along a row
    Returns int64 [B, L']: ``kept_positions[:, j + 1] - 1`` where position ``j + 1`` is from the input, else
    ``kept_positions[:, j]``.
    """
    nxt = torch.cat([kept_positions[:, 1:], torch.full_like(kept_positions[:, :1], -1)], 1)
    index = torch.where(nxt >= 0, nxt - 1, kept_positions)
    return torch.where(kept_positions >= 0, index, -1)


def to_input_coordinates(logits: torch.Tensor, kept_positions: torch.Tensor, length: int) -> torch.Tensor:
    """Place the pruned sequence's logits ``[B, L', V]`` at input positions: ``[B, length, V]``, NaN where no row
    goes (see the module docstring for the rule)."""
    B, Lp, V = logits.shape
    if kept_positions.shape != (B, Lp):
        raise ValueError(f"kept_positions must have shape {(B, Lp)} (the logits' first two dimensions), got "
                         f"{tuple(kept_positions.shape)}")
    index = prediction_index(kept_positions.to(logits.device))
    out = logits.new_full((B, length + 1, V), float("nan"))  # column `length` takes the rows that go nowhere
    out.scatter_(1, index.masked_fill(index < 0, length)[:, :, None].expand(-1, -1, V), logits)
    return out[:, :length]


def pruned_logits(logits: torch.Tensor, kept_positions: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`to_input_coordinates`: input-coordinate logits [B, L, V] back to the pruned sequence
    [B, L', V] (rows of added padding are NaN).

    Example
    -------
    >>> out = model(**inputs)                                            # doctest: +SKIP
    >>> vtprune.outputs.pruned_logits(out.logits, out.kept_positions)    # what the language model computed
    """
    index = prediction_index(kept_positions.to(logits.device))
    rows = logits.gather(1, index.clamp(min=0)[:, :, None].expand(-1, -1, logits.shape[-1]))
    return rows.masked_fill((index < 0)[:, :, None], float("nan"))


def pruned_labels(labels: torch.Tensor, kept_positions: torch.Tensor) -> torch.Tensor:
    """Input-coordinate ``labels`` [B, L] as labels of the pruned sequence [B, L'] (-100 on added padding).

    Raises ``ValueError`` when a labelled input position that the loss would use (any but the first) was pruned:
    its token is no longer in the sequence, and dropping it silently would change the loss. Reads one boolean on
    the host."""
    kept = kept_positions.to(labels.device)
    B, L = labels.shape
    present = torch.zeros(B, L + 1, dtype=torch.bool, device=labels.device)
    present.scatter_(1, kept.masked_fill(kept < 0, L), True)
    lost = (labels != IGNORE_INDEX) & ~present[:, :L]
    lost[:, 0] = False  # the first position is never a target
    if bool(lost.any()):
        rows, cols = lost.nonzero().T.tolist()
        where = ", ".join(f"row {b} position {t}" for b, t in list(zip(rows, cols))[:5])
        raise ValueError(f"labels: {len(rows)} labelled input positions were pruned by the method ({where}"
                         f"{', ...' if len(rows) > 5 else ''}); pruned positions are image tokens: give them label "
                         f"{IGNORE_INDEX}")
    return labels.gather(1, kept.clamp(min=0)).masked_fill(kept < 0, IGNORE_INDEX)


def patched_forward(patch, original, args, kwargs):
    """The patched top-level ``forward`` (``model.forward``): runs ``original`` and, when it ran a pruned prefill,
    returns its logits, ``loss`` for ``labels`` and ``kept_positions`` in input coordinates (module docstring).
    Calls without ``pixel_values`` (or ``pixel_values_videos``: decoding, text only) run unchanged, ``labels``
    included."""
    from vtprune.models._patch import bound_arguments

    named = bound_arguments(original, args, kwargs)
    if not patch.is_prefill(named):  # the family's test: pixel_values, or a video's pixel_values_videos
        return original(*args, **kwargs)
    labels = named.pop("labels", None)
    keep = named.get("logits_to_keep")
    if labels is not None and not (keep is None or (isinstance(keep, int) and keep == 0)):
        raise ValueError(f"vtprune: labels need logits for every position; logits_to_keep must be 0 with labels, "
                         f"got {keep!r}")
    return_dict = named.pop("return_dict", None)
    before = patch.last_call
    out = original(**named, return_dict=True)
    call = patch.last_call
    kept = None if call is before else call.seq.origin  # [B, L'] input index per position
    if kept is None:  # nothing was compacted: the sequence is the input's
        B, L = named["input_ids"].shape
        kept = torch.arange(L, device=out.logits.device).expand(B, L)
    fields = dict(out)
    logits = out.logits
    if labels is not None:
        vocab = patch.config.get_text_config().vocab_size
        extra = {k: named[k] for k in ("num_items_in_batch",) if named.get(k) is not None}
        fields["loss"] = patch.model.loss_function(logits=logits, labels=pruned_labels(labels, kept),
                                                   vocab_size=vocab, **extra)
    if logits is not None and logits.shape[1] == kept.shape[1]:
        fields["logits"] = to_input_coordinates(logits, kept, named["input_ids"].shape[1])
    result = type(out)(**fields)
    result.kept_positions = kept  # an attribute, not a field: to_tuple() and indexing stay as transformers has them
    return result if return_dict is not False else result.to_tuple()
