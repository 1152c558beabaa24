"""The ConvNeXt-V2 block's forward on the fused ops, for ``gen_vision.ConvNeXtBlock``'s parameters.

Duck-typed on the block's attribute names (``depthwise``, ``norm``, ``channelwise_linear_1``,
``channelwise_norm``, ``channelwise_linear_2``, ``cond_embeds_mapper``), so the model keeps its
modules and state dict and only its ``forward`` delegates here::

    def forward(self, x, t_emb):
        return convnext_block_forward(self, x, t_emb)

Per block this replaces, forward: the permute copy + float32 RMSNorm chain (one pass instead), the
GRN's norm/mean/broadcast chain (three launches), and the residual add + scale/shift (one pass
instead of three). Convolutions, linears and GELU stay in PyTorch.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from .modulation import modulate
from .norms import grn, rms_norm

__all__ = ["convnext_block_forward"]


def convnext_block_forward(block: nn.Module, x: Tensor, t_emb: Tensor) -> Tensor:
    """x: [B, C, H, W]; t_emb: [B, cond_dim] -> [B, C, H, W] (contiguous NCHW)."""
    h = rms_norm(block.depthwise(x).permute(0, 2, 3, 1), block.norm.weight, block.norm.eps)
    h = F.gelu(block.channelwise_linear_1(h))  # exact (erf) GELU, as the block
    norm = block.channelwise_norm
    h = block.channelwise_linear_2(grn(h, norm.weight, norm.bias, norm.eps))
    scale, shift = block.cond_embeds_mapper(F.silu(t_emb)).chunk(2, dim=1)
    return modulate(x, scale, shift, residual=h.permute(0, 3, 1, 2))
