"""Memory per GPU of a training layout, estimated before renting it (read by ``pretrain.plan``).

Per GPU, for the first pipeline stage (the heaviest): bf16 weights (2 bytes, all parameters), bf16
gradients (2), fp32 master weights + Adam m and v (12) for the trainable ones, i.e. the 16
bytes/parameter of the ZeRO paper, with ZeRO-1 partitioning the 12 over data parallelism, ZeRO-2
also the gradients, ZeRO-3 also the weights; plus the fp32 EMA of the trainable weights
(``train/ema.py`` shards it like the optimizer state: divided by data parallelism from ZeRO-1 on). Activations at
micro-batch 1 x 4,096 use per-layer byte counts of a Llama block with flash attention (no score
matrix stored), the logits at the targets (bf16 + the fp32 copy the loss takes), the trained vision
modules, and the in-flight micro-batches of a 1F1B pipeline; "full recompute" keeps only each
block's input. Not modelled: DeepSpeed's communication buckets, allocator fragmentation, CUDA/NCCL
workspaces.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from .flops import Gradients, SequenceShape, component_of, is_trainable, model_shapes
from .model.config import ModelConfig
from .recipe import WorldLayout

# Vision modules on the first pipeline stage, next to the embedding; the rest: last stage.
FIRST_STAGE = ("siglip", "und_aligner", "gen_encoder", "repa", "gen_aligner")


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per GPU of the first pipeline stage (the heaviest: embedding, SigLIP, generation
    encoder; the only one when PP = 1) for one ZeRO stage and layout. Estimates."""

    zero_stage: int
    tensor_parallel: int
    pipeline_parallel: int
    data_parallel: int
    weights: float
    gradients: float
    optimizer: float  # fp32 master + Adam m, v
    ema: float  # fp32, sharded like the optimizer state
    activations: float
    activations_recompute: float
    allowed: bool = True  # DeepSpeed's pipeline engine refuses ZeRO-2/3

    @property
    def states(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.ema

    @property
    def total(self) -> float:
        return self.states + self.activations

    @property
    def total_recompute(self) -> float:
        return self.states + self.activations_recompute


def first_stage_parameters(cfg: ModelConfig, trainable: str, tp: int, pp: int) -> tuple[float, float]:
    """(all, trainable) parameters held by one GPU of the first pipeline stage."""
    total = train = 0.0
    for key, shape in model_shapes(cfg).items():
        part, n = component_of(key), math.prod(shape)
        if key.startswith("llm.decoder.layers."):
            share = n / pp / tp  # equal blocks per stage, split over TP (norms too: a small overcount)
        elif part in ("llm_blocks", "llm_embed_output"):  # final norm and output layer: last stage
            share = n / tp if pp == 1 or key.startswith("llm.embedding.") else 0.0
        else:  # plain vision modules: replicated over TP
            share = float(n) if pp == 1 or part in FIRST_STAGE else 0.0
        total += share
        train += share if is_trainable(key, trainable, cfg.family) else 0.0
    return total, train


def _llm_layer_bytes_per_token(llm, tp: int) -> float:
    """Bytes a Llama block keeps for its backward, per token: bf16, flash attention, both norms'
    inputs and outputs replicated over TP (no sequence parallelism), the rest split."""
    h, f = llm.hidden_size, llm.ffn_hidden_size
    q, kv = llm.num_attention_heads * llm.head_dim, llm.query_groups * llm.head_dim
    replicated = 2 * 4 * h
    attention = 2 * (q + 2 * kv) + 2 * q + 4 * llm.num_attention_heads  # q, k, v; output; fp32 logsumexp
    mlp = 2 * (2 * f + f + f)  # gate and up, silu(gate), their product (input of fc2)
    return replicated + (attention + mlp) / tp


def activation_bytes(cfg: ModelConfig, grads: Gradients, seq: SequenceShape, tp: int, pp: int,
                     in_flight: int, recompute: bool) -> float:
    """Activations kept for the backward on the first pipeline stage (or the only one), bytes."""
    llm, und, gv = cfg.llm, cfg.und_encoder, cfg.gen_vision
    layers, per_layer = llm.num_layers // pp, _llm_layer_bytes_per_token(llm, tp)
    if recompute:  # each block keeps its input; one block is rebuilt at a time
        blocks = layers * in_flight * seq.tokens * 2 * llm.hidden_size + seq.tokens * per_layer
    else:
        blocks = layers * in_flight * seq.tokens * per_layer
    logits = seq.targets * llm.vocab_size / tp * (2 + 4) if pp == 1 else 0.0  # on the last stage
    # ViT block with a 4x GeLU MLP: ~16 activations of its width per token (bf16).
    siglip = seq.und_images * und.num_image_tokens * und.num_layers * 2 * 16 * und.hidden_size if grads.siglip else 0
    convnext = gv.num_blocks * 2 * 16 * (gv.channels + 2 * gv.channels)  # per position, encoder + decoder
    aligners = 2 * 2 * (gv.channels + llm.hidden_size)
    if cfg.family == "januspro":
        # Per code: the aligner's hidden and output (bf16); the image head's hidden and its logits
        # (bf16 + the loss's fp32 copy) on the last stage.
        gen = seq.codes * 2 * 2 * llm.hidden_size if grads.gen else 0
        head_hidden = cfg.image_tokens.head_hidden_size or llm.hidden_size
        logits += seq.codes * (2 * head_hidden + cfg.image_tokens.codebook_size * (2 + 4)) if pp == 1 else 0.0
        return blocks + logits + (siglip + gen) * in_flight
    repa = 2 * (llm.hidden_size + 4 * cfg.repa.projector_hidden_size) if cfg.repa.enabled else 0
    gen = seq.gen_images * gv.num_latent_tokens * (convnext + aligners + repa) if grads.gen else 0
    return blocks + logits + (siglip + gen) * in_flight


def memory_estimate(cfg: ModelConfig, trainable: str, seqs: Sequence[SequenceShape], zero: int,
                    layout: WorldLayout) -> MemoryEstimate:
    """Memory per GPU under ``zero`` for ``layout``; activations for the worst of ``seqs``."""
    tp, pp, dp = layout.tensor_parallel, layout.pipeline_parallel, layout.data_parallel
    grads = Gradients.for_trainable(trainable, cfg.family)
    params, trained = first_stage_parameters(cfg, trainable, tp, pp)
    in_flight = min(pp, layout.grad_accum_steps) * layout.micro_batch_size  # 1F1B warm-up on stage 0

    def activations(recompute: bool) -> float:
        return max(activation_bytes(cfg, grads, s, tp, pp, in_flight, recompute) for s in seqs)

    return MemoryEstimate(
        zero_stage=zero, tensor_parallel=tp, pipeline_parallel=pp, data_parallel=dp,
        weights=2 * params / (dp if zero >= 3 else 1),
        gradients=2 * trained / (dp if zero >= 2 else 1),
        optimizer=12 * trained / (dp if zero >= 1 else 1),
        ema=4 * trained / (dp if zero >= 1 else 1),
        activations=activations(False), activations_recompute=activations(True),
        allowed=zero <= 1 or pp == 1,
    )
