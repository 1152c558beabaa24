"""A key/value cache for inference: each LLM layer's post-RoPE keys and values of earlier tokens.

Documents stay packed ("thd") as in training: the cache holds, per layer, the keys/values of D
documents laid end to end with their boundaries, and every later forward brings new tokens for the
same D documents, in the same order, with explicit positions that continue each document.

Two uses:
- text-to-image: record the prompt prefix once (``append=True`` on the first forward), then
  ``freeze()`` so that each Euler step's time and latent tokens read the prefix without being kept;
- understanding: prefill the prompt, then one token per forward, each appended to the cache.

The cache reaches the attention modules through ``attach_kv_cache(model, cache)``, which sets
``PackedCoreAttention.kv_cache`` on every layer for the duration of a ``with`` block.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
from torch import nn

from ..model.attention import PackedCoreAttention, cached_causal_attention, packed_causal_attention


@dataclass
class LayerEntry:
    """One layer's cached tokens: key/value [C, Hkv, D], cu_seqlens [docs+1], hidden [C] or None."""

    key: torch.Tensor
    value: torch.Tensor
    cu_seqlens: torch.Tensor
    hidden: Optional[torch.Tensor]


class KVCache:
    """Per-layer keys/values of the documents' tokens seen so far (this rank's attention heads).

    ``append``: whether a forward adds its new tokens to the cache (True while recording a prefix
    or decoding token by token; False once frozen, for the sampler's per-step tokens).
    """

    def __init__(self) -> None:
        self.layers: dict[int, LayerEntry] = {}
        self.append = True

    def freeze(self) -> "KVCache":
        """Later forwards read the cache but do not add to it."""
        self.append = False
        return self

    @property
    def lengths(self) -> torch.Tensor:
        """Cached tokens per document [docs] (int64, CPU); empty before the first forward."""
        if not self.layers:
            return torch.zeros(0, dtype=torch.long)
        entry = next(iter(self.layers.values()))
        return torch.diff(entry.cu_seqlens.long()).cpu()

    def attend(
        self,
        layer_number: int,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        cu_seqlens: torch.Tensor,
        hidden_keys: Optional[torch.Tensor],
        softmax_scale: Optional[float],
    ) -> torch.Tensor:
        """Called by ``PackedCoreAttention`` in place of ``packed_causal_attention``."""
        entry = self.layers.get(layer_number)
        if entry is None:
            out = packed_causal_attention(query, key, value, cu_seqlens, hidden_keys, softmax_scale)
        else:
            out = cached_causal_attention(
                query, key, value, cu_seqlens, entry.key, entry.value, entry.cu_seqlens,
                hidden_keys, entry.hidden, softmax_scale,
            )
        if self.append:
            self.layers[layer_number] = _merge(entry, key, value, cu_seqlens, hidden_keys)
        return out


def _merge(
    entry: Optional[LayerEntry],
    key: torch.Tensor,
    value: torch.Tensor,
    cu_seqlens: torch.Tensor,
    hidden: Optional[torch.Tensor],
) -> LayerEntry:
    """The cached tokens followed, document by document, by the new ones."""
    cu = cu_seqlens.long()
    if entry is None:
        return LayerEntry(key.detach(), value.detach(), cu, None if hidden is None else hidden.clone())
    old_len, new_len = torch.diff(entry.cu_seqlens.long()), torch.diff(cu)
    merged_cu = torch.nn.functional.pad(torch.cumsum(old_len + new_len, 0), (1, 0))
    docs = torch.arange(len(old_len), device=old_len.device)
    # destination of every cached token, then of every new token, in the merged layout
    old_doc = torch.repeat_interleave(docs, old_len)
    new_doc = torch.repeat_interleave(docs, new_len)
    old_dest = torch.arange(len(old_doc), device=old_len.device) - entry.cu_seqlens.long()[old_doc] + merged_cu[old_doc]
    new_dest = torch.arange(len(new_doc), device=old_len.device) - cu[new_doc] + merged_cu[new_doc] + old_len[new_doc]

    def place(old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        out = old.new_empty((len(old) + len(new),) + tuple(old.shape[1:]))
        out[old_dest.to(out.device)] = old
        out[new_dest.to(out.device)] = new.detach()
        return out

    merged_hidden = None
    if entry.hidden is not None or hidden is not None:
        old_h = entry.hidden if entry.hidden is not None else torch.zeros(len(entry.key), dtype=torch.bool, device=key.device)
        new_h = hidden if hidden is not None else torch.zeros(len(key), dtype=torch.bool, device=key.device)
        merged_hidden = place(old_h, new_h)
    return LayerEntry(place(entry.key, key), place(entry.value, value), merged_cu, merged_hidden)


@contextlib.contextmanager
def attach_kv_cache(model: nn.Module, cache: KVCache) -> Iterator[KVCache]:
    """Route every ``PackedCoreAttention`` of ``model`` through ``cache`` inside the block."""
    modules = [m for m in model.modules() if isinstance(m, PackedCoreAttention)]
    if not modules:
        raise ValueError("attach_kv_cache: the model has no PackedCoreAttention layer")
    for module in modules:
        module.kv_cache = cache
    try:
        yield cache
    finally:
        for module in modules:
            module.kv_cache = None
