"""ALVTS selector factors: training-free SVD initialisation from a decoder layer's own Q/K weights.

The selector of layer ``l`` is the single-head low-rank attention of :func:`vtprune.ops.lowrank_scores`:
``logits = (h U)(h V)^T / sqrt(R)`` on the layer's normalised input ``h`` (``U, V: [D, R]``). Its target is
the layer's head-averaged pre-RoPE attention logit, bias terms left aside (see below)::

    M = scaling / H * sum_h W_Q,h^T W_K,g(h)                      [D, D]
    mean_h (h W_Q,h^T)(h W_K,g(h)^T)^T * scaling  =  h M h^T

where ``W_Q,h`` is head ``h``'s ``[d, D]`` block of ``q_proj.weight``, ``g(h) = h // (H / Hkv)`` its key/value
head (grouped-query attention expanded: each query head is paired with its KV head and counted once) and
``scaling`` is the layer's own softmax scale (``self_attn.scaling`` = ``head_dim ** -0.5``). With the
truncated SVD ``M ~ P_R diag(s_R) Q_R^T`` the factors are::

    U = P_R diag(sqrt(s_R)) * R ** (1/4),    V = Q_R diag(sqrt(s_R)) * R ** (1/4)

so ``(h U)(h V)^T / sqrt(R) = h P_R diag(s_R) Q_R^T h^T``: the ``R ** (1/4)`` in each factor cancels the op's
``1 / sqrt(R)``, and at full rank (``R >= rank(M)``, at most ``Hkv * d``) the selector logits equal the
head-averaged pre-RoPE logits including the layer's ``1/sqrt(head_dim)``. RoPE is not representable by a
position-free bilinear form; calibration (:mod:`vtprune.alvts.calibrate`) fits the factors to the post-RoPE
attention instead.

Per-head q/k norms (Qwen3: ``q = g_q * q / rms(q)`` before RoPE): the gains fold into ``M`` exactly, the
per-token ``1 / rms`` by a data-free estimate (:func:`_fold_qk_norms`); calibration fits against the normed q/k.

Biases (Qwen2 has q/k biases, LLaMA none): with ``q = h W_q^T + b_q`` and ``k = h W_k^T + b_k`` the logit gains
``h_i W_q^T b_k`` (constant along each softmax row: cancels exactly), ``b_q . b_k`` (constant: cancels) and
``b_q W_k h_j`` (a per-key prior). The op has no bias input and ``h`` (an RMSNorm output) has no constant
component to carry one, so the SVD initialisation drops that last term; calibration can absorb part of it.
The selector softmax therefore equals the layer's head-averaged pre-RoPE softmax exactly for any key bias,
and up to the per-key prior for a query bias.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

FORMAT = "vtprune.alvts.factors/1"
_LAYER_PARTS = ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp")
_REQUIRED_META = ("format", "num_layers", "rank")
FINGERPRINT_KEY = "model_fingerprint"
# Entries of layer 0's q_proj sampled into the fingerprint: enough to tell checkpoints apart without reading
# a whole 7B weight. They are compared with a relative tolerance, not hashed: the same checkpoint in float32,
# float16 or bfloat16 (or cast from one to another) differs in the last bits, and any hash of rounded values
# has rounding boundaries that a cast can cross.
_SAMPLE = 64
_SAMPLE_RTOL = 1e-2  # bfloat16 keeps ~2^-9 relative precision; a cast chain stays well inside this


def default_rank(hidden_size: int) -> int:
    """``hidden_size // 16``: the paper's R = 256 at D = 4096 (LLaVA-7B) and 128 at D = 2048 (Qwen2.5-VL-3B)."""
    return max(1, hidden_size // 16)


@contextmanager
def _readable(*modules: torch.nn.Module):
    """Make offloaded weights readable for the block.

    Under accelerate CPU/disk offload a module's weight is a ``meta`` tensor and the real one is loaded by a
    hook around each forward (``module._hf_hook``: ``pre_forward`` loads it onto the execution device,
    ``post_forward`` offloads it again). Reading the weights (SVD factors, fingerprint) goes through the same
    hook, so offloaded models get the same factors as resident ones. Modules whose weight is on a real device,
    or that have no such hook, are left as they are.
    """
    loaded = []
    try:
        for m in modules:
            hook = getattr(m, "_hf_hook", None)
            if m.weight.device.type == "meta" and hook is not None and hasattr(hook, "pre_forward"):
                hook.pre_forward(m)
                loaded.append((m, hook))
        yield
    finally:
        for m, hook in loaded:
            hook.post_forward(m, None)


def _grouped_weights(layer, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``(A, B, c)`` with ``M = c * A^T B``: A sums the query heads of each KV group, B is ``k_proj.weight``.

    ``sum_h Wq_h^T Wk_g(h) = sum_g (sum_{h in g} Wq_h)^T Wk_g``, so A, B are ``[Hkv*d, D]`` and
    ``c = scaling / H`` (head average and the layer's softmax scale).
    """
    attn = getattr(layer, "self_attn", layer)
    q, k = getattr(attn, "q_proj", None), getattr(attn, "k_proj", None)
    if not isinstance(q, torch.nn.Linear) or not isinstance(k, torch.nn.Linear):
        raise ValueError(
            f"layer must be a decoder layer whose self_attn has q_proj/k_proj nn.Linear modules "
            f"(LLaMA/Qwen2 style), got {type(layer).__name__}"
        )
    d = getattr(attn, "head_dim", None)
    if not isinstance(d, int) or q.weight.shape[0] % d or k.weight.shape[0] % d:
        raise ValueError(
            f"layer.self_attn.head_dim must divide q_proj and k_proj output sizes "
            f"({q.weight.shape[0]}, {k.weight.shape[0]}), got {d!r}"
        )
    H, Hkv, D = q.weight.shape[0] // d, k.weight.shape[0] // d, q.weight.shape[1]
    if H % Hkv:
        raise ValueError(f"layer: query heads ({H}) must be a multiple of key/value heads ({Hkv})")
    norms = (getattr(attn, "q_norm", None), getattr(attn, "k_norm", None), getattr(layer, "input_layernorm", None))
    norms = [m for m in norms if isinstance(getattr(m, "weight", None), torch.Tensor)]
    with _readable(q, k, *norms):
        if q.weight.device.type == "meta" or k.weight.device.type == "meta":
            raise ValueError(f"layer: the q_proj/k_proj weights of this {type(layer).__name__} are on the meta "
                             "device with no offload hook to load them; pass factors= (a SelectorFactors or a file)")
        wq, wk = q.weight.detach().to(dtype).view(H, d, D), k.weight.detach().to(dtype).view(Hkv, d, D)
        if getattr(attn, "q_norm", None) is not None and getattr(attn, "k_norm", None) is not None:
            wq, wk = _fold_qk_norms(layer, attn, wq, wk)
    a = wq.view(Hkv, H // Hkv, d, D).sum(1).reshape(Hkv * d, D)
    return a, wk.reshape(Hkv * d, D), float(getattr(attn, "scaling", d**-0.5)) / H


def _fold_qk_norms(layer, attn, wq: torch.Tensor, wk: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-head q/k RMS norms (Qwen3) folded into the head weights ``[heads, d, D]``.

    The norm makes head ``h``'s query ``g_q * (W_h x) / rms(W_h x)``. The gain ``g_q`` is linear and folds in
    exactly. The per-token ``1 / rms(W_h x)`` is not bilinear (like RoPE); it is replaced by a data-free estimate,
    the RMS of ``W_h x`` for an input whose channels are uncorrelated with the input norm's gains as their RMS,
    ``sqrt(sum_ij W_h[i, j]^2 g_j^2 / d)``. Without it the initial logits would be off by the heads' typical
    ``rms(q) * rms(k)``; calibration fits the rest against the normed attention.
    """
    gain = getattr(getattr(layer, "input_layernorm", None), "weight", None)
    g2 = 1.0 if gain is None else gain.detach().to(wq.dtype) ** 2

    def rms(w):
        return ((w**2 * g2).sum((1, 2)) / w.shape[1]).sqrt().clamp(min=torch.finfo(w.dtype).tiny)[:, None, None]

    gq = attn.q_norm.weight.detach().to(wq.dtype)[None, :, None]
    gk = attn.k_norm.weight.detach().to(wk.dtype)[None, :, None]
    return wq * gq / rms(wq), wk * gk / rms(wk)


def decoder_layers(model_or_layers) -> list[torch.nn.Module]:
    """The decoder layers of a language model (the ``nn.ModuleList`` whose layers have ``input_layernorm``,
    ``self_attn``, ``post_attention_layernorm`` and ``mlp``), or the given sequence of layers itself."""
    if isinstance(model_or_layers, (list, tuple, torch.nn.ModuleList)):
        layers = list(model_or_layers)
    elif isinstance(model_or_layers, torch.nn.Module):
        layers = next(
            (list(m) for m in model_or_layers.modules() if isinstance(m, torch.nn.ModuleList) and len(m)
             and all(all(hasattr(x, a) for a in _LAYER_PARTS) for x in m)),
            [],
        )
    else:
        raise ValueError(
            f"model_or_layers must be an nn.Module or a list of decoder layers, got {type(model_or_layers).__name__}"
        )
    if not layers:
        raise ValueError(
            f"model_or_layers: found no decoder layers (modules with {', '.join(_LAYER_PARTS)}) in "
            f"{type(model_or_layers).__name__}"
        )
    return layers


def hidden_size(layer) -> int:
    """D, the input width of the layer's q_proj."""
    q = getattr(getattr(layer, "self_attn", None), "q_proj", None)
    if not isinstance(q, torch.nn.Linear):
        raise ValueError(f"layer must have self_attn.q_proj (an nn.Linear), got {type(layer).__name__}")
    return q.in_features


def bilinear_form(layer, *, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The head-averaged, scaled pre-RoPE bilinear form ``M [D, D]`` of a layer (logits = ``h M h^T``).

    Parameters
    ----------
    layer : a LLaMA/Qwen2-style decoder layer
    dtype : computation and output dtype

    Returns
    -------
    Tensor [D, D] on the weights' device.
    """
    a, b, c = _grouped_weights(layer, dtype)
    return (a.T @ b) * c


def svd_factors(
    layer, rank: int, *, compute_dtype: torch.dtype = torch.float32, dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-``rank`` selector factors ``(U, V)`` of one layer from the truncated SVD of its bilinear form.

    See the module docstring for the exact scaling. ``rank`` may exceed ``rank(M)`` (the extra columns are
    zero); at ``rank >= rank(M)`` the selector reproduces the head-averaged pre-RoPE logits exactly.

    Parameters
    ----------
    layer : a LLaMA/Qwen2-style decoder layer
    rank : R, ``1 <= R <= D``
    compute_dtype : dtype of the QR/SVD (float32 by default; float64 for tests)
    dtype : output dtype, default the q_proj weight's

    Returns
    -------
    (U, V), each Tensor [D, R] on the weights' device.

    Example
    -------
    >>> u, v = svd_factors(model.model.layers[3], 256)
    """
    a, b, c = _grouped_weights(layer, compute_dtype)  # [n, D] each
    n, D = a.shape
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= D:
        raise ValueError(f"rank must be an int in [1, {D}] (the hidden size), got {rank!r}")
    if n < D:
        # M = c A^T B with thin A, B: QR both (A^T = Qa Ra, B^T = Qb Rb) and take the SVD of the small core
        # Ra Rb^T [n, n]; O(D n^2) instead of the O(D^3) SVD of M (Qwen2.5-VL-3B: n = 256, D = 2048).
        qa, ra = torch.linalg.qr(a.T)  # [D, n], [n, n]
        qb, rb = torch.linalg.qr(b.T)
        p, s, qh = torch.linalg.svd(ra @ rb.T)
        p, q = qa @ p, qb @ qh.T  # [D, n]
    else:
        p, s, qh = torch.linalg.svd(a.T @ b)
        q = qh.T
    keep = min(rank, s.shape[0])
    # c >= 0 and s >= 0, so sqrt(c s) is real; R^(1/4) per factor cancels the op's 1/sqrt(R).
    root = (s[:keep] * c).sqrt() * rank**0.25
    u = torch.zeros(D, rank, dtype=compute_dtype, device=a.device)
    v = torch.zeros_like(u)
    u[:, :keep] = p[:, :keep] * root
    v[:, :keep] = q[:, :keep] * root
    out = dtype or layer.self_attn.q_proj.weight.dtype
    return u.to(out), v.to(out)


def model_fingerprint(model_or_layers) -> dict:
    """What identifies the model factors were made for: decoder layer class, layer count, hidden size and a
    sample of layer 0's ``q_proj`` weight (``_SAMPLE`` entries spread over the matrix).

    The sample is compared with a relative tolerance (:func:`fingerprint_differences`), so the same checkpoint
    in float32, float16 or bfloat16 matches. Weights offloaded by accelerate are read through their offload
    hook; weights on the ``meta`` device with no hook give ``weight_sample = None``, which is then left unchecked.

    Returns
    -------
    dict with ``architecture`` (str), ``num_layers`` (int), ``hidden_size`` (int), ``weight_sample``
    (list of float, or None)
    """
    layers = decoder_layers(model_or_layers)
    q = layers[0].self_attn.q_proj
    sample = None
    with _readable(q):
        w = q.weight
        if w.device.type != "meta":
            flat = w.detach().reshape(-1)
            at = torch.linspace(0, flat.numel() - 1, min(_SAMPLE, flat.numel()), device=flat.device).long()
            sample = [float(f"{x:.6g}") for x in flat[at].float().cpu().tolist()]
    return {"architecture": type(layers[0]).__name__, "num_layers": len(layers), "hidden_size": hidden_size(layers[0]),
            "weight_sample": sample}


def fingerprint_differences(recorded: dict, actual: dict, *, what: str = "factors") -> list[str]:
    """The fields in which two :func:`model_fingerprint` dicts differ (a field missing on either side is not
    compared); the weight samples match within a relative tolerance of the largest sampled magnitude."""
    differ = []
    for key, mine in actual.items():
        theirs = recorded.get(key)
        if theirs is None or mine is None:
            continue
        if key == "weight_sample":
            scale = max((abs(x) for x in theirs), default=0.0)
            same = len(theirs) == len(mine) and all(abs(a - b) <= _SAMPLE_RTOL * scale for a, b in zip(theirs, mine))
            if not same:
                differ.append(f"weight_sample (first values {theirs[:3]} ({what}) vs {mine[:3]} (model))")
        elif theirs != mine:
            differ.append(f"{key} {theirs!r} ({what}) vs {mine!r} (model)")
    return differ


def _check_finite(name: str, t: torch.Tensor) -> None:
    if t.device.type != "meta" and not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise ValueError(f"{name} has {bad} non-finite (NaN or Inf) entries; selector factors must be finite")


@dataclass
class SelectorFactors:
    """Per-layer selector factors ``U[l], V[l]`` (``[D, R]`` each) of a decoder stack.

    ``meta`` holds strings saved with the file (``source``: ``svd`` or ``calibrated``, ``rank``, ...).

    Example
    -------
    >>> f = init_factors(model.model.layers, rank=256)
    >>> f.save("llava-1.5-7b.alvts.safetensors"); g = SelectorFactors.load("llava-1.5-7b.alvts.safetensors")
    """

    u: list[torch.Tensor]
    v: list[torch.Tensor]
    meta: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.u) != len(self.v) or not self.u:
            raise ValueError(f"u and v must be non-empty lists of equal length, got {len(self.u)} and {len(self.v)}")
        shape = tuple(self.u[0].shape)
        for i, (u, v) in enumerate(zip(self.u, self.v)):
            if u.dim() != 2 or tuple(u.shape) != shape or tuple(v.shape) != shape:
                raise ValueError(
                    f"every factor must have shape [D, R] = {list(shape)}, got u[{i}] {tuple(u.shape)} "
                    f"and v[{i}] {tuple(v.shape)}"
                )
            for name, t in ((f"u[{i}]", u), (f"v[{i}]", v)):
                if not t.is_floating_point():
                    raise ValueError(f"{name} must be a floating-point tensor, got {t.dtype}")
                _check_finite(name, t)
        if 0 in shape:
            raise ValueError(f"factors must have D >= 1 and rank R >= 1, got shape [D, R] = {list(shape)}")
        fp = self.meta.get(FINGERPRINT_KEY)
        if fp is not None:
            self.fingerprint  # noqa: B018 (validates the JSON now, not at the first check)

    @property
    def fingerprint(self) -> dict | None:
        """The :func:`model_fingerprint` of the model these factors were made for, or None when not recorded."""
        text = self.meta.get(FINGERPRINT_KEY)
        if text is None:
            return None
        try:
            fp = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"meta[{FINGERPRINT_KEY!r}] is not valid JSON ({e}): {text[:80]!r}") from None
        if not isinstance(fp, dict) or not {"architecture", "num_layers", "hidden_size"} <= fp.keys():
            raise ValueError(f"meta[{FINGERPRINT_KEY!r}] must be a JSON object with architecture, num_layers and "
                             f"hidden_size, got {text[:80]!r}")
        return fp

    def check_model(self, model_or_layers, *, source: str = "factors") -> None:
        """Raise ``ValueError`` unless these factors fit the model: same layer count and width, and, when a
        fingerprint is recorded, the same decoder class and weight sample (factors of another checkpoint with the
        same shapes would otherwise be accepted and route badly). ``source`` names the factors in the message.
        """
        layers = decoder_layers(model_or_layers)
        width = hidden_size(layers[0])
        if self.num_layers != len(layers) or self.hidden_size != width:
            raise ValueError(f"{source}: {self.num_layers} layers of width {self.hidden_size} do not fit a model "
                             f"with {len(layers)} decoder layers of width {width}")
        recorded = self.fingerprint
        if recorded is None:
            return
        differ = fingerprint_differences(recorded, model_fingerprint(layers))
        if differ:
            raise ValueError(f"{source}: made for a different model: " + "; ".join(differ)
                             + ". Calibrate or initialise factors for this model (vtprune calibrate)")

    @property
    def num_layers(self) -> int:
        return len(self.u)

    @property
    def hidden_size(self) -> int:
        return self.u[0].shape[0]

    @property
    def rank(self) -> int:
        return self.u[0].shape[1]

    def __getitem__(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.u[layer_idx], self.v[layer_idx]

    def to(self, device=None, dtype: torch.dtype | None = None) -> SelectorFactors:
        return SelectorFactors(
            [u.to(device=device, dtype=dtype) for u in self.u],
            [v.to(device=device, dtype=dtype) for v in self.v],
            dict(self.meta),
        )

    def save(self, path: str | os.PathLike) -> None:
        """Write a safetensors file: tensors ``layers.<l>.u`` / ``layers.<l>.v`` plus string metadata."""
        from safetensors.torch import save_file

        tensors, seen = {}, set()
        for i, (u, v) in enumerate(zip(self.u, self.v)):
            for name, t in ((f"layers.{i}.u", u), (f"layers.{i}.v", v)):
                t = t.detach().contiguous().cpu()
                if t.untyped_storage().data_ptr() in seen:  # safetensors refuses tensors that share memory
                    t = t.clone()
                seen.add(t.untyped_storage().data_ptr())
                tensors[name] = t
        meta = {**self.meta, "format": FORMAT, "num_layers": str(self.num_layers), "rank": str(self.rank)}
        save_file(tensors, os.fspath(path), metadata=meta)

    @classmethod
    def load(cls, path: str | os.PathLike, *, device="cpu") -> SelectorFactors:
        """Read a file written by :meth:`save`; every defect (not a factors file, missing metadata or tensors,
        a truncated or tampered file, non-finite values, rank 0) is a ``ValueError`` naming the file."""
        from safetensors import SafetensorError, safe_open

        name = f"factors file {os.fspath(path)!r}"
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{name}: no such file")
        try:
            with safe_open(os.fspath(path), framework="pt", device=str(device)) as f:
                meta = dict(f.metadata() or {})
                if meta.get("format") != FORMAT:
                    raise ValueError(f"{name}: not a vtprune ALVTS factors file (format {meta.get('format')!r}, "
                                     f"expected {FORMAT!r})")
                missing = [k for k in _REQUIRED_META if k not in meta]
                if missing:
                    raise ValueError(f"{name}: metadata lacks {', '.join(missing)} (has {', '.join(sorted(meta))})")
                n, rank = _meta_int(name, meta, "num_layers"), _meta_int(name, meta, "rank")
                if n < 1 or rank < 1:
                    raise ValueError(f"{name}: metadata num_layers={n}, rank={rank}; both must be >= 1")
                keys = set(f.keys())
                missing = [k for i in range(n) for k in (f"layers.{i}.u", f"layers.{i}.v") if k not in keys]
                if missing:
                    raise ValueError(f"{name}: lacks tensors {missing[:4]}")
                u = [f.get_tensor(f"layers.{i}.u") for i in range(n)]
                v = [f.get_tensor(f"layers.{i}.v") for i in range(n)]
        except SafetensorError as e:  # truncated, tampered header, offsets out of range
            raise ValueError(f"{name}: not a readable safetensors file (truncated or corrupted: {e})") from None
        if u[0].dim() != 2 or u[0].shape[1] != rank:
            raise ValueError(f"{name}: metadata rank={rank} but layers.0.u has shape {list(u[0].shape)}")
        for key in _REQUIRED_META:
            meta.pop(key)
        try:
            return cls(u, v, meta)
        except ValueError as e:
            raise ValueError(f"{name}: {e}") from None


def _meta_int(name: str, meta: dict, key: str) -> int:
    try:
        return int(meta[key])
    except ValueError:
        raise ValueError(f"{name}: metadata {key}={meta[key]!r} is not an integer") from None


def init_factors(
    layers: Sequence[torch.nn.Module],
    rank: int | None = None,
    *,
    compute_dtype: torch.dtype = torch.float32,
    dtype: torch.dtype | None = None,
) -> SelectorFactors:
    """SVD-initialised factors for every layer of a decoder stack (no data needed).

    Parameters
    ----------
    layers : the decoder layers (e.g. ``language_model.layers``) or a model holding them
    rank : R, default :func:`default_rank` of the hidden size
    compute_dtype, dtype : as in :func:`svd_factors`

    Returns
    -------
    SelectorFactors with ``meta["source"] == "svd"`` and the layers' :func:`model_fingerprint`.
    """
    layers = decoder_layers(layers)
    rank = default_rank(hidden_size(layers[0])) if rank is None else rank
    us, vs = zip(*(svd_factors(layer, rank, compute_dtype=compute_dtype, dtype=dtype) for layer in layers))
    return SelectorFactors(list(us), list(vs),
                           {"source": "svd", FINGERPRINT_KEY: json.dumps(model_fingerprint(layers))})
