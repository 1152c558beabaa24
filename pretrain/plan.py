"""Plan a training run before renting it: parameters, FLOPs, memory per GPU and GPU-days.

``python -m pretrain.plan --recipe recipes/stage2.yaml --gpus 256 --gpu a100 [--mfu 0.4]``
prints, for the recipe's model and layout: parameters by component (counted from
``full_state_shapes``, never hard-coded), training FLOPs per packed sequence and per token, memory
per GPU for ZeRO stages 0-3, and the GPU-days of the whole three-stage schedule (``recipes/stage1-3``)
at the given model FLOPs utilisation (MFU), with the MFU that reproduces the paper's ~1,600 A100
GPU-days. As a library: ``build_plan(recipe, gpus, gpu, mfu) -> Plan``, ``format_plan(plan)``.

FLOPs model (what "model FLOPs" counts here)
---------------------------------------------
Only matrix multiplications and convolutions; norms, activations, softmax and RoPE are left out, and
recomputation is not counted (MFU, not hardware utilisation). A weight applied to one input vector
costs 2 FLOPs per multiply-add forward, 2 more for the gradient of the weight and 2 more for the
gradient of its input, so ``6 N`` per token when both are needed. Which backward matmuls run follows
the training stage's trainable set: a weight gradient where the weights train, an input gradient
where anything before the layer trains. Hence stage 1, with the LLM frozen, still costs ``4 N`` per
LLM token: the trained generation encoder and aligners sit before the LLM, so the gradient must flow
back through every block (the output layer likewise at its targets); only the weight gradients
are skipped. Where each part runs:

* LLM blocks: every position of the packed sequence (4,096, padding and text fillers included).
* Attention scores: per document (varlen: attention never crosses a document), causal, so a
  document of ``d`` tokens costs ``12 * d(d+1)/2 * width`` FLOPs per layer in training. Reported
  for typical document lengths and as the upper bound of one 4,096-token document.
* Output layer: only at L_AR targets (``JanusFlowModel`` computes logits there and nowhere else).
* SigLIP: 576 patches per understanding image (trained only in stage 3, otherwise forward only),
  and 576 per generation image for the REPA targets, always forward only (stop-gradient, no_grad).
* Generation encoder/decoder: convolutions and channel MLPs at the 24x24 = 576 latent positions of
  each generation image; the time embedding and the per-block time modulation once per image.
* REPA projector: the 576 latent positions of each generation image (block-6 features).
* The latent codec is left out: latents are normally precomputed into the shards (``data_tools``);
  shards without them make the trainer run the SDXL-VAE encoder on the fly, which costs extra.

Memory model (estimates)
------------------------
Per GPU, for the first pipeline stage (the heaviest): bf16 weights (2 bytes, all parameters), bf16
gradients (2), fp32 master weights + Adam m and v (12) for the trainable ones, i.e. the 16
bytes/parameter of the ZeRO paper, with ZeRO-1 partitioning the 12 over data parallelism, ZeRO-2
also the gradients, ZeRO-3 also the weights; plus the fp32 EMA of the trainable weights
(``train/ema.py`` keeps a whole copy on every rank, so ZeRO does not shrink it). Activations at
micro-batch 1 x 4,096 use per-layer byte counts of a Llama block with flash attention (no score
matrix stored), the logits at the targets (bf16 + the fp32 copy the loss takes), the trained vision
modules, and the in-flight micro-batches of a 1F1B pipeline; "full recompute" keeps only each
block's input. Not modelled: DeepSpeed's communication buckets, allocator fragmentation, CUDA/NCCL
workspaces.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional, Sequence

from .model.config import ConfigError, ModelConfig
from .recipe import TASKS, Recipe, WorldLayout, load_recipe

REPO = Path(__file__).resolve().parents[1]
SCHEDULE = tuple(REPO / "recipes" / f"stage{i}.yaml" for i in (1, 2, 3))
SECONDS_PER_DAY = 86_400.0

# Sec. 4.1 and Table 1 of the paper: "each model requiring ~1,600 A100 GPU days"; the token count is
# steps x batch (packed sequences) x 4,096 summed over the three stages.
PAPER_A100_GPU_DAYS = 1_600.0
PAPER_TOKENS = (10_000 * 512 + 380_000 * 512 + 26_000 * 256) * 4_096


@dataclass(frozen=True)
class GPUSpec:
    name: str
    peak_bf16_flops: float  # dense (no sparsity), per GPU
    memory_gb: float


GPUS = {
    "a100": GPUSpec("NVIDIA A100 SXM 80GB", 312e12, 80.0),
    "h100": GPUSpec("NVIDIA H100 SXM", 989e12, 80.0),
    "h200": GPUSpec("NVIDIA H200", 989e12, 141.0),
}

# Components by top-level module of our full state (``pretrain.convert.state``), in print order.
COMPONENTS: dict[str, tuple[str, tuple[str, ...]]] = {
    "llm_blocks": ("LLM transformer blocks (+ final norm)", ("llm.decoder.",)),
    "llm_embed_output": ("LLM word embedding + output layer", ("llm.embedding.", "llm.output_layer.")),
    "siglip": ("SigLIP understanding encoder", ("und_encoder.",)),
    "und_aligner": ("understanding aligner + begin-of-image", ("und_aligner.", "beg_of_und_embed")),
    "gen_encoder": ("generation encoder (+ time embed, aligner)", ("gen_encoder.", "gen_enc_aligner.")),
    "gen_decoder": ("generation decoder (+ aligner, norm)",
                    ("gen_decoder.", "gen_dec_aligner.", "gen_dec_aligner_norm.")),
    "repa": ("REPA projector (training only)", ("repa_projector.",)),
}
# Mirrors ``JanusFlowModel.NEW_MODULES`` / ``set_trainable`` (a test checks both agree); importing
# the model would pull in megatron-core for a pure calculation.
NEW_MODULES = ("und_aligner", "beg_of_und_embed", "gen_encoder", "gen_enc_aligner",
               "gen_dec_aligner_norm", "gen_dec_aligner", "gen_decoder", "repa_projector")
FIRST_STAGE = ("siglip", "und_aligner", "gen_encoder", "repa")  # next to the embedding; the rest: last stage


def component_of(key: str) -> str:
    for name, (_, prefixes) in COMPONENTS.items():
        if key.startswith(prefixes):
            return name
    raise KeyError(f"{key}: no planner component owns this tensor; add its prefix to COMPONENTS")


def is_trainable(key: str, trainable: str) -> bool:
    """Whether the tensor ``key`` of our full state trains under ``train.trainable``."""
    top = key.split(".")[0]
    if trainable == "new_modules":
        return top in NEW_MODULES
    if trainable == "all_but_und_encoder":
        return top != "und_encoder"
    if trainable == "all":
        return True
    raise ValueError(f"train.trainable: unknown set {trainable!r}")


_SHAPES: dict[str, dict[str, tuple[int, ...]]] = {}


def model_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Our full state's key -> shape (nothing allocated; remembered per configuration)."""
    from .convert.state import full_state_shapes  # imports transformers: keep ``--help`` fast

    key = repr(cfg)  # ModelConfig is a mutable dataclass: its repr names every field
    if key not in _SHAPES:
        _SHAPES[key] = full_state_shapes(cfg)
    return _SHAPES[key]


