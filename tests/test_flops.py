"""The FLOP model's own module: the names the trainer imports, and the Megatron-LM convention
against the closed form of Narayanan et al. (2021)."""

from __future__ import annotations

import pytest

from pretrain import flops, plan
from pretrain.model.config import LLMConfig, ModelConfig


def test_the_trainer_names_live_in_flops_and_plan_reexports_them():
    for name in ("GPUS", "Gradients", "MatmulSizes", "SequenceShape", "sequence_flops"):
        assert getattr(plan, name) is getattr(flops, name), name


def test_megatron_convention_equals_the_papers_closed_form():
    """For a GPT block (MHA, MLP of 8h^2 multiply-adds: SwiGLU with f = 8h/3) the formula
    72 B s l h^2 (1 + s/(6h) + V/(12 l h)) of the paper (no recomputation) holds exactly."""
    h, layers, vocab, s, b = 96, 3, 1000, 64, 2
    llm = LLMConfig(vocab_size=vocab, hidden_size=h, ffn_hidden_size=8 * h // 3, num_layers=layers,
                    num_attention_heads=4)
    closed = 72 * b * s * layers * h**2 * (1 + s / (6 * h) + vocab / (12 * layers * h))
    assert flops.megatron_lm_flops(llm, s, b) == pytest.approx(closed, rel=1e-12)


def test_megatron_convention_exceeds_ours_on_one_document_by_the_causal_half_and_all_logits():
    llm = ModelConfig().llm
    s = 4096
    ours = flops.lm_training_flops(llm, s, (s,), s)  # logits everywhere, one causal document
    theirs = flops.megatron_lm_flops(llm, s)
    # The only difference left: Megatron counts the whole s x s score matrix, a causal kernel s(s+1)/2.
    width = llm.num_attention_heads * llm.head_dim
    assert theirs - ours == pytest.approx(12 * llm.num_layers * width * (s * s - s * (s + 1) / 2), rel=1e-12)


def test_januspro_parts_follow_a_hand_count():
    """Janus-Pro-1B: the two-layer aligners, the image head and the code lookup, counted by hand from
    the architecture (H = 2,048, SigLIP width 1,024, codebook K = 16,384, code embedding 8)."""
    cfg = ModelConfig(family="januspro")
    h, k = 2048, 16384
    sizes = flops.MatmulSizes.from_config(cfg)
    assert sizes.und_aligner_per_patch == 1024 * h + h * h
    assert sizes.und_aligner_first_per_patch == 1024 * h  # reads SigLIP's features
    assert sizes.siglip_first_per_patch == 1024 * 3 * 16 * 16  # the patch embedding reads pixels
    assert (sizes.gen_first_per_position, sizes.gen_first_per_image) == (0, 0)  # reads the trained code table
    assert sizes.gen_per_position == 8 * h + h * h  # the gen_embed lookup costs nothing
    assert sizes.image_head_per_code == h * h + h * k
    assert (sizes.gen_per_image, sizes.repa_per_position) == (0, 0)
    assert sizes.llm_per_token == flops.MatmulSizes.from_config(ModelConfig()).llm_per_token  # same LLM

    # A typical generation row: 6 documents of 576 codes + begin/end-of-image + 72 text tokens.
    seq = flops.DocumentModel().sequence("generation", cfg, 4096)
    assert seq.doc_lengths == (650,) * 6 + (196,) and (seq.gen_images, seq.codes, seq.targets) == (6, 3456, 195)
    stage2 = flops.sequence_flops(cfg, sizes, flops.Gradients.for_trainable("all_but_und_encoder", "januspro"), seq)
    assert stage2["gen_modules"] == 6 * (8 * h + h * h) * 3456
    assert stage2["image_head"] == 6 * (h * h + h * k) * 3456
    assert stage2["llm_blocks"] == 6 * sizes.llm_per_token * 4096
    assert "siglip_repa" not in stage2 and "repa_projector" not in stage2
    # Stage 1 (LLM frozen): the LLM still back-propagates to the aligners before it (4N), the image
    # head trains (6x), the output layer only passes gradients back (4x).
    stage1 = flops.sequence_flops(cfg, sizes, flops.Gradients.for_trainable("new_modules", "januspro"), seq)
    assert stage1["llm_blocks"] == 4 * sizes.llm_per_token * 4096
    assert stage1["image_head"] == stage2["image_head"]
    assert stage1["output_layer"] == 4 * 102_400 * h * 195
    und = flops.DocumentModel().sequence("understanding", cfg, 4096)
    s3 = flops.sequence_flops(cfg, sizes, flops.Gradients.for_trainable("all", "januspro"), und)
    assert s3["und_aligner"] == 6 * (1024 * h + h * h) * 576 * und.und_images
    # SigLIP frozen (stages 1, 2): the aligner's first layer has no input gradient (4x), its second
    # reads the trained first, so it has one (6x).
    for trainable in ("new_modules", "all_but_und_encoder"):
        s = flops.sequence_flops(cfg, sizes, flops.Gradients.for_trainable(trainable, "januspro"), und)
        assert s["und_aligner"] == (4 * 1024 * h + 6 * h * h) * 576 * und.und_images, trainable
