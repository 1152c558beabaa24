"""The generation encoder/decoder dispatch to the fused kernels and give the reference's result."""

import torch
import torch.nn.functional as F

from fused_kernels import kernel_backend
from fused_kernels.dispatch import use_triton
from pretrain.model.config import GenerationVisionConfig
from pretrain.model.gen_vision import ConvNeXtBlock, GenerationDecoder, GenerationEncoder


def test_fused_kernels_inside_the_model_match_the_reference(monkeypatch):
    torch.manual_seed(0)
    cfg = GenerationVisionConfig(latent_size=6, patch_size=2, channels=8, num_blocks=2, time_embed_dim=8)
    enc, dec = GenerationEncoder(cfg, 16), GenerationDecoder(cfg, 16)
    z, t = torch.randn(2, 4, 6, 6), torch.tensor([0.2, 0.9])

    def run(backend):
        for module in (enc, dec):
            module.zero_grad(set_to_none=True)
        with kernel_backend(backend):
            assert use_triton(z) == (backend == "triton")  # the fused path really runs
            skip, t_emb = enc(z, t)
            v = dec(torch.randn(2, 8, 3, 3, generator=torch.Generator().manual_seed(1)), skip, t_emb)
            v.square().sum().backward()
        return v.detach(), {n: p.grad.clone() for n, p in dec.named_parameters()}

    v_ref, g_ref = run("reference")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    v_fused, g_fused = run("triton")
    torch.testing.assert_close(v_fused, v_ref, atol=1e-5, rtol=1e-5)
    for name in g_ref:
        torch.testing.assert_close(g_fused[name], g_ref[name], atol=1e-4, rtol=1e-4, msg=name)


def _block_from_its_weights(block, x, t_emb):
    """The ConvNeXt-V2 block re-derived from its weights on a plain NCHW tensor."""
    h = F.conv2d(x.contiguous(), block.depthwise.weight, block.depthwise.bias, padding=3, groups=x.shape[1])
    h = h.permute(0, 2, 3, 1)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + block.norm.eps) * block.norm.weight
    h = F.gelu(F.linear(h, block.channelwise_linear_1.weight, block.channelwise_linear_1.bias))
    g = h.pow(2).sum(dim=(1, 2), keepdim=True).sqrt()
    grn = block.channelwise_norm
    h = grn.bias + h * (grn.weight * g / (g.mean(-1, keepdim=True) + grn.eps) + 1)
    x = x + F.linear(h, block.channelwise_linear_2.weight, block.channelwise_linear_2.bias).permute(0, 3, 1, 2)
    scale, shift = F.linear(F.silu(t_emb), block.cond_embeds_mapper.weight, block.cond_embeds_mapper.bias).chunk(2, 1)
    return x * (1 + scale[:, :, None, None]) + shift[:, :, None, None]


def test_blocks_run_channels_last_on_cpu_with_the_same_result():
    # The CPU path works channels-last (faster depthwise conv, no permute copies): the output stays
    # channels-last for the next block, and the numbers are the block's.
    torch.manual_seed(0)
    block = ConvNeXtBlock(16, 8)
    for p in block.channelwise_norm.parameters():  # GRN starts at zero: make it do something
        torch.nn.init.normal_(p, std=0.5)
    x, t_emb = torch.randn(3, 16, 8, 8), torch.randn(3, 8)
    with kernel_backend("reference"):
        y = block(x, t_emb)
    assert y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y, _block_from_its_weights(block, x, t_emb), atol=2e-6, rtol=1e-6)
