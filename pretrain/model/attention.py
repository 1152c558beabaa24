"""Core attention for packed sequences, plugged into megatron-core's layer spec.

megatron-core's local ``DotProductAttention`` refuses packed sequences (only Transformer Engine's
accepts them upstream), so the layer spec uses this module. It receives megatron's "thd" layout:
query/key/value of shape [T, heads, head_dim] for all documents of the micro-batch laid end to end.
Each document attends causally to itself only.

What the micro-step knows about its packing travels in ``PackedAttentionParams`` (megatron's
``packed_seq_params``, extended): document boundaries, the longest document (a host int, from the
batch metadata), the *hidden* keys and the RoPE angles of every packed token. Everything derived
from them (RoPE cos/sin, the attention mask) is built once per micro-step on first use and shared
by all layers, so a layer costs a fixed number of kernel launches and no host round trip.

RoPE is applied here, not by megatron-core: megatron's packed path splits the tensor per document
and reads each boundary with ``.item()`` (a device-to-host sync per document, per layer, for q and
k). Our angles are already per token (from explicit position ids), so one elementwise pass over the
whole packed tensor gives the same numbers (the same ``t * cos + rotate_half(t) * sin`` in the same
dtype), with cos/sin computed once per micro-step instead of once per layer.

Hidden keys: a bool [T] marking tokens no other token may attend to (a hidden token still sees
itself). They implement the unconditional branch of classifier-free guidance exactly as the released
sampler does (prompt tokens masked out, positions kept), in the same attention call as the rest.

Backends (``select_attention_backend``), one call per layer for all documents:
- ``flash``: flash-attn's varlen kernel, CUDA fp16/bf16 only (the kernel refuses fp32), when
  installed. Hidden keys: each document's hidden tokens are moved (a fixed-size gather) into their
  own segment in front of its visible tokens, so the visible tokens see exactly the visible keys;
  positions were encoded by RoPE already, so the order does not matter to the scores.
- ``flex``: torch's FlexAttention with a document-causal + hidden-key block mask (compiled), on CUDA
  without flash-attn or in fp32.
- ``dense``: one SDPA call with an additive block-diagonal causal mask (CPU, or CUDA where
  FlexAttention is unavailable). When the host knows the document lengths (``doc_lengths``, from the
  loader's metadata) the documents are first laid out in *tiles* (``dense_tiles``): rows as long as
  the longest document, each holding whole documents in order, so SDPA runs on [tiles, C, C] instead
  of [T, T]. A micro-batch of four 256-token rows of ~40-token documents costs a quarter of the score
  work (C = 256) or less; the demo's step spent 35 % of its CPU time in this [T, T] attention. The
  layout and mask are built once per micro-step (one gather in, one out per layer).
Outputs at hidden query positions are unspecified with ``flash`` (nothing reads them: hidden tokens
have no loss and no other token sees them); ``dense`` and ``flex`` give what the mask says.

Inference reuses this module with a key/value cache: when ``kv_cache`` is set on the module (see
``pretrain.sample.cache``), the cache decides how the new tokens attend (``cached_causal_attention``:
every visible cached key of the same document, then causally among the new tokens). Training never
sets it.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.module import MegatronModule

try:  # optional GPU extra
    from flash_attn import flash_attn_varlen_func
except ImportError:  # pragma: no cover - depends on the host
    flash_attn_varlen_func = None

try:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
except ImportError:  # pragma: no cover - older torch
    create_block_mask = flex_attention = None

BACKENDS = ("flash", "flex", "dense")
_HALF = (torch.float16, torch.bfloat16)


def flash_available() -> bool:
    return flash_attn_varlen_func is not None


def flex_available() -> bool:
    return flex_attention is not None and not _FLEX_FAILED


_FLEX_FAILED = False  # set when FlexAttention raised on this host; later calls use the dense mask


def select_attention_backend(
    device: torch.device | str,
    dtype: torch.dtype,
    has_flash: Optional[bool] = None,
    has_flex: Optional[bool] = None,
) -> str:
    """'flash' (CUDA, fp16/bf16, flash-attn installed), 'flex' (CUDA otherwise, FlexAttention
    available) or 'dense' (CPU, or CUDA without FlexAttention). ``has_*`` default to this host."""
    has_flash = flash_available() if has_flash is None else has_flash
    has_flex = flex_available() if has_flex is None else has_flex
    if torch.device(device).type != "cuda":
        return "dense"
    if has_flash and dtype in _HALF:
        return "flash"
    return "flex" if has_flex else "dense"


@dataclass
class PackedAttentionParams(PackedSeqParams):
    """megatron's ``PackedSeqParams`` ("thd") plus what our core attention needs, per micro-step.

    hidden_keys: bool [T] on the device or None; rope_freqs: fp32 [T, 1, 1, head_dim] RoPE angles of
    every packed token or None (no RoPE). ``max_seqlen_q`` must be the longest document (host int).
    Derived tensors (cos/sin per dtype, masks per backend) are cached here by the first layer.
    """

    hidden_keys: Optional[torch.Tensor] = None
    rope_freqs: Optional[torch.Tensor] = None
    doc_lengths: Optional[tuple[int, ...]] = None  # host copy of diff(cu_seqlens), when the loader has it
    cache: dict = field(default_factory=dict, repr=False, compare=False)

    def rope_cos_sin(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [T, 1, head_dim] in ``dtype`` (computed in fp32, then cast, as megatron does)."""
        key = ("rope", dtype)
        if key not in self.cache:
            freqs = self.rope_freqs[:, 0]  # [T, 1, D]: broadcasts over the heads of [T, H, D]
            self.cache[key] = (torch.cos(freqs).to(dtype), torch.sin(freqs).to(dtype))
        return self.cache[key]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, H, D] rotated by per-token angles (half-split layout of megatron and HF Llama)."""
    x1, x2 = torch.chunk(x, 2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def document_ids(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """int64 [T]: index of the document of every token (empty documents own no token); no sync."""
    cu = cu_seqlens.to(torch.int64)
    return torch.searchsorted(cu[1:], torch.arange(total, device=cu.device), right=True)


def dense_attention_mask(
    cu_seqlens: torch.Tensor, total: int, hidden_keys: Optional[torch.Tensor], dtype: torch.dtype
) -> torch.Tensor:
    """Additive [T, T] mask (0 allowed, -inf not): same document, causal, key not hidden (a token
    always sees itself, so no row is empty)."""
    doc = document_ids(cu_seqlens, total)
    idx = torch.arange(total, device=doc.device)
    allowed = (doc[:, None] == doc[None, :]) & (idx[None, :] <= idx[:, None])
    if hidden_keys is not None:
        allowed &= ~hidden_keys[None, :] | (idx[None, :] == idx[:, None])
    return torch.zeros(total, total, dtype=dtype, device=doc.device).masked_fill_(~allowed, float("-inf"))


@dataclass(frozen=True)
class DenseTiles:
    """Documents laid out in ``tiles`` rows of ``capacity`` slots, whole documents in order.
    ``slot`` int64 [T]: where each packed token sits in the flattened [tiles * capacity] layout;
    ``gather`` int64 [tiles * capacity]: the token each slot holds (a padding slot holds a copy of
    token 0: one gather fills the layout, and nothing reads or differentiates through the copy);
    ``allowed`` bool [tiles, capacity, capacity]: same document and causal (a padding slot is its own
    document, so it sees only itself, no row is empty and no real token sees it)."""

    tiles: int
    capacity: int
    slot: torch.Tensor
    gather: torch.Tensor
    allowed: torch.Tensor


def dense_tiles(doc_lengths, device, multiple: int = 8) -> Optional[DenseTiles]:
    """Greedy in-order tiling of the documents (host lengths; no device sync). None when it would
    not at least halve the [T, T] score work, so one plain [T, T] call stays the better choice."""
    lengths = np.asarray(doc_lengths, dtype=np.int64)
    lengths = lengths[lengths > 0]
    total = int(lengths.sum())
    if total == 0:
        return None
    capacity = -(-int(lengths.max()) // multiple) * multiple
    tile_of, start_in_tile = np.empty(len(lengths), np.int64), np.empty(len(lengths), np.int64)
    tile, used = 0, 0
    for i, n in enumerate(lengths.tolist()):
        if used + n > capacity:
            tile, used = tile + 1, 0
        tile_of[i], start_in_tile[i] = tile, used
        used += n
    tiles = tile + 1
    if tiles * capacity * capacity * 2 > total * total:
        return None
    doc = np.repeat(np.arange(len(lengths)), lengths)
    offset_in_doc = np.arange(total) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    slot = tile_of[doc] * capacity + start_in_tile[doc] + offset_in_doc
    gather = np.zeros(tiles * capacity, np.int64)
    gather[slot] = np.arange(total)
    owner = -1 - np.arange(tiles * capacity)  # padding: a document of its own
    owner[slot] = doc
    owner = owner.reshape(tiles, capacity)
    idx = np.arange(capacity)
    allowed = (owner[:, :, None] == owner[:, None, :]) & (idx[None, None, :] <= idx[None, :, None])
    as_tensor = lambda a: torch.from_numpy(a).to(device)  # noqa: E731
    return DenseTiles(tiles, capacity, as_tensor(slot), as_tensor(gather), as_tensor(allowed))


def tiled_dense_attention(query, key, value, layout: DenseTiles, hidden_keys, softmax_scale, cache):
    """``packed_causal_attention``'s dense rule on the tiled layout: one SDPA call on [tiles, H, C, D]."""
    mask_key = ("tiled", query.dtype)
    if mask_key not in cache:
        allowed = layout.allowed
        if hidden_keys is not None:
            visible = (~hidden_keys).index_select(0, layout.gather).view(layout.tiles, 1, layout.capacity)
            allowed = allowed & (visible | torch.eye(layout.capacity, dtype=torch.bool, device=query.device))
        mask = torch.zeros(allowed.shape, dtype=query.dtype, device=query.device).masked_fill_(~allowed, float("-inf"))
        cache[mask_key] = mask[:, None]  # [tiles, 1, C, C]: broadcast over heads

    def to_tiles(x):  # [T, H, D] -> [tiles, H, C, D]
        return x.index_select(0, layout.gather).view(layout.tiles, layout.capacity, *x.shape[1:]).transpose(1, 2)

    out = F.scaled_dot_product_attention(
        to_tiles(query), to_tiles(key), to_tiles(value), attn_mask=cache[mask_key], scale=softmax_scale,
        enable_gqa=key.shape[1] != query.shape[1],
    )
    flat = out.transpose(1, 2).reshape(layout.tiles * layout.capacity, *query.shape[1:])
    return flat.index_select(0, layout.slot)


