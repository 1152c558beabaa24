"""The sampler on a CUDA GPU gives what it gives on the CPU (fp32, TF32 off): the cached CFG Euler
text-to-image loop. Runs in the GPU check (``pytest -m gpu``)."""

from __future__ import annotations

import copy

import pytest
import torch

from pretrain.sample.text_to_image import sample_latents

pytestmark = pytest.mark.gpu


@pytest.fixture
def no_tf32():
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def test_text_to_image_on_cuda_matches_cpu(tiny_model, no_tf32):
    prompts = [[1, 17, 42, 99], [1, 5, 6]]
    cpu = sample_latents(tiny_model, prompts, steps=6, cfg_weight=3.0, generator=torch.Generator().manual_seed(3))
    gpu_model = copy.deepcopy(tiny_model).cuda()
    gpu = sample_latents(gpu_model, prompts, steps=6, cfg_weight=3.0, generator=torch.Generator().manual_seed(3))
    assert gpu.device.type == "cuda"
    # Different kernels (fp32 both): rounding only, amplified a little by 6 Euler steps.
    torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-4, rtol=1e-4)
