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
        return packed_causal_attention(
            query, key, value, packed_seq_params.cu_seqlens_q, attention_mask, self.softmax_scale
        )
