"""Parameter counts of the released JanusFlow-1.3B architecture, built on the meta device (no memory).

Each count is checked against a closed formula written from the architecture description, and
against the published sizes: DeepSeek-LLM "1.3B" (its transformer blocks; with the untied 102400-word
embedding and output layer the LLM holds 1.65B), SigLIP-L ~300M, generation modules ~70M, and a
released checkpoint of ~2.05B parameters. Run with ``-s`` to see the figures.
"""

from __future__ import annotations

import math
from collections import Counter

import torch

from pretrain.convert.release import release_shapes
from pretrain.model.config import ModelConfig
from pretrain.model.janusflow import JanusFlowModel


def llm_formula(cfg) -> tuple[int, int]:
    """(transformer blocks incl. final norm, embedding + output layer)."""
    h, f, d = cfg.hidden_size, cfg.ffn_hidden_size, cfg.head_dim
    attention = (cfg.num_attention_heads + 2 * cfg.query_groups) * d * h + cfg.num_attention_heads * d * h
    block = attention + 3 * h * f + 2 * h  # SwiGLU: gate, up, down; two RMSNorms
    return cfg.num_layers * block + h, 2 * cfg.vocab_size * h


def siglip_formula(cfg) -> int:
    d, m = cfg.hidden_size, cfg.intermediate_size
    patches = cfg.num_image_tokens
    embeddings = 3 * cfg.patch_size**2 * d + d + patches * d
    block = 4 * d + (3 * d * d + 3 * d) + (d * d + d) + (d * m + m) + (m * d + d)
    return embeddings + cfg.num_layers * block + 2 * d


def generation_formula(cfg, llm_hidden: int) -> int:
    """Generation encoder (with time embedding) + decoder + the three aligner modules."""
    g, k = cfg.gen_vision, llm_hidden

    def convnext(c: int) -> int:
        return (49 * c + c) + c + (4 * c * c + 4 * c) + 8 * c + (4 * c * c + c) + (2 * c * k + 2 * c)

    c, out = g.channels, g.latent_channels * g.patch_size**2
    time_embed = (g.time_embed_dim * k + k) + (k * k + k)
    encoder = time_embed + (g.latent_channels * c * g.patch_size**2 + c) + g.num_blocks * convnext(c)
    decoder = c + g.num_blocks * convnext(2 * c) + 2 * c + (2 * c * out + out)
    aligners = (c * k + k) + k + (k * c + c)
    return encoder + decoder + aligners


def test_released_architecture_parameter_counts(runtime):
    cfg = ModelConfig()
    with torch.device("meta"):
        model = JanusFlowModel(cfg)
    counts = Counter()
    for name, p in model.named_parameters():
        assert p.is_meta, name
        counts[name.split(".")[0]] += p.numel()

    blocks, embeddings = llm_formula(cfg.llm)
    gen_modules = ("gen_encoder", "gen_decoder", "gen_enc_aligner", "gen_dec_aligner_norm", "gen_dec_aligner")
    generation = sum(counts[m] for m in gen_modules)
    released = sum(math.prod(s) for s in release_shapes(cfg).values())
    print(
        f"\nLLM {counts['llm']:,} (blocks {blocks:,} + embedding/output {embeddings:,})"
        f"\nSigLIP {counts['und_encoder']:,}  und_aligner {counts['und_aligner']:,}"
        f"\ngeneration encoder+decoder+aligners {generation:,}"
        f"\nREPA projector {counts['repa_projector']:,} (training only)"
        f"\nreleased checkpoint (with SigLIP's unused attn_pool) {released:,}"
    )

    assert counts["llm"] == blocks + embeddings == 1_652_656_128
    assert 1.2e9 < blocks < 1.5e9  # the "1.3B" of DeepSeek-LLM-1.3B
    assert counts["und_encoder"] == siglip_formula(cfg.und_encoder)
    assert 2.8e8 < counts["und_encoder"] < 3.3e8
    assert generation == generation_formula(cfg, cfg.llm.hidden_size)
    assert 5e7 < generation < 9e7
    assert 2.0e9 < released < 2.1e9  # the release is about 2.05B parameters (4.09 GB in bf16)
