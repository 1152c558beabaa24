"""The mixed step: CFG prompt hiding, flow draws and unit counts."""

import torch

from pretrain.data.format import Task, TokenKind
from pretrain.model.config import GenerationVisionConfig, LLMConfig, ModelConfig, RepaConfig, UnderstandingEncoderConfig
from pretrain.step import batch_unit_counts, hide_dropped_prompts, prepare_model_inputs
from pretrain.synthetic import make_synthetic_batch

CFG = ModelConfig(
    llm=LLMConfig(vocab_size=64, hidden_size=32, ffn_hidden_size=32, num_layers=2, num_attention_heads=2),
    und_encoder=UnderstandingEncoderConfig(image_size=16, patch_size=8, hidden_size=8, intermediate_size=8,
                                           num_layers=1, num_attention_heads=1),
    gen_vision=GenerationVisionConfig(latent_size=4, patch_size=2, channels=8, num_blocks=1, time_embed_dim=8),
    repa=RepaConfig(layer=1, projector_hidden_size=8),
)


def test_hidden_prompt_is_everything_between_bos_and_the_time_token():
    k = TokenKind
    kinds = torch.tensor([k.TEXT, k.TEXT, k.TEXT, k.GEN_TIME, k.GEN_LATENT, k.TEXT,   # doc 0 (gen)
                          k.TEXT, k.TEXT,                                              # doc 1 (text)
                          k.TEXT, k.TEXT, k.GEN_TIME, k.GEN_LATENT])                   # doc 2 (gen)
    cu = torch.tensor([0, 6, 8, 12])
    hidden = hide_dropped_prompts(kinds, cu, torch.tensor([True, True]))
    assert hidden.tolist() == [0, 1, 1, 0, 0, 0, 0, 0, 0, 1, 0, 0]
    assert not hide_dropped_prompts(kinds, cu, torch.tensor([False, False])).any()
    assert hide_dropped_prompts(kinds, cu, torch.tensor([False, True])).nonzero().squeeze(1).tolist() == [9]


def test_flow_inputs_are_reproducible_and_interpolate_between_noise_and_data():
    batch = make_synthetic_batch(CFG, [Task.GENERATION, Task.TEXT, Task.GENERATION], torch.Generator().manual_seed(0))
    a, target_a = prepare_model_inputs(batch, batch.gen_latents, 0.1, torch.Generator().manual_seed(1))
    b, target_b = prepare_model_inputs(batch, batch.gen_latents, 0.1, torch.Generator().manual_seed(1))
    assert torch.equal(a.gen_z_t, b.gen_z_t) and torch.equal(a.gen_t, b.gen_t) and torch.equal(target_a, target_b)
    assert ((a.gen_t > 0) & (a.gen_t < 1)).all()
    z0 = batch.gen_latents - target_a  # target = x - z0
    t = a.gen_t[:, None, None, None]
    torch.testing.assert_close(a.gen_z_t, t * batch.gen_latents + (1 - t) * z0)


def test_unit_counts_ignore_document_first_tokens():
    batch = make_synthetic_batch(CFG, [Task.TEXT, Task.UNDERSTANDING, Task.GENERATION], torch.Generator().manual_seed(0), text_len=5)
    counts = batch_unit_counts(batch)
    assert counts == {"ar": 4 + 3, "rf": 1, "repa": 1}  # text: 5 tokens -> 4 targets; answer of 3
