"""The generation encoder/decoder dispatch to the fused kernels and give the reference's result."""

import torch

from kernels import kernel_backend
from kernels.dispatch import use_triton
from pretrain.model.config import GenerationVisionConfig
from pretrain.model.gen_vision import GenerationDecoder, GenerationEncoder


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
