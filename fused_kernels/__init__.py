"""Fused Triton kernels for the generation path and the flow/REPA objectives.

Each op has a PyTorch reference (``fused_kernels.reference``), a Triton implementation with an
autograd-correct backward, and tests holding both to the papers' formulas (``tests/fused_kernels``). Which
one runs is decided per call by ``fused_kernels.dispatch`` (``train.kernels`` -> ``set_kernel_backend``;
under ``"auto"``: per op, the kernel or ``torch.compile`` of the reference on CUDA as
``dispatch.CUDA_CHOICE`` says, the reference elsewhere). Every op has a call site in training or sampling:

==========================  =====================================================================
op                          call site (what it replaces)
==========================  =====================================================================
``rms_norm``                ``ConvNeXtBlock.forward`` -> ``fused_kernels.convnext``: the block's RMSNorm,
                            reading the permuted NCHW view, writing contiguous channels-last
``grn``                     the same block's ``GlobalResponseNorm``
``modulate``                the same block's residual add + ``x * (1 + scale) + shift``
``flow_interpolate``        ``losses.interpolate_flow`` (``step.prepare_model_inputs``): ``z_t``
``rf_loss_per_sample``      ``losses.rectified_flow_loss`` (``step.stage_loss_terms``): L_RF from
                            ``(v, x, z0)``, the target ``x - z0`` never formed
``repa_loss_per_sample``    ``losses.repa_loss`` (``step.stage_loss_terms``): L_REPA's cosine
``cfg_euler_step``          ``PromptVelocity.euler_step`` (``sample.text_to_image``, the sample
                            grid and ``sample`` CLI): ``z + dt * (w v_c - (w - 1) v_u)``
==========================  =====================================================================
"""

from .convnext import convnext_block_forward
from .dispatch import get_kernel_backend, kernel_backend, set_kernel_backend, use_triton
from .flow import cfg_euler_step, flow_interpolate, rf_loss_per_sample
from .modulation import modulate
from .norms import grn, rms_norm
from .repa import repa_cosine, repa_loss_per_sample

__all__ = [
    "set_kernel_backend",
    "get_kernel_backend",
    "kernel_backend",
    "use_triton",
    "rms_norm",
    "grn",
    "modulate",
    "convnext_block_forward",
    "flow_interpolate",
    "rf_loss_per_sample",
    "cfg_euler_step",
    "repa_cosine",
    "repa_loss_per_sample",
]
