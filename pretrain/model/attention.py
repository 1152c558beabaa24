"""Core attention for packed sequences, plugged into megatron-core's layer spec.

megatron-core's local ``DotProductAttention`` refuses packed sequences (only Transformer Engine's
accepts them upstream), so the layer spec uses this module. It receives megatron's "thd" layout:
query/key/value of shape [T, heads, head_dim] for all documents of the micro-batch laid end to end,
with document boundaries in ``packed_seq_params.cu_seqlens_q``. Each document attends causally to
itself only. RoPE has already been applied by megatron-core before this module runs.

``attention_mask`` (megatron's argument, reused) is either None or a bool tensor [T] marking *hidden*
keys: tokens no other token may attend to. It implements the unconditional branch of classifier-free
guidance exactly as the released sampler does (prompt tokens masked out, positions kept).

Backends: flash-attn's varlen kernel when it is installed and the tensors are on CUDA, otherwise
PyTorch SDPA document by document (exact, and memory-light: no [T, T] mask is ever built).

Inference reuses this module with a key/value cache: when ``kv_cache`` is set on the module (see
``pretrain.sample.cache``), the cache decides how the new tokens attend (``cached_causal_attention``:
every visible cached key of the same document, then causally among the new tokens). Training never
sets it.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.transformer.module import MegatronModule

try:  # optional GPU extra
    from flash_attn import flash_attn_varlen_func
except ImportError:  # pragma: no cover - depends on the host
    flash_attn_varlen_func = None


def packed_causal_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cu_seqlens: torch.Tensor,
    hidden_keys: Optional[torch.Tensor] = None,
    softmax_scale: Optional[float] = None,
) -> torch.Tensor:
    """Block-diagonal causal attention. q: [T, Hq, D]; k, v: [T, Hkv, D] -> [T, Hq, D]."""
    if key.shape[1] != query.shape[1]:  # grouped-query attention: share each key/value head
        repeat = query.shape[1] // key.shape[1]
        key = key.repeat_interleave(repeat, dim=1)
        value = value.repeat_interleave(repeat, dim=1)

    if flash_attn_varlen_func is not None and query.is_cuda:
        return _flash_varlen(query, key, value, cu_seqlens, hidden_keys, softmax_scale)

    out = torch.empty_like(query)
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end == start:
            continue
        q, k, v = (x[start:end].transpose(0, 1).unsqueeze(0) for x in (query, key, value))
        doc_hidden = None if hidden_keys is None else hidden_keys[start:end]
        if doc_hidden is None or not bool(doc_hidden.any()):
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=softmax_scale)
        else:
            length = end - start
            allowed = torch.ones(length, length, dtype=torch.bool, device=q.device).tril()
            # A hidden token still sees itself, so no query row is left without any key.
            allowed &= ~doc_hidden[None, :] | torch.eye(length, dtype=torch.bool, device=q.device)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=softmax_scale)
        out[start:end] = o.squeeze(0).transpose(0, 1)
    return out


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


def _flash_varlen(query, key, value, cu_seqlens, hidden_keys, softmax_scale):  # pragma: no cover - GPU
    if hidden_keys is not None and bool(hidden_keys.any()):
        # Hidden keys are dropped from the sequence before the kernel: positions were already
        # encoded by RoPE, so the visible tokens attend exactly as with a key mask. Outputs at
        # hidden positions are zero; nothing downstream reads them (no loss, hidden as keys).
        keep = ~hidden_keys
        lengths = torch.diff(cu_seqlens.long())
        doc_of_token = torch.repeat_interleave(torch.arange(len(lengths), device=keep.device), lengths)
        kept_lengths = torch.bincount(doc_of_token[keep], minlength=len(lengths))
        kept_cu = F.pad(torch.cumsum(kept_lengths, 0), (1, 0)).to(torch.int32)
        out = torch.zeros_like(query)
        out[keep] = _flash_varlen(query[keep], key[keep], value[keep], kept_cu, None, softmax_scale)
        return out
    max_len = int(torch.diff(cu_seqlens).max())
    cu = cu_seqlens.to(torch.int32)
    return flash_attn_varlen_func(
        query, key, value, cu, cu, max_len, max_len, softmax_scale=softmax_scale, causal=True
    )


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
        if packed_seq_params is None or packed_seq_params.qkv_format != "thd":
            raise ValueError("PackedCoreAttention expects packed_seq_params with qkv_format='thd'")
        if attention_bias is not None:
            raise ValueError("PackedCoreAttention does not take an attention bias")
        if self.kv_cache is not None:
            return self.kv_cache.attend(
                self.layer_number, query, key, value, packed_seq_params.cu_seqlens_q, attention_mask,
                self.softmax_scale,
            )
        return packed_causal_attention(
            query, key, value, packed_seq_params.cu_seqlens_q, attention_mask, self.softmax_scale
        )