def count_parameters(cfg: ModelConfig, trainable: Optional[str] = None) -> dict[str, int]:
    """Component -> parameters (only the trainable ones under ``trainable`` when given)."""
    counts = {name: 0 for name in COMPONENTS}
    for key, shape in model_shapes(cfg).items():
        if trainable is None or is_trainable(key, trainable):
            counts[component_of(key)] += math.prod(shape)
    return counts


# ---------------------------------------------------------------------------------------------
# multiply-adds per application, read off the shapes
_LOOKUPS = ("llm.embedding.weight", "llm.output_layer.weight",
            "und_encoder.tower.embeddings.position_embedding.weight")
_PER_IMAGE = ("time_embed.", "cond_embeds_mapper.")  # act on the time embedding, once per image


def is_matmul_weight(key: str, shape: Sequence[int]) -> bool:
    """A linear or convolution weight: ``[out, in]`` or ``[out, in/groups, k, k]``; its element count
    is the multiply-adds per output vector (token, patch or latent position). Lookup tables, norm
    scales, GRN's ``(1, 1, 1, C)`` and the ``(1, H)`` begin-of-image vector are not."""
    return key.endswith(".weight") and key not in _LOOKUPS and len(shape) in (2, 4) and shape[0] > 1


@dataclass(frozen=True)
class MatmulSizes:
    """Multiply-adds of one application of each part, from ``full_state_shapes``."""

    llm_per_token: int  # all blocks, per position
    output_per_token: int  # vocab x hidden, per target
    siglip_per_patch: int
    und_aligner_per_patch: int
    gen_per_position: int  # encoder + decoder + aligners, per latent position
    gen_per_image: int  # time embedding + time modulation of every block
    repa_per_position: int

    @classmethod
    def from_config(cls, cfg: ModelConfig) -> "MatmulSizes":
        per = dict.fromkeys(("llm_blocks", "siglip", "und_aligner", "gen_pos", "gen_img", "repa"), 0)
        for key, shape in model_shapes(cfg).items():
            if is_matmul_weight(key, shape):
                part = component_of(key)
                if part in ("gen_encoder", "gen_decoder"):
                    part = "gen_img" if any(p in key for p in _PER_IMAGE) else "gen_pos"
                per[part] += math.prod(shape)
        return cls(per["llm_blocks"], cfg.llm.vocab_size * cfg.llm.hidden_size, per["siglip"],
                   per["und_aligner"], per["gen_pos"], per["gen_img"], per["repa"])


