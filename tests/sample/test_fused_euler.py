"""The sampler's guided Euler update on ``fused_kernels.cfg_euler_step`` equals the unfused update, end to end.

The unfused update is the sampler's loop before the kernel was wired: guidance
``w v_c - (w - 1) v_u`` (``guided_velocity``) then ``z + v / steps``. The wired sampler runs once
under the ``reference`` backend and once under ``triton`` in Triton's interpreter on CPU (where the
model's ConvNeXt blocks take their fused kernels too). Whole documents are recomputed every step
(``use_cache=False``), the reference path of the sampler.
"""

import pytest
import torch

from fused_kernels import _triton, kernel_backend
from pretrain.sample.text_to_image import PromptVelocity, sample_latents
from tests.fused_kernels.parity import record_launches

PROMPTS = [[1, 5, 6, 7], [1, 20, 21]]
STEPS = 3


def _unfused_samples(model, z0, cfg_weight):
    velocity = PromptVelocity(model, PROMPTS, cfg_weight, use_cache=False)
    z = z0.clone()
    for k in range(STEPS):
        z = z + velocity(z, k / STEPS) / STEPS
    return z


@pytest.mark.skipif(not _triton.HAVE_TRITON, reason="triton is not installed")
@pytest.mark.parametrize("cfg_weight", [2.0, 1.0])
def test_fused_guided_euler_gives_the_unfused_samples(tiny_model, monkeypatch, cfg_weight):
    z0 = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    with kernel_backend("reference"):
        unfused = _unfused_samples(tiny_model, z0, cfg_weight)
        wired_reference = sample_latents(tiny_model, PROMPTS, STEPS, cfg_weight, z0=z0, use_cache=False)

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    launched = record_launches(monkeypatch)
    with kernel_backend("triton"):
        wired_triton = sample_latents(tiny_model, PROMPTS, STEPS, cfg_weight, z0=z0, use_cache=False)

    assert launched.count("_cfg_euler_kernel") == STEPS
    scale = float(unfused.abs().max())
    # measured: 1.8e-7 of the largest |z| (z + dt * v instead of z + v / steps: a rounding per step)
    assert float((wired_reference - unfused).abs().max()) <= 1e-6 * scale
    # measured: 2.4e-7 (and the fused ConvNeXt blocks' float32 sums in another order)
    assert float((wired_triton - unfused).abs().max()) <= 1e-6 * scale
