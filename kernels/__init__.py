"""Fused Triton kernels for the generation path and the flow/REPA objectives.

Each op has a PyTorch reference (``kernels.reference``), a Triton implementation with an
autograd-correct backward, and a parity test (``tests/kernels``). Which one runs is decided per call
by ``kernels.dispatch`` (Triton for CUDA tensors, the reference on CPU; ``set_kernel_backend`` from
the recipe overrides it). Modules replacing model modules keep their state-dict layout.

==========================  =====================================================================
op                          replaces
==========================  =====================================================================
``FusedRMSNorm`` /          ``gen_vision.RMSNorm`` (same ``weight`` [C]); also reads the permuted
``rms_norm``                NCHW view directly and writes contiguous channels-last
``FusedGRN`` / ``grn``      ``gen_vision.GlobalResponseNorm`` (same ``weight``, ``bias`` [1,1,1,C])
``modulate``                ``x = x + h.permute(0, 3, 1, 2); x * (1 + scale) + shift`` at the end
                            of ``ConvNeXtBlock.forward`` (residual add fused)
``flow_interpolate``        ``losses.interpolate_flow``'s ``z_t`` (the target is never formed)
``rf_loss_per_sample``      the summands of ``losses.rectified_flow_loss`` from ``(v, x, z0)``
``cfg_euler_step``          the sampler's ``z + dt * (w v_c - (w - 1) v_u)``
``repa_loss_per_sample``    the summands of ``losses.repa_loss``
==========================  =====================================================================

Wiring into ``ConvNeXtBlock`` (weights and state dict unchanged): its ``forward`` becomes
``return convnext_block_forward(self, x, t_emb)`` (``kernels.convnext``); the norms of
``DecoderOutput`` and ``GenerationDecoder.input_norm`` can call ``rms_norm`` on the permuted view.
The losses: ``LossTerm(rf_loss_per_sample(v, x, z0).sum(), B)`` and
``LossTerm(repa_loss_per_sample(p, f).sum(), B)``.
"""

from .convnext import convnext_block_forward
from .dispatch import get_kernel_backend, kernel_backend, set_kernel_backend, use_triton
from .flow import cfg_euler_step, flow_interpolate, rf_loss_per_sample
from .modulation import modulate
from .norms import FusedGRN, FusedRMSNorm, grn, rms_norm
from .repa import repa_cosine, repa_loss_per_sample

__all__ = [
    "set_kernel_backend",
    "get_kernel_backend",
    "kernel_backend",
    "use_triton",
    "rms_norm",
    "grn",
    "FusedRMSNorm",
    "FusedGRN",
    "modulate",
    "convnext_block_forward",
    "flow_interpolate",
    "rf_loss_per_sample",
    "cfg_euler_step",
    "repa_cosine",
    "repa_loss_per_sample",
]
