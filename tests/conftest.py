"""Shared fixtures: the distributed runtime (a world of one on CPU) that megatron-core needs."""

import pytest


@pytest.fixture(scope="session")
def runtime():
    """torch.distributed (gloo) + megatron parallel_state for one process, once per test session."""
    from pretrain.runtime.distributed import init_runtime, shutdown_runtime

    rt = init_runtime(seed=1234)
    yield rt
    shutdown_runtime()


def _tiny_model_config(**sections):
    """A small JanusFlow ``ModelConfig`` that builds and runs on CPU in well under a second.

    Keyword arguments replace whole sections (``llm=LLMConfig(...)``, ``repa=RepaConfig(...)``).
    Defaults: GQA LLM (4 heads, 2 groups, 2 layers), SigLIP 32 px / patch 8 (16 tokens), latents
    8x8 patchified by 2 (16 tokens, so REPA's grids match), REPA after block 1.
    """
    from pretrain.model.config import (
        GenerationVisionConfig, LLMConfig, ModelConfig, RepaConfig, UnderstandingEncoderConfig,
    )

    parts = {
        "llm": LLMConfig(vocab_size=256, hidden_size=64, ffn_hidden_size=128, num_layers=2,
                         num_attention_heads=4, num_query_groups=2),
        "und_encoder": UnderstandingEncoderConfig(image_size=32, patch_size=8, hidden_size=32,
                                                  intermediate_size=64, num_layers=2, num_attention_heads=2),
        "gen_vision": GenerationVisionConfig(latent_size=8, patch_size=2, channels=16, num_blocks=1,
                                             time_embed_dim=16),
        "repa": RepaConfig(layer=1, projector_hidden_size=32),
    }
    parts.update(sections)
    return ModelConfig(**parts)


@pytest.fixture
def tiny_model_config():
    """Factory of tiny ``ModelConfig``s: ``tiny_model_config(repa=RepaConfig(enabled=False))``."""
    return _tiny_model_config


def one_error(capsys) -> str:
    """The single ``error:`` line on stderr (argparse prefixes it with the program name)."""
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1, err
    return lines[0]
