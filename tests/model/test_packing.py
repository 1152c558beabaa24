"""A packed sequence of three documents gives the same outputs and losses as the three run apart."""

import torch

from datacontract.format import Task
from pretrain.losses import combine_losses
from pretrain.model.config import (
    GenerationVisionConfig, LLMConfig, ModelConfig, RepaConfig, UnderstandingEncoderConfig,
)
from pretrain.model.janusflow import JanusFlowModel
from pretrain.step import batch_unit_counts, prepare_model_inputs, stage_loss_terms
from pretrain.synthetic import SyntheticBatch, make_synthetic_batch

TASKS = [Task.UNDERSTANDING, Task.GENERATION, Task.TEXT]


def _config() -> ModelConfig:
    return ModelConfig(
        llm=LLMConfig(vocab_size=96, hidden_size=32, ffn_hidden_size=48, num_layers=3, num_attention_heads=4),
        und_encoder=UnderstandingEncoderConfig(image_size=16, patch_size=4, hidden_size=16,
                                               intermediate_size=32, num_layers=1, num_attention_heads=2),
        gen_vision=GenerationVisionConfig(latent_size=8, patch_size=2, channels=16, num_blocks=1, time_embed_dim=16),
        repa=RepaConfig(layer=2, projector_hidden_size=16),
    )


def _split(batch: SyntheticBatch) -> list[SyntheticBatch]:
    """Cut a packed batch into one batch per document."""
    bounds = batch.cu_seqlens.tolist()
    parts, und, gen = [], 0, 0
    for i, task in enumerate(batch.doc_tasks.tolist()):
        s, e = bounds[i], bounds[i + 1]
        n_und, n_gen = int(task == Task.UNDERSTANDING), int(task == Task.GENERATION)
        parts.append(SyntheticBatch(
            input_ids=batch.input_ids[s:e], position_ids=batch.position_ids[s:e],
            cu_seqlens=torch.tensor([0, e - s], dtype=torch.int32), token_kind=batch.token_kind[s:e],
            target_mask=batch.target_mask[s:e], doc_tasks=batch.doc_tasks[i:i + 1],
            und_pixels=batch.und_pixels[und:und + 1] if n_und else None,
            gen_pixels=batch.gen_pixels[gen:gen + 1] if n_gen else None,
            gen_latents=batch.gen_latents[gen:gen + 1] if n_gen else None,
        ))
        und += n_und
        gen += n_gen
    return parts


def _run(model, batch):
    # prompt_drop_prob=0: a drop is a random draw, and the draws differ between the two layouts.
    inputs, target = prepare_model_inputs(batch, batch.gen_latents, 0.0, torch.Generator().manual_seed(3))
    _, outputs = model(inputs)
    return inputs, target, outputs, stage_loss_terms(outputs, target)


def test_packed_documents_equal_documents_run_apart(runtime):
    torch.manual_seed(0)
    model = JanusFlowModel(_config())
    batch = make_synthetic_batch(model.cfg, TASKS, torch.Generator().manual_seed(5), text_len=7)
    packed_inputs, packed_target, packed, packed_terms = _run(model, batch)

    apart = [_run(model, part) for part in _split(batch)]
    hidden = torch.cat([out.final_hidden for _, _, out, _ in apart])
    torch.testing.assert_close(packed.final_hidden, hidden, atol=1e-5, rtol=0)
    logits = torch.cat([out.logits for _, _, out, _ in apart])
    torch.testing.assert_close(packed.logits, logits, atol=1e-5, rtol=0)

    # The flow draws depend on how many generation samples a batch holds, so feed the packed run's
    # noisy latents and times to the lone generation document and compare velocities and REPA.
    gen_part = _split(batch)[1]
    inputs, _ = prepare_model_inputs(gen_part, gen_part.gen_latents, 0.0, torch.Generator().manual_seed(3))
    inputs.gen_z_t, inputs.gen_t = packed_inputs.gen_z_t, packed_inputs.gen_t
    _, gen_out = model(inputs)
    torch.testing.assert_close(packed.velocity, gen_out.velocity, atol=1e-5, rtol=0)
    torch.testing.assert_close(packed.repa_projected, gen_out.repa_projected, atol=1e-5, rtol=0)

    # Losses: sums over the parts equal the packed sums (sum-then-normalise contract).
    ar_apart = sum(terms["ar"].total for _, _, _, terms in apart if "ar" in terms)
    torch.testing.assert_close(packed_terms["ar"].total, ar_apart, atol=1e-4, rtol=0)
    counts = batch_unit_counts(batch)
    assert counts == {"ar": packed_terms["ar"].count, "rf": 1, "repa": 1}
    loss, _ = combine_losses(packed_terms, {"ar": 1.0, "rf": 1.0, "repa": 1.0}, counts)
    assert torch.isfinite(loss)
