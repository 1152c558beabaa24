"""The ConvNeXt block on the fused ops equals gen_vision.ConvNeXtBlock, values and parameter grads."""

import pytest
import torch

from fused_kernels import convnext_block_forward
from pretrain.model.gen_vision import ConvNeXtBlock


@pytest.mark.parametrize("batch", [1, 2])
def test_convnext_block_forward_matches_the_module(device, batch):
    torch.manual_seed(0)
    block = ConvNeXtBlock(channels=6, cond_dim=5)
    with torch.no_grad():  # the GRN starts at zero (identity); make every parameter matter
        for p in block.parameters():
            p.normal_(0.0, 0.3)
    block = block.to(device)
    x = torch.randn(batch, 6, 5, 3).to(device)
    t_emb = torch.randn(batch, 5).to(device)

    x_e, x_f = x.clone().requires_grad_(), x.clone().requires_grad_()
    eager = block(x_e, t_emb)
    seed = torch.randn(eager.shape).to(device)
    eager.backward(seed)
    eager_grads = {n: p.grad.clone() for n, p in block.named_parameters()}
    block.zero_grad()

    fused = convnext_block_forward(block, x_f, t_emb)
    fused.backward(seed)
    torch.testing.assert_close(fused, eager, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x_f.grad, x_e.grad, rtol=1e-5, atol=1e-5)
    for name, p in block.named_parameters():
        torch.testing.assert_close(p.grad, eager_grads[name], rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")
