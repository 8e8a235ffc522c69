"""The method interface: what a token-reduction method decides, and the hook points a model integration offers.

A method decides *which* visual tokens each decoder layer sees and how dropped ones are merged; the model
integration (:mod:`vtprune.models`) owns everything else: the token sequence, positions, KV caches, attention
masks and padding. The integration calls the method at up to three kinds of hook points, declared once per model
by :meth:`Method.hooks`:

* **encoder** (:meth:`Method.select_encoder`): after the vision tower's scoring layer, once per image (or tile,
  or a video's frame group), with the patch tokens, optionally their attention scores and a merge metric
  (:class:`EncoderContext`); the method returns the image's new tokens (:class:`Selection`).
* **after a decoder layer** in prefill (:meth:`Method.select_visual`), for the layers in ``Hooks.prune_after``:
  with the hidden states, the span of each *image unit* (an image; a video's frame group: a prompt may hold
  several) and the layer's recomputed queries and keys (:class:`PruneContext`); the method returns each unit's
  new tokens, which replace its span for the rest of the prefill (and in the KV cache).
* **around every decoder layer call**, prefill and decode (:meth:`Method.run_layer`): the method may run the layer
  itself (e.g. on a subset of the tokens) and return its output (:class:`LayerCall`).

Methods are written with the public ops (:mod:`vtprune.ops`). A method object may serve several models and
threads at once: nothing of a call is kept on it (per-call caches go in ``LayerCall.scratch``, what decoding needs
from the prefill in ``LayerCall.state``). See docs/methods.md ("Writing a method") and examples/custom_method.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from vtprune._backend import BACKENDS
from vtprune._host import to_device_i64


@dataclass(frozen=True)
class Hooks:
    """Where the integration calls a method, on a language model of a given depth.

    encoder : bool  call :meth:`Method.select_encoder` on each image's patch tokens
    encoder_scores : bool  and compute the scoring layer's attention scores for it (``EncoderContext.scores``);
        False leaves the vision tower's attention as it is (e.g. pooling needs no scores)
    prune_after : tuple of int  call :meth:`Method.select_visual` after that many decoder layers (strictly
        increasing, each < the number of layers), prefill only
    """

    encoder: bool = False
    encoder_scores: bool = True
    prune_after: tuple = ()

    def __post_init__(self):
        layers = list(self.prune_after)
        if any(isinstance(x, bool) or not isinstance(x, int) or x < 1 for x in layers):
            raise ValueError(f"Hooks.prune_after must hold ints >= 1 (prune after that many layers), got {layers}")
        if layers != sorted(set(layers)):
            raise ValueError(f"Hooks.prune_after: stage layers must be strictly increasing, got {layers}")


@dataclass(frozen=True)
class ModelInfo:
    """What :meth:`Method.check_model` may check a budget against, at :func:`vtprune.apply`.

    model : the model's class name; num_layers : decoder layers
    patches : patches per image (per tile for LLaVA-NeXT), or None where images have dynamic resolutions
    grid : side of the square patch grid (``patches == grid ** 2``), or None
    has_cls : whether the vision tower has a [CLS] token (``EncoderContext.cls`` is then given)
    extra_per_image : image tokens the language model sees beyond the tiles' (LLaVA-NeXT: a newline)
    """

    model: str
    num_layers: int
    patches: int | None = None
    grid: int | None = None
    has_cls: bool = False
    extra_per_image: int = 0


@dataclass
class Selection:
    """A method's answer at an encoder or decoder hook: the new image tokens of each row, in sequence order.

    tokens : Tensor [R, m, D']  the rows' new image tokens (the same ``m`` for every row of one call), made of the
        context's ``tokens``
    keep_idx : int64 Tensor [R, k]  index (into the row's image tokens) of the token each of the first ``k`` new
        tokens stands for, ascending; a new token takes that token's position
    target_idx : int64 Tensor [R, m - k] or None  for merged tokens, the token each stands for (its position)
    cls : bool  (encoder hook) prepend the image's [CLS] token to ``tokens``
    grid : int or None  (encoder hook) ``keep_idx`` indexes a ``grid x grid`` raster of the image instead of its
        patches (pooled tokens); the integration then records no retention map
    keep_all : bool  (encoder hook) the tokens are every patch, in order (a keep-all budget): the integration
        lays them out as the unpatched model does (LLaVA-NeXT: newlines and unpadding)
    capped : bool  the budget asked for more tokens than the units hold, so every token was kept (where the
        context allows it, ``cap``); recorded in the statistics (``Stats.capped``)
    """

    tokens: torch.Tensor
    keep_idx: torch.Tensor
    target_idx: torch.Tensor | None = None
    cls: bool = False
    grid: int | None = None
    keep_all: bool = False
    capped: bool = False

    @property
    def origin(self) -> torch.Tensor:
        """[R, m] index of the token each new token stands for (its position source)."""
        return self.keep_idx if self.target_idx is None else torch.cat([self.keep_idx, self.target_idx], 1)


@dataclass
class EncoderContext:
    """One encoder hook call: ``I`` images (tiles) of ``P`` patches each, at the vision tower's scoring layer.

    tokens : Tensor [I, P, Dv]  the patch tokens ([CLS] excluded) to select from and merge (with any per-token
        channels the family carries along, e.g. Qwen3-VL's deepstack features)
    scores : Tensor [I, P] float32 or None  attention each patch receives ([CLS] attention where the tower has
        one, else the mean visual-to-visual attention); None when ``Hooks.encoder_scores`` is False
    metric : Tensor [I, P, dm] or None  merge metric: the scoring layer's keys averaged over heads
    cls : Tensor [I, 1, Dv] or None  the [CLS] token, where the tower has one
    cls_fed : bool  whether the unpatched model feeds [CLS] to the language model (LLaVA's "full" strategy)
    grid : int or None  side of the square patch grid, None for dynamic resolutions
    num_layers : decoder layers of the language model
    describe : what the images hold, for error messages (e.g. "image 0 has only 24 merged tokens")
    cap : bool  dynamic resolutions: an int budget larger than the image keeps all of its tokens (and says so,
        ``Selection.capped``) instead of raising
    """

    tokens: torch.Tensor
    scores: torch.Tensor | None
    metric: torch.Tensor | None
    cls: torch.Tensor | None = None
    cls_fed: bool = False
    grid: int | None = None
    num_layers: int = 0
    describe: str = ""
    cap: bool = False

    @property
    def patches(self) -> int:
        return self.tokens.shape[1]


@dataclass
class PruneContext:
    """One decoder hook call, after ``layer`` decoder layers of a prefill: ``R`` entries, each one *image unit* (an
    image; a video's frame group) of a batch row, that each hold ``count`` tokens (the integration calls once per
    group of units with the same counts). A row with several units appears once per unit (``rows`` then repeats):
    its hidden states, with the unit's span. The text between two images is never in a span.

    hidden : Tensor [R, L, D]  the entries' rows' hidden states after the layer (what scores are computed from)
    tokens : Tensor [R, L, D']  what the selection is made of: ``hidden``, with any per-token channels the family
        carries along appended (Qwen3-VL: the deepstack levels still to be added; ``D' = D`` elsewhere). A merged
        token merges them all alike
    spans : int64 Tensor [R, 2] on the CPU  ``(start, count)`` of each entry's unit in ``hidden``
    key_padding_mask : bool Tensor [R, L]  True for a real token
    layer : int  the hook's place: after that many decoder layers
    count, original : tokens each unit holds now, and held before any pruning (budgets are per unit)
    per : multiplier of int budgets (LLaVA-NeXT: tiles of the unit's image; 1 elsewhere)
    rows : list of int  the batch row of each entry (for error messages; may repeat)
    tail_real : bool  every row's last token is real (left padding): the last token is the prompt's end
    num_layers : decoder layers of the language model
    units : list of int  each entry's unit index within its row (0 for a row's first image)
    cap : bool  dynamic resolutions: an int budget larger than ``count`` keeps every token (``Selection.capped``)
        instead of raising
    """

    hidden: torch.Tensor
    tokens: torch.Tensor
    spans: torch.Tensor
    key_padding_mask: torch.Tensor
    layer: int
    count: int
    original: int
    per: int
    rows: list
    tail_real: bool
    num_layers: int
    _qk: object = None  # which -> (q, k, scale) of these rows
    units: list = field(default_factory=list)
    cap: bool = False

    def qk(self, which: str = "next") -> tuple[torch.Tensor, torch.Tensor, float]:
        """Post-RoPE queries [R, H, L, d] and keys [R, Hkv, L, d] and the softmax scale, recomputed from a decoder
        layer's input norm and projections: ``"next"`` the next layer's on ``hidden`` (the official VisionDrop and
        PyramidDrop scoring), ``"self"`` the layer that just ran on its own input (FastV)."""
        if which not in ("next", "self"):
            raise ValueError(f"PruneContext.qk: which must be 'next' or 'self', got {which!r}")
        return self._qk(which)

    def visual(self, x: torch.Tensor) -> torch.Tensor:
        """The unit's tokens of ``x`` [R, L, ...] (hidden states, keys averaged over heads, ...): [R, count, ...]."""
        spans = to_device_i64(self.spans, x.device)  # pinned, non-blocking: no wait for the device
        idx = spans[:, :1] + torch.arange(self.count, device=x.device)
        return x.gather(1, idx.view(*idx.shape, *[1] * (x.dim() - 2)).expand(-1, -1, *x.shape[2:]))

    def image_queries(self) -> torch.Tensor:
        """``query_spans`` [R, 2] for :func:`vtprune.ops.attention_scores`: the unit's tokens themselves."""
        return self.spans

    def last_token_queries(self) -> torch.Tensor:
        """``query_spans`` [R, 2] for :func:`vtprune.ops.attention_scores`: the last prompt token (needs left
        padding, so that the last column is every row's last real token)."""
        if not self.tail_real:
            raise ValueError("text-guided stages read the last prompt token: use left padding "
                             "(tokenizer.padding_side = 'left'), the last column of attention_mask must be real")
        L = self.hidden.shape[1]
        return torch.tensor([[L - 1, 1]] * len(self.rows))


@dataclass
class LayerCall:
    """Everything a per-layer hook may need about one decoder-layer call (prefill or decode).

    ``call(hidden_states, **kwargs)`` runs the layer as the unpatched model would; ``kwargs`` already hold the
    attention mask, position embeddings and cache for this layer's group. ``visual_spans`` is int64 [B, S, 2] on
    the CPU: ``(start, count)`` of each image unit of a row (an image; a video's frame group), in sequence order,
    ``S`` the most units of a row (count 0: no unit; a row without an image has none); text between two images is
    never inside a span. ``key_padding_mask`` is bool [B, L], True for a real token.

    A method object may serve several models and threads at once, so a hook keeps nothing on ``self`` between
    calls: what it caches for the rest of a forward call goes in ``scratch``, what decoding needs from the prefill
    in ``state`` (both belong to this model's call).
    """

    layer_idx: int
    layer: torch.nn.Module
    call: object
    hidden_states: torch.Tensor
    kwargs: dict
    visual_spans: torch.Tensor
    key_padding_mask: torch.Tensor
    prefill: bool
    visual_tokens: torch.Tensor | None = None  # set by a hook that processes fewer visual tokens: [B], for stats
    num_layers: int = 0  # decoder layers of the model
    scratch: dict = field(default_factory=dict)  # per forward call, shared by its layers (one model, one call)
    state: dict = field(default_factory=dict)  # per prefill, kept with its KV cache for the decode calls after it


class Method:
    """Base class of every token-reduction method (docs/methods.md, "Writing a method").

    A subclass sets ``name``, declares its hook points (:meth:`hooks`) and implements the hooks it uses; the
    defaults do nothing (keep every token, run every layer as it is).
    """

    name = "method"

    def __init__(self, backend: str = "auto"):
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.backend = backend

    def hooks(self, num_layers: int) -> Hooks:
        """The hook points this method uses on a language model of ``num_layers`` decoder layers."""
        return Hooks()

    def check_model(self, info: ModelInfo) -> None:
        """Refuse at :func:`vtprune.apply` a budget the model cannot hold (raise ``ValueError``)."""

    def prepare(self, language_model, vlm=None) -> None:
        """Called once by :func:`vtprune.apply` with the language model and the whole model ``vlm`` (e.g. to build
        low-rank factors, calibrated on image batches run through ``vlm``)."""

    def prepare_copy(self, source, copy) -> None:
        """Called when a patched model is deep-copied: ``copy`` is the copy of the prepared language model
        ``source`` (e.g. to share what :meth:`prepare` built)."""

    def select_encoder(self, ctx: EncoderContext) -> Selection:
        """Encoder hook: the new tokens of ``ctx``'s images (see :class:`Selection`)."""
        raise NotImplementedError(f"{type(self).__name__} declares an encoder hook but has no select_encoder")

    def select_visual(self, ctx: PruneContext) -> Selection:
        """Decoder hook: the new image tokens of ``ctx``'s rows, at most ``ctx.count`` per row."""
        raise NotImplementedError(f"{type(self).__name__} declares prune_after layers but has no select_visual")

    def run_layer(self, call: LayerCall):
        """Replace one decoder-layer call; return its output, or ``None`` to run the layer unchanged."""
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._describe()})"

    def _describe(self) -> str:
        return f"backend={self.backend!r}"