def flex_block_mask(cu_seqlens: torch.Tensor, total: int, hidden_keys: Optional[torch.Tensor]):
    """FlexAttention ``BlockMask`` of the same rule as ``dense_attention_mask``."""
    doc = document_ids(cu_seqlens, total)
    hidden = hidden_keys if hidden_keys is not None else torch.zeros(total, dtype=torch.bool, device=doc.device)

    def mask_mod(_b, _h, q_idx, kv_idx):
        visible = ~hidden[kv_idx] | (q_idx == kv_idx)
        return (doc[q_idx] == doc[kv_idx]) & (q_idx >= kv_idx) & visible

    return create_block_mask(mask_mod, None, None, total, total, device=doc.device, _compile=doc.is_cuda)


def hidden_first_order(cu_seqlens: torch.Tensor, hidden_keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reorder every document as [its hidden tokens, its visible tokens], each in their order.

    Returns (order, place, segments): ``x[order]`` is the reordered packed tensor, ``y[place]``
    undoes it, ``segments`` int32 [2D+1] the boundaries of the 2 segments of each document (a
    segment may be empty). Fixed shapes, no sync: the kernel's causal rule within the visible
    segment is exactly "causal over the document's visible keys".
    """
    total = hidden_keys.shape[0]
    cu = cu_seqlens.to(torch.int64)
    doc = document_ids(cu, total)
    idx = torch.arange(total, device=cu.device)
    hidden = hidden_keys.to(torch.int64)
    hidden_upto = F.pad(torch.cumsum(hidden, 0), (1, 0))  # hidden tokens among the first j
    hidden_at_start = hidden_upto[cu[:-1]]  # [D]
    hidden_in_doc = hidden_upto[cu[1:]] - hidden_at_start  # [D]
    start = cu[:-1][doc]
    rank_hidden = hidden_upto[:-1] - hidden_at_start[doc]  # hidden tokens of its document before it
    rank_visible = idx - start - rank_hidden
    place = start + torch.where(hidden_keys, rank_hidden, hidden_in_doc[doc] + rank_visible)
    order = torch.empty_like(place).scatter_(0, place, idx)
    segments = torch.cat([torch.stack([cu[:-1], cu[:-1] + hidden_in_doc], 1).flatten(), cu[-1:]])
    return order, place, segments.to(torch.int32)


def packed_causal_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cu_seqlens: torch.Tensor,
    hidden_keys: Optional[torch.Tensor] = None,
    softmax_scale: Optional[float] = None,
    max_seqlen: Optional[int] = None,
    params: Optional[PackedAttentionParams] = None,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """Block-diagonal causal attention, all documents in one call. q: [T, Hq, D]; k, v: [T, Hkv, D]
    (Hkv divides Hq: grouped-query attention) -> [T, Hq, D].

    ``max_seqlen``: the longest document (host int; read from ``cu_seqlens`` if omitted, a sync).
    ``params``: where masks are cached between the layers of a micro-step. ``backend``: force one of
    ``BACKENDS`` (default ``select_attention_backend`` for the query's device and dtype).
    """
    cache = params.cache if params is not None else {}
    backend = backend or select_attention_backend(query.device, query.dtype)
    total = query.shape[0]
    if total == 0:
        return torch.empty_like(query)
    if backend == "flex":
        try:
            if "flex" not in cache:
                cache["flex"] = flex_block_mask(cu_seqlens, total, hidden_keys)
            return _flex(query, key, value, cache["flex"], softmax_scale)
        except Exception as err:  # pragma: no cover - depends on the host's compiler
            global _FLEX_FAILED
            _FLEX_FAILED = True
            warnings.warn(f"FlexAttention failed ({type(err).__name__}: {str(err)[:200]}); using the dense mask")
            backend = "dense"
    if backend == "flash":
        if max_seqlen is None:
            max_seqlen = int(torch.diff(cu_seqlens).max())
        return _flash(query, key, value, cu_seqlens, hidden_keys, softmax_scale, max_seqlen, cache)
    if backend != "dense":
        raise ValueError(f"unknown attention backend {backend!r}; one of {BACKENDS}")
    if "tiles" not in cache:
        lengths = params.doc_lengths if params is not None else None
        if lengths is None and not query.is_cuda:  # reading the boundaries costs no sync on the host
            lengths = torch.diff(cu_seqlens.long()).tolist()
        cache["tiles"] = dense_tiles(lengths, query.device) if lengths is not None else None
    if cache["tiles"] is not None:
        return tiled_dense_attention(query, key, value, cache["tiles"], hidden_keys, softmax_scale, cache)
    mask_key = ("dense", query.dtype)
    if mask_key not in cache:
        cache[mask_key] = dense_attention_mask(cu_seqlens, total, hidden_keys, query.dtype)
    q, k, v = (x.transpose(0, 1)[None] for x in (query, key, value))  # [1, H, T, D]
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=cache[mask_key], scale=softmax_scale, enable_gqa=key.shape[1] != query.shape[1]
    )
    return out[0].transpose(0, 1)


def _flex(query, key, value, block_mask, softmax_scale):
    q, k, v = (x.transpose(0, 1)[None] for x in (query, key, value))
    kernel = _compiled_flex() if query.is_cuda else flex_attention
    out = kernel(q, k, v, block_mask=block_mask, scale=softmax_scale, enable_gqa=key.shape[1] != query.shape[1])
    return out[0].transpose(0, 1)


_COMPILED_FLEX = None


def _compiled_flex():  # pragma: no cover - GPU
    global _COMPILED_FLEX
    if _COMPILED_FLEX is None:
        _COMPILED_FLEX = torch.compile(flex_attention)
    return _COMPILED_FLEX


def _flash(query, key, value, cu_seqlens, hidden_keys, softmax_scale, max_seqlen, cache,
           kernel: Optional[Callable] = None):
    """flash-attn varlen over all documents in one call (``kernel`` replaceable for CPU tests)."""
    kernel = kernel or flash_attn_varlen_func
    if hidden_keys is None:
        cu = cu_seqlens.to(torch.int32)
        return kernel(query, key, value, cu, cu, max_seqlen, max_seqlen, softmax_scale=softmax_scale, causal=True)
    if "flash_order" not in cache:
        cache["flash_order"] = hidden_first_order(cu_seqlens, hidden_keys)
    order, place, segments = cache["flash_order"]
    out = kernel(query[order], key[order], value[order], segments, segments, max_seqlen, max_seqlen,
                 softmax_scale=softmax_scale, causal=True)
    return out[place]


def cached_causal_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cu_seqlens: torch.Tensor,
    cached_key: torch.Tensor,
    cached_value: torch.Tensor,
    cached_cu_seqlens: torch.Tensor,
    hidden_keys: Optional[torch.Tensor] = None,
    cached_hidden: Optional[torch.Tensor] = None,
    softmax_scale: Optional[float] = None,
) -> torch.Tensor:
    """Attention of new tokens that continue cached documents (inference with a key/value cache).

    q: [T, Hq, D]; k, v: [T, Hkv, D] for the new tokens, D documents per ``cu_seqlens`` [D+1];
    cached_key/value: [C, Hkv, D] post-RoPE keys/values of the same D documents' earlier tokens per
    ``cached_cu_seqlens`` [D+1] (a document may have no cached or no new token). A new token sees
    every cached key of its document that is not hidden (``cached_hidden`` [C]) and the new tokens
    up to itself that are not hidden (``hidden_keys`` [T]; a token always sees itself), which is
    exactly what it would see in ``packed_causal_attention`` over the whole documents.

    All documents go through one SDPA call, padded to the longest: the cached prefixes are short and
    the new segments of a sampler step have equal lengths, so little is wasted. -> [T, Hq, D].
    """
    device = query.device
    if key.shape[1] != query.shape[1]:
        repeat = query.shape[1] // key.shape[1]
        key, value = (x.repeat_interleave(repeat, dim=1) for x in (key, value))
        cached_key, cached_value = (x.repeat_interleave(repeat, dim=1) for x in (cached_key, cached_value))
    new_len = torch.diff(cu_seqlens.long()).to(device)
    old_len = torch.diff(cached_cu_seqlens.long()).to(device)
    if len(new_len) != len(old_len):
        raise ValueError(f"{len(new_len)} documents of new tokens but {len(old_len)} cached documents")
    docs = len(new_len)
    if docs == 0 or query.shape[0] == 0:
        return torch.empty_like(query)
    # (document, index within its new segment / within its cached prefix) of every token
    q_doc = torch.repeat_interleave(torch.arange(docs, device=device), new_len)
    q_idx = torch.arange(len(q_doc), device=device) - cu_seqlens.long().to(device)[q_doc]
    c_doc = torch.repeat_interleave(torch.arange(docs, device=device), old_len)
    c_idx = torch.arange(len(c_doc), device=device) - cached_cu_seqlens.long().to(device)[c_doc]
    n_max, k_max = int(new_len.max()), int((old_len + new_len).max())
    heads, dim = query.shape[1], query.shape[2]

    q = query.new_zeros(docs, n_max, heads, dim)
    q[q_doc, q_idx] = query
    k = key.new_zeros(docs, k_max, heads, dim)
    v = value.new_zeros(docs, k_max, heads, dim)
    k[c_doc, c_idx], v[c_doc, c_idx] = cached_key, cached_value
    k[q_doc, old_len[q_doc] + q_idx], v[q_doc, old_len[q_doc] + q_idx] = key, value
    visible = torch.zeros(docs, k_max, dtype=torch.bool, device=device)
    visible[c_doc, c_idx] = True if cached_hidden is None else ~cached_hidden.to(device)
    visible[q_doc, old_len[q_doc] + q_idx] = True if hidden_keys is None else ~hidden_keys.to(device)

    row = torch.arange(n_max, device=device)[None, :, None]  # query index within its new segment
    col = torch.arange(k_max, device=device)[None, None, :]
    start = old_len[:, None, None]  # where the document's new keys begin
    allowed = visible[:, None, :] & (col <= start + row)
    allowed |= col == start + row  # a token always sees itself (hidden or not)
    allowed |= row >= new_len[:, None, None]  # padded query rows: anything, their output is dropped
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=allowed[:, None], scale=softmax_scale
    )
    return out.transpose(1, 2)[q_doc, q_idx]


class PackedCoreAttention(MegatronModule):
    """Drop-in ``core_attention`` submodule for megatron-core's ``SelfAttention`` (thd only)."""

    def __init__(
        self,
        config,
        layer_number: int,
        attn_mask_type=None,
        attention_type: str = "self",
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection=None,
    ) -> None:
        super().__init__(config=config)
        if (attention_dropout or config.attention_dropout) > 0:
            raise ValueError("PackedCoreAttention has no attention dropout: set attention_dropout=0")
        self.layer_number = layer_number
        self.softmax_scale = softmax_scale
        # Inference only: an object with ``attend(layer_number, query, key, value, cu_seqlens,
        # hidden_keys, softmax_scale)`` (``pretrain.sample.cache.KVCache``), set and cleared by
        # ``pretrain.sample.cache.attach_kv_cache``.
        self.kv_cache = None

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: Optional[torch.Tensor],
        attn_mask_type=None,
        attention_bias=None,
        packed_seq_params=None,
    ) -> torch.Tensor:
        """q, k, v [T, heads, head_dim] before RoPE; ``packed_seq_params`` a ``PackedAttentionParams``
        (``attention_mask`` is unused: the hidden keys travel in the params) -> [T, Hq, head_dim]."""
        if not isinstance(packed_seq_params, PackedAttentionParams) or packed_seq_params.qkv_format != "thd":
            raise ValueError("PackedCoreAttention expects PackedAttentionParams with qkv_format='thd'")
        if attention_bias is not None:
            raise ValueError("PackedCoreAttention does not take an attention bias")
        params = packed_seq_params
        if params.rope_freqs is not None:
            cos, sin = params.rope_cos_sin(query.dtype)
            query, key = apply_rope(query, cos, sin), apply_rope(key, cos, sin)
        if self.kv_cache is not None:
            return self.kv_cache.attend(
                self.layer_number, query, key, value, params.cu_seqlens_q, params.hidden_keys, self.softmax_scale
            )
        return packed_causal_attention(
            query, key, value, params.cu_seqlens_q, params.hidden_keys, self.softmax_scale,
            max_seqlen=params.max_seqlen_q, params=params,
        )