# ---------------------------------------------------------------------------------------------
# what one packed sequence holds, and what it costs
@dataclass(frozen=True)
class SequenceShape:
    """A packed sequence as far as FLOPs go.

    tokens: positions the LLM runs on; doc_lengths: attention spans (documents, filler pieces);
    und_images / gen_images: images per task; targets: L_AR target positions (logits computed).
    """

    tokens: int
    doc_lengths: tuple[int, ...]
    und_images: int
    gen_images: int
    targets: int

    @classmethod
    def from_batch(cls, batch) -> "SequenceShape":
        """Read a model-ready batch (``pretrain.data.format`` layout)."""
        from .data.format import TokenKind
        from .step import batch_unit_counts

        kinds = batch.token_kind
        return cls(
            tokens=int(batch.input_ids.numel()),
            doc_lengths=tuple(int(x) for x in (batch.cu_seqlens[1:] - batch.cu_seqlens[:-1]).tolist()),
            und_images=int((kinds == TokenKind.UND_IMAGE_BEGIN).sum()),
            gen_images=int((kinds == TokenKind.GEN_TIME).sum()),
            targets=batch_unit_counts(batch)["ar"],
        )


@dataclass(frozen=True)
class DocumentModel:
    """Assumed typical documents (estimates, not measurements; override on the command line).

    An understanding document is its image (576 patches + begin/end markers) plus
    ``und_text_tokens`` of chat template, question and answer, of which ``und_answer_tokens`` are
    targets; a generation document is its latents (576 + time token + end marker) plus
    ``gen_text_tokens`` of template and caption. With the 1.3B defaults that is ~700 and ~650
    tokens. Whole image documents fill a sequence; the gap is a text filler piece (all targets).
    Text documents are ``text_doc_tokens`` long (capped at the sequence length).
    """

    und_text_tokens: int = 122
    und_answer_tokens: int = 60
    gen_text_tokens: int = 72
    text_doc_tokens: int = 2048

    def sequence(self, task: str, cfg: ModelConfig, seq_length: int) -> SequenceShape:
        """The typical packed sequence whose primary task is ``task`` (one of ``recipe.TASKS``)."""
        if task == "text":
            doc = min(self.text_doc_tokens, seq_length)
            lengths = [doc] * (seq_length // doc) + ([seq_length % doc] if seq_length % doc else [])
            return SequenceShape(seq_length, tuple(lengths), 0, 0, seq_length - len(lengths))
        if task == "understanding":
            doc, answers = cfg.und_encoder.num_image_tokens + 2 + self.und_text_tokens, self.und_answer_tokens
        elif task == "generation":
            doc, answers = cfg.gen_vision.num_latent_tokens + 2 + self.gen_text_tokens, 0
        else:
            raise ValueError(f"task {task!r}: expected one of {TASKS}")
        n = seq_length // doc
        if n < 1:
            raise ValueError(f"a typical {task} document ({doc} tokens) does not fit in {seq_length}")
        filler = seq_length - n * doc
        lengths = (doc,) * n + ((filler,) if filler else ())
        und = task == "understanding"
        return SequenceShape(seq_length, lengths, n if und else 0, 0 if und else n,
                             n * answers + max(filler - 1, 0))

    @staticmethod
    def full_attention(shape: SequenceShape) -> SequenceShape:
        """The same sequence with attention over all its positions (the 4,096 upper bound)."""
        return dataclasses.replace(shape, doc_lengths=(shape.tokens,))


@dataclass(frozen=True)
class Gradients:
    """Which backward matmuls run under a trainable set (see the module docstring)."""

    llm_weights: bool
    llm_inputs: bool  # the gradient flows back through the LLM (something before it trains)
    siglip: bool
    und_aligner: bool
    gen: bool
    repa: bool

    @classmethod
    def for_trainable(cls, trainable: str) -> "Gradients":
        def trains(key: str) -> bool:  # one representative tensor per part
            return is_trainable(key, trainable)

        llm = trains("llm.decoder.final_layernorm.weight")
        before_llm = any(trains(k) for k in ("und_aligner.weight", "gen_encoder.in_conv.weight", "llm.embedding.weight"))
        return cls(llm_weights=llm, llm_inputs=llm or before_llm,
                   siglip=trains("und_encoder.tower.post_layernorm.weight"), und_aligner=trains("und_aligner.weight"),
                   gen=trains("gen_decoder.input_norm.weight"), repa=trains("repa_projector.net.0.weight"))


def _factor(weights: bool, inputs: bool) -> int:
    """FLOPs per multiply-add in training: forward 2, weight gradient 2, input gradient 2."""
    return 2 + 2 * weights + 2 * inputs


def causal_pairs(lengths: Iterable[int]) -> int:
    """Query-key pairs a causal varlen kernel computes: d(d+1)/2 per document."""
    return sum(d * (d + 1) // 2 for d in lengths)


def sequence_flops(cfg: ModelConfig, sizes: MatmulSizes, grads: Gradients, seq: SequenceShape) -> dict[str, float]:
    """Training FLOPs of one packed sequence by part (one forward + backward, no recompute)."""
    llm, und, gv = cfg.llm, cfg.und_encoder, cfg.gen_vision
    patches, positions = und.num_image_tokens, gv.num_latent_tokens
    # Score matmuls have no weights: the forward, then twice that for the gradients of q, k and v.
    llm_attention = 4 * causal_pairs(seq.doc_lengths) * llm.num_attention_heads * llm.head_dim * llm.num_layers
    siglip_fwd = 2 * sizes.siglip_per_patch * patches + 4 * patches**2 * und.hidden_size * und.num_layers
    repa = cfg.repa.enabled
    return {
        "llm_blocks": _factor(grads.llm_weights, grads.llm_inputs) * sizes.llm_per_token * seq.tokens,
        "llm_attention": (1 + 2 * grads.llm_inputs) * llm_attention,
        "output_layer": _factor(grads.llm_weights, grads.llm_inputs) * sizes.output_per_token * seq.targets,
        "siglip_und": seq.und_images * (1 + 2 * grads.siglip) * siglip_fwd,
        "und_aligner": (_factor(grads.und_aligner, grads.siglip) * sizes.und_aligner_per_patch
                        * patches * seq.und_images),
        "siglip_repa": seq.gen_images * siglip_fwd if repa else 0,  # no_grad: forward only
        "gen_modules": (_factor(grads.gen, grads.gen) * seq.gen_images
                        * (sizes.gen_per_position * positions + sizes.gen_per_image)),
        "repa_projector": (_factor(grads.repa, grads.repa) * sizes.repa_per_position * positions
                           * seq.gen_images if repa else 0),
    }


FLOP_PARTS = {
    "llm_blocks": "LLM blocks, every position",
    "llm_attention": "LLM attention scores",
    "output_layer": "output layer, at L_AR targets only",
    "siglip_und": "SigLIP on understanding images",
    "und_aligner": "understanding aligner",
    "siglip_repa": "SigLIP on generation images (REPA targets, forward only)",
    "gen_modules": "generation encoder + decoder (latent positions)",
    "repa_projector": "REPA projector (latent positions)",
}


def lm_training_flops(llm, tokens: int, doc_lengths: Sequence[int], logit_tokens: int) -> float:
    """A plain causal LM of the same size, everything trained: 6N per token + attention + output
    layer at ``logit_tokens`` positions (the plain-transformers baseline of the benchmark)."""
    cfg = ModelConfig(llm=llm, repa=dataclasses.replace(ModelConfig().repa, enabled=False, layer=1))
    seq = SequenceShape(tokens, tuple(doc_lengths), 0, 0, logit_tokens)
    f = sequence_flops(cfg, MatmulSizes.from_config(cfg), Gradients(True, True, False, False, False, False), seq)
    return f["llm_blocks"] + f["llm_attention"] + f["output_layer"]


# ---------------------------------------------------------------------------------------------
# memory
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
    ema: float
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
        train += share if is_trainable(key, trainable) else 0.0
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
    repa = 2 * (llm.hidden_size + 4 * cfg.repa.projector_hidden_size) if cfg.repa.enabled else 0
    gen = seq.gen_images * gv.num_latent_tokens * (convnext + aligners + repa) if grads.gen else 0
    return blocks + logits + (siglip + gen) * in_flight


def memory_estimate(cfg: ModelConfig, trainable: str, seqs: Sequence[SequenceShape], zero: int,
                    layout: WorldLayout) -> MemoryEstimate:
    """Memory per GPU under ``zero`` for ``layout``; activations for the worst of ``seqs``."""
    tp, pp, dp = layout.tensor_parallel, layout.pipeline_parallel, layout.data_parallel
    grads = Gradients.for_trainable(trainable)
    params, trained = first_stage_parameters(cfg, trainable, tp, pp)
    in_flight = min(pp, layout.grad_accum_steps) * layout.micro_batch_size  # 1F1B warm-up on stage 0

    def activations(recompute: bool) -> float:
        return max(activation_bytes(cfg, grads, s, tp, pp, in_flight, recompute) for s in seqs)

    return MemoryEstimate(
        zero_stage=zero, tensor_parallel=tp, pipeline_parallel=pp, data_parallel=dp,
        weights=2 * params / (dp if zero >= 3 else 1),
        gradients=2 * trained / (dp if zero >= 2 else 1),
        optimizer=12 * trained / (dp if zero >= 1 else 1),
        ema=4 * trained,
        activations=activations(False), activations_recompute=activations(True),
        allowed=zero <= 1 or pp == 1,
    )


# ---------------------------------------------------------------------------------------------
# the plan
@dataclass(frozen=True)
class StagePlan:
    """One training stage of the schedule."""

    stage: str
    trainable: str
    steps: int
    global_batch: int
    seq_length: int
    task_fractions: dict[str, float]  # share of packed sequences per primary task, over all steps
    flops_per_token: float  # typical documents
    flops_per_token_upper: float  # attention over the whole sequence

    @property
    def tokens(self) -> int:
        return self.steps * self.global_batch * self.seq_length

    @property
    def flops(self) -> float:
        return self.tokens * self.flops_per_token

    @property
    def flops_upper(self) -> float:
        return self.tokens * self.flops_per_token_upper


@dataclass(frozen=True)
class Plan:
    model: ModelConfig
    stage: StagePlan
    gpu: GPUSpec
    gpus: int
    mfu: float
    layout: WorldLayout
    zero_stage: int
    docs: DocumentModel
    params: dict[str, int]
    trainable_params: dict[str, int]
    sequences: dict[str, SequenceShape]  # typical sequence per primary task
    sequence_flops: dict[str, dict[str, float]]  # per task: part -> FLOPs (typical documents)
    sequence_flops_upper: dict[str, dict[str, float]]  # per task: part -> FLOPs (attention at seq_length)
    six_n: float  # 6 x LLM block matmul parameters, FLOPs per token
    memory: list[MemoryEstimate]  # ZeRO 0-3 in the chosen layout
    schedule: list[StagePlan] = field(default_factory=list)
    other_layouts: list[list[MemoryEstimate]] = field(default_factory=list)  # ZeRO 0-3 per valid TP x PP

    def gpu_days(self, flops: float, mfu: Optional[float] = None, gpu: Optional[GPUSpec] = None) -> float:
        return flops / ((gpu or self.gpu).peak_bf16_flops * (mfu or self.mfu)) / SECONDS_PER_DAY

    @property
    def total_tokens(self) -> int:
        return sum(s.tokens for s in self.schedule)

    @property
    def total_flops(self) -> float:
        return sum(s.flops for s in self.schedule)

    @property
    def total_flops_upper(self) -> float:
        return sum(s.flops_upper for s in self.schedule)

    def mfu_for_gpu_days(self, gpu_days: float = PAPER_A100_GPU_DAYS, gpu: GPUSpec = GPUS["a100"],
                         upper: bool = False) -> float:
        """The MFU at which the schedule takes ``gpu_days`` (default: the paper's 1,600 A100-days)."""
        flops = self.total_flops_upper if upper else self.total_flops
        return flops / (gpu_days * SECONDS_PER_DAY * gpu.peak_bf16_flops)


def stage_plan(recipe: Recipe, docs: DocumentModel) -> StagePlan:
    """FLOPs per token of a stage recipe, its task mix averaged over the steps of each ratio phase."""
    cfg, data, steps = recipe.model, recipe.data, recipe.optim.steps
    fractions, start = dict.fromkeys(TASKS, 0.0), 0
    for phase in data.ratio:
        end = steps if phase.until_step is None else min(phase.until_step, steps)
        for task, share in phase.fractions().items():
            fractions[task] += share * max(end - start, 0) / steps
        start = end
    sizes, grads = MatmulSizes.from_config(cfg), Gradients.for_trainable(recipe.train.trainable)
    typical = upper = 0.0
    for task, share in fractions.items():
        if share:
            seq = docs.sequence(task, cfg, data.seq_length)
            typical += share * sum(sequence_flops(cfg, sizes, grads, seq).values())
            upper += share * sum(sequence_flops(cfg, sizes, grads, docs.full_attention(seq)).values())
    return StagePlan(recipe.train.stage, recipe.train.trainable, steps, recipe.parallel.global_batch_size,
                     data.seq_length, fractions, typical / data.seq_length, upper / data.seq_length)


def with_layout(recipe: Recipe, tp: Optional[int] = None, pp: Optional[int] = None,
                zero: Optional[int] = None, micro_batch: Optional[int] = None) -> Recipe:
    """The recipe with its parallel layout overridden (validated like a recipe file)."""
    changes = {k: v for k, v in (("tensor_parallel", tp), ("pipeline_parallel", pp), ("zero_stage", zero),
                                 ("micro_batch_size", micro_batch)) if v is not None}
    return dataclasses.replace(recipe, parallel=dataclasses.replace(recipe.parallel, **changes)) if changes else recipe


def build_plan(recipe: Recipe, gpus: int, gpu: str = "a100", mfu: float = 0.4, *,
               tp: Optional[int] = None, pp: Optional[int] = None, zero: Optional[int] = None,
               micro_batch: Optional[int] = None, schedule: Optional[Sequence[Recipe]] = None,
               docs: DocumentModel = DocumentModel()) -> Plan:
    """Plan ``recipe`` on ``gpus`` GPUs of kind ``gpu`` (a key of ``GPUS``) at ``mfu``.

    ``tp``/``pp``/``zero``/``micro_batch`` override the recipe's layout; ``schedule`` is the list of
    stage recipes the GPU-days add up (default ``recipes/stage1-3.yaml``). Raises ``ConfigError``
    for a layout the recipe rejects (e.g. a global batch the data-parallel size does not divide).
    """
    if gpu not in GPUS:
        raise ValueError(f"gpu: {gpu!r} is not one of {', '.join(GPUS)}")
    if not 0 < mfu <= 1:
        raise ValueError(f"mfu: {mfu} must be in (0, 1]")
    recipe = with_layout(recipe, tp, pp, zero, micro_batch)
    layout = recipe.validate_world(gpus)
    cfg, trainable = recipe.model, recipe.train.trainable
    sizes, grads = MatmulSizes.from_config(cfg), Gradients.for_trainable(trainable)
    sequences = {t: docs.sequence(t, cfg, recipe.data.seq_length) for t in TASKS}
    seqs = list(sequences.values())
    others = []
    for other_tp in (1, 2, 4, 8):
        for other_pp in (1, 2, 4):
            try:
                other = with_layout(recipe, other_tp, other_pp, zero=min(recipe.parallel.zero_stage, 1))
                other_layout = other.validate_world(gpus)
            except ConfigError:
                continue  # heads, layers or the global batch do not divide
            others.append([memory_estimate(cfg, trainable, seqs, z, other_layout) for z in range(4)])
    if schedule is None:
        schedule = [load_recipe(p) for p in SCHEDULE]
    return Plan(
        model=cfg, stage=stage_plan(recipe, docs), gpu=GPUS[gpu], gpus=gpus, mfu=mfu, layout=layout,
        zero_stage=recipe.parallel.zero_stage, docs=docs,
        params=count_parameters(cfg), trainable_params=count_parameters(cfg, trainable),
        sequences=sequences,
        sequence_flops={t: sequence_flops(cfg, sizes, grads, s) for t, s in sequences.items()},
        sequence_flops_upper={t: sequence_flops(cfg, sizes, grads, docs.full_attention(s))
                              for t, s in sequences.items()},
        six_n=6.0 * sizes.llm_per_token,
        memory=[memory_estimate(cfg, trainable, seqs, z, layout) for z in range(4)],
        schedule=[stage_plan(r, docs) for r in schedule], other_layouts=others,
    )


# ---------------------------------------------------------------------------------------------
# printing
def _row(label: str, cells: Iterable[str], width: int = 58) -> str:
    return f"  {label:<{width}}" + "".join(f"{c:>15}" for c in cells)


def _doc_summary(seq: SequenceShape) -> str:
    lengths = seq.doc_lengths
    main = max(set(lengths), key=lengths.count)
    rest = [d for d in lengths if d != main]
    return f"{lengths.count(main)}x{main}" + (f"+{'+'.join(map(str, rest))}" if rest else "")


def _memory_lines(plan: Plan) -> list[str]:
    st, lay = plan.stage, plan.layout
    lines = [
        f"Memory per GPU, GB (estimates; first pipeline stage, micro-batch {lay.micro_batch_size} x "
        f"{st.seq_length:,}, worst typical sequence)",
        f"  {'layout':<18}{'ZeRO':>5}{'weights':>9}{'grads':>8}{'master+Adam':>12}{'EMA fp32':>9}"
        f"{'activ.':>8}{'total':>8}{'activ. rc':>10}{'total rc':>9}",
    ]
    for m in plan.memory:
        name = f"TP{m.tensor_parallel} PP{m.pipeline_parallel} DP{m.data_parallel}"
        if not m.allowed:
            lines.append(f"  {name:<18}{m.zero_stage:>5}   n/a: DeepSpeed's pipeline engine takes ZeRO 0-1 only")
            continue
        over = "  > GPU memory" if m.total_recompute > plan.gpu.memory_gb * 1e9 else ""
        lines.append(f"  {name:<18}{m.zero_stage:>5}{m.weights / 1e9:>9.2f}{m.gradients / 1e9:>8.2f}"
                     f"{m.optimizer / 1e9:>12.2f}{m.ema / 1e9:>9.2f}{m.activations / 1e9:>8.2f}"
                     f"{m.total / 1e9:>8.2f}{m.activations_recompute / 1e9:>10.2f}{m.total_recompute / 1e9:>9.2f}{over}")
    lines.append("  (rc: full activation recomputation of the LLM blocks; buckets and fragmentation not modelled)")
    if plan.other_layouts:
        lines.append(f"  Layouts on {plan.gpus} GPUs, total GB per GPU without / with recomputation:")
        lines.append(f"  {'layout':<18}" + "".join(f"{'ZeRO-' + str(z):>15}" for z in range(4)))
        for row in plan.other_layouts:
            name = f"TP{row[0].tensor_parallel} PP{row[0].pipeline_parallel} DP{row[0].data_parallel}"
            cells = "".join(f"{m.total / 1e9:>7.1f} /{m.total_recompute / 1e9:>6.1f}" if m.allowed else f"{'n/a':>15}"
                            for m in row)
            lines.append(f"  {name:<18}{cells}")
    return lines


def format_plan(plan: Plan, recipe_name: str = "") -> str:
    st, lay, seqs = plan.stage, plan.layout, plan.sequences
    per_pos = lambda flops: f"{flops / st.seq_length / 1e9:.2f}"  # noqa: E731
    lines = [
        f"JanusFlow training plan: {recipe_name or st.stage} (stage {st.stage!r}, trainable: {st.trainable})",
        f"{plan.gpus} x {plan.gpu.name} ({plan.gpu.peak_bf16_flops / 1e12:.0f} TFLOP/s bf16 dense, "
        f"{plan.gpu.memory_gb:.0f} GB), MFU {plan.mfu:.2f}; layout TP {lay.tensor_parallel} x PP "
        f"{lay.pipeline_parallel} x DP {lay.data_parallel}, ZeRO-{plan.zero_stage}, micro-batch "
        f"{lay.micro_batch_size}, accumulation {lay.grad_accum_steps}",
        "",
        f"Parameters (from full_state_shapes)                   {'total':>15} {'trainable':>15}",
    ]
    for name, (label, _) in COMPONENTS.items():
        lines.append(f"  {label:<50} {plan.params[name]:>15,} {plan.trainable_params[name]:>15,}")
    lines.append(f"  {'total':<50} {sum(plan.params.values()):>15,} {sum(plan.trainable_params.values()):>15,}")

    lines += ["", f"Training FLOPs per packed sequence of {st.seq_length:,} tokens, GFLOP per LLM position "
              f"(stage {st.stage!r}; typical documents, estimates)",
              _row("", TASKS),
              _row("documents: lengths", (_doc_summary(seqs[t]) for t in TASKS)),
              _row("images / L_AR targets", (f"{seqs[t].und_images + seqs[t].gen_images} / {seqs[t].targets}"
                                             for t in TASKS))]
    for part, label in FLOP_PARTS.items():
        lines.append(_row(label, (per_pos(plan.sequence_flops[t][part]) for t in TASKS)))
    lines += [
        _row(f"LLM attention at the {st.seq_length:,} upper bound (one document)",
             (per_pos(plan.sequence_flops_upper[t]["llm_attention"]) for t in TASKS)),
        _row("total, typical documents", (per_pos(sum(plan.sequence_flops[t].values())) for t in TASKS)),
        _row("total, attention at the upper bound", (per_pos(sum(plan.sequence_flops_upper[t].values()))
                                                     for t in TASKS)),
    ]
    llm_rule = ("LLM trained: 6N" if plan.trainable_params["llm_blocks"] else
                "LLM frozen in this stage: 4N, its backward still runs for the gradients of the modules before it")
    siglip_rule = "trained: 6x" if plan.trainable_params["siglip"] else "frozen: forward only, 2x"
    patches, latents = plan.model.und_encoder.num_image_tokens, plan.model.gen_vision.num_latent_tokens
    mix = ", ".join(f"{t} {f:.3f}" for t, f in st.task_fractions.items())
    lines += [
        f"  Rules: 6N per position for N = {plan.six_n / 6e9:.3f}B LLM block matmul parameters = "
        f"{plan.six_n / 1e9:.2f} GFLOP ({llm_rule});",
        "  attention causal within each document (packing never attends across documents); logits only at "
        "L_AR targets;",
        f"  SigLIP on {patches} patches per understanding image ({siglip_rule}) and per generation image "
        f"(REPA target, no_grad: 2x); generation modules and REPA at {latents} latent positions per image.",
        f"FLOPs per token, stage mix ({mix} of sequences): {st.flops_per_token / 1e9:.2f} GFLOP "
        f"(typical documents), {st.flops_per_token_upper / 1e9:.2f} GFLOP (attention at {st.seq_length:,})",
        "",
        *_memory_lines(plan),
        "",
        f"Schedule: GPU-days at MFU {plan.mfu:.2f} on {plan.gpu.name}, wall-clock days on {plan.gpus} GPUs",
        f"  {'stage':<8}{'trainable':<21}{'steps':>9}{'batch':>7}{'tokens':>18}{'GFLOP/tok':>10}"
        f"{'FLOPs':>10}{'GPU-days':>10}{'days':>8}",
    ]
    for s in plan.schedule:
        days = plan.gpu_days(s.flops)
        lines.append(f"  {s.stage:<8}{s.trainable:<21}{s.steps:>9,}{s.global_batch:>7}{s.tokens:>18,}"
                     f"{s.flops_per_token / 1e9:>10.2f}{s.flops:>10.2e}{days:>10,.0f}{days / plan.gpus:>8.2f}")
    days = plan.gpu_days(plan.total_flops)
    paper = "equals" if plan.total_tokens == PAPER_TOKENS else "DIFFERS FROM"
    lines += [
        f"  {'total':<38}{plan.total_tokens:>25,}{plan.total_flops / plan.total_tokens / 1e9:>10.2f}"
        f"{plan.total_flops:>10.2e}{days:>10,.0f}{days / plan.gpus:>8.2f}",
        f"  with attention at the {st.seq_length:,} upper bound: {plan.total_flops_upper:.2e} FLOPs, "
        f"{plan.gpu_days(plan.total_flops_upper):,.0f} GPU-days",
        "",
        f"Paper check: {plan.total_tokens / 1e9:,.1f}B tokens {paper} (10,000x512 + 380,000x512 + 26,000x256) x "
        f"4,096 = {PAPER_TOKENS:,}",
        f"Paper check: {PAPER_A100_GPU_DAYS:,.0f} A100 GPU-days is reproduced at MFU {plan.mfu_for_gpu_days():.3f} "
        f"(typical documents; {plan.mfu_for_gpu_days(upper=True):.3f} with attention at {st.seq_length:,})",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="pretrain.plan",
        description="Estimate parameters, training FLOPs, memory per GPU and GPU-days of a JanusFlow recipe "
                    "and of the three-stage schedule (all figures are model estimates).",
        epilog="Example: python -m pretrain.plan --recipe recipes/stage2.yaml --gpus 256 --gpu a100 --mfu 0.4",
    )
    p.add_argument("--recipe", default=str(SCHEDULE[1]), help="YAML recipe (default: recipes/stage2.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe key, as pretrain.main does (repeatable)")
    p.add_argument("--gpus", type=int, required=True, help="number of GPUs (the world size)")
    p.add_argument("--gpu", choices=sorted(GPUS), default="a100", help="GPU kind: peak bf16 FLOP/s and memory")
    p.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilisation for GPU-days (default 0.4)")
    p.add_argument("--tp", type=int, default=None, help="tensor parallel size (default: the recipe's)")
    p.add_argument("--pp", type=int, default=None, help="pipeline parallel size (default: the recipe's)")
    p.add_argument("--zero", type=int, choices=(0, 1, 2, 3), default=None, help="ZeRO stage (default: the recipe's)")
    p.add_argument("--micro-batch", type=int, default=None, help="sequences per micro-batch (default: the recipe's)")
    p.add_argument("--schedule", nargs="+", default=[str(s) for s in SCHEDULE],
                   help="stage recipes whose GPU-days add up (default: recipes/stage1.yaml stage2.yaml stage3.yaml)")
    d = DocumentModel()
    p.add_argument("--und-text-tokens", type=int, default=d.und_text_tokens,
                   help=f"text tokens per understanding document (default {d.und_text_tokens})")
    p.add_argument("--und-answer-tokens", type=int, default=d.und_answer_tokens,
                   help=f"answer (target) tokens per understanding document (default {d.und_answer_tokens})")
    p.add_argument("--gen-text-tokens", type=int, default=d.gen_text_tokens,
                   help=f"text tokens per generation document (default {d.gen_text_tokens})")
    p.add_argument("--text-doc-tokens", type=int, default=d.text_doc_tokens,
                   help=f"length of a text document (default {d.text_doc_tokens})")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        recipe = load_recipe(args.recipe, args.overrides)
        schedule = [load_recipe(p) for p in args.schedule]
        docs = DocumentModel(args.und_text_tokens, args.und_answer_tokens, args.gen_text_tokens, args.text_doc_tokens)
        plan = build_plan(recipe, args.gpus, args.gpu, args.mfu, tp=args.tp, pp=args.pp, zero=args.zero,
                          micro_batch=args.micro_batch, schedule=schedule, docs=docs)
    except (ConfigError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    path = Path(args.recipe).resolve()
    print(format_plan(plan, str(path.relative_to(REPO)) if path.is_relative_to(REPO) else args.recipe))
    return 0


if __name__ == "__main__":
    sys.exit(main())
