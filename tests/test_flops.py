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
