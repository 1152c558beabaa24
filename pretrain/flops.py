"""The FLOP model of JanusFlow and Janus-Pro training: matmul sizes read off the shapes, what a packed sequence
holds, and the training FLOPs of one sequence by part; the GPUs' dense bf16 peaks for MFU.

Shared by the planner (``pretrain.plan``), the trainer (achieved TFLOP/s and MFU per step), the
loader's work-balancing rule and the benchmarks. ``megatron_lm_flops`` gives the usual
Megatron-LM count of the same LLM (Narayanan et al. 2021) for comparison with published MFU figures.

What "model FLOPs" counts here
------------------------------
Only matrix multiplications and convolutions; norms, activations, softmax and RoPE are left out, and
recomputation is not counted (MFU, not hardware utilisation). A weight applied to one input vector
costs 2 FLOPs per multiply-add forward, 2 more for the gradient of the weight and 2 more for the
gradient of its input, so ``6 N`` per token when both are needed. Which backward matmuls run follows
the training stage's trainable set, layer by layer: a weight gradient where the weights train, an input
gradient where anything before the layer trains. Hence stage 1, with the LLM frozen, still costs ``4 N``
per LLM token: the trained generation encoder and aligners sit before the LLM, so the gradient must
flow back through every block (the output layer likewise at its targets); only the weight gradients
are skipped. A part's first layer reads the part's input, so its input gradient goes with what came
before the part, not with the part (``MatmulSizes``' ``*_first_*`` sizes):

* SigLIP's patch embedding reads pixels, and JanusFlow's generation encoder the noisy latent z_t
  (``in_conv``) and the sinusoidal features of t (``time_embed.linear_1``): data, never an input
  gradient, even where the part trains (``4x`` there, ``6x`` for the layers after them).
* The understanding aligner's first layer reads SigLIP's features: an input gradient only where
  SigLIP trains (stage 3). Janus-Pro's second aligner layer reads the first, so it has one wherever
  the aligner trains (``6x`` in every stage).

Where each part runs:

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

Janus-Pro (``model.family: januspro``) has the same LLM, SigLIP and understanding aligner (a two-layer
MLP there), no REPA and no flow head. Its generation modules run per image code (24x24 = 576 per
384 px image): the code embedding (a lookup, no FLOPs) and the generation aligner (8 -> H -> H) at
every code input, the image head (H -> H -> codebook) at every code target; the VQ tokenizer runs
offline (the shards hold codes) and costs nothing here.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Iterable, Sequence

from .model.config import ModelConfig
from .model.trainable import trains
from .recipe import TASKS


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
    # Janus-Pro's generation path (the understanding aligner shares "und_aligner" above).
    "gen_aligner": ("image-code embedding + generation aligner", ("gen_embed.", "gen_aligner.")),
    "image_head": ("image head (training: at code targets)", ("gen_head.",)),
}

def component_of(key: str) -> str:
    for name, (_, prefixes) in COMPONENTS.items():
        if key.startswith(prefixes):
            return name
    raise KeyError(f"{key}: no planner component owns this tensor; add its prefix to COMPONENTS")


def is_trainable(key: str, trainable: str, family: str = "janusflow") -> bool:
    """Whether the tensor ``key`` of our full state trains under ``train.trainable``."""
    return trains(key.split(".")[0], trainable, family)


_SHAPES: dict[str, dict[str, tuple[int, ...]]] = {}


def model_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Our full state's key -> shape (nothing allocated; remembered per configuration)."""
    from .convert.state import full_state_shapes  # imports transformers: keep ``--help`` fast

    key = repr(cfg)  # ModelConfig is a mutable dataclass: its repr names every field
    if key not in _SHAPES:
        _SHAPES[key] = full_state_shapes(cfg)
    return _SHAPES[key]


# ---------------------------------------------------------------------------------------------
# multiply-adds per application, read off the shapes
_LOOKUPS = ("llm.embedding.weight", "llm.output_layer.weight",
            "und_encoder.tower.embeddings.position_embedding.weight", "gen_embed.weight")
_PER_IMAGE = ("time_embed.", "cond_embeds_mapper.")  # act on the time embedding, once per image
# The first layer of a part, reading its input (module docstring): data (pixels, z_t, the sinusoidal
# features of t) or, for the understanding aligner, SigLIP's features. Every other layer of these parts
# has a layer of its own part before it, so it runs its input gradient wherever the part trains.
# Janus-Pro's generation aligner has none here: its first layer reads the code embedding table, which
# trains with it, so its input gradient runs too.
_FIRST_LAYERS = {
    "janusflow": ("und_encoder.tower.embeddings.patch_embedding.weight", "und_aligner.weight",
                  "gen_encoder.in_conv.weight", "gen_encoder.time_embed.linear_1.weight"),
    "januspro": ("und_encoder.tower.embeddings.patch_embedding.weight", "und_aligner.0.weight"),
}


def is_matmul_weight(key: str, shape: Sequence[int]) -> bool:
    """A linear or convolution weight: ``[out, in]`` or ``[out, in/groups, k, k]``; its element count
    is the multiply-adds per output vector (token, patch or latent position). Lookup tables, norm
    scales, GRN's ``(1, 1, 1, C)`` and the ``(1, H)`` begin-of-image vector are not."""
    return key.endswith(".weight") and key not in _LOOKUPS and len(shape) in (2, 4) and shape[0] > 1


@dataclass(frozen=True)
class MatmulSizes:
    """Multiply-adds of one application of each part, from ``full_state_shapes``. The ``*_first_*``
    sizes are the part of each total in the part's first layer (``_FIRST_LAYERS``), whose input
    gradient follows what comes before the part (module docstring)."""

    llm_per_token: int  # all blocks, per position
    output_per_token: int  # vocab x hidden, per target
    siglip_per_patch: int
    und_aligner_per_patch: int
    gen_per_position: int  # encoder + decoder + aligners, per latent position (Janus-Pro: gen aligner per code)
    gen_per_image: int  # time embedding + time modulation of every block
    repa_per_position: int
    image_head_per_code: int = 0  # Janus-Pro's image head, per code target
    siglip_first_per_patch: int = 0  # the patch embedding (reads pixels)
    und_aligner_first_per_patch: int = 0  # the aligner's first layer (reads SigLIP's features)
    gen_first_per_position: int = 0  # JanusFlow's in_conv (reads z_t)
    gen_first_per_image: int = 0  # JanusFlow's time_embed.linear_1 (reads the sinusoidal features of t)

    @classmethod
    def from_config(cls, cfg: ModelConfig) -> "MatmulSizes":
        shapes = model_shapes(cfg)
        first_layers = _FIRST_LAYERS[cfg.family]
        missing = [key for key in first_layers if key not in shapes]
        if missing:  # a renamed layer would silently bring back the input gradients that never run
            raise KeyError(f"{', '.join(missing)}: not in the {cfg.family} state; update flops._FIRST_LAYERS")
        per = dict.fromkeys(("llm_blocks", "siglip", "und_aligner", "gen_pos", "gen_img", "repa", "image_head"), 0)
        first = dict.fromkeys(per, 0)
        for key, shape in shapes.items():
            if is_matmul_weight(key, shape):
                part = component_of(key)
                if part in ("gen_encoder", "gen_decoder"):
                    part = "gen_img" if any(p in key for p in _PER_IMAGE) else "gen_pos"
                elif part == "gen_aligner":
                    part = "gen_pos"
                per[part] += math.prod(shape)
                if key in first_layers:
                    first[part] += math.prod(shape)
        return cls(per["llm_blocks"], cfg.llm.vocab_size * cfg.llm.hidden_size, per["siglip"],
                   per["und_aligner"], per["gen_pos"], per["gen_img"], per["repa"], per["image_head"],
                   siglip_first_per_patch=first["siglip"], und_aligner_first_per_patch=first["und_aligner"],
                   gen_first_per_position=first["gen_pos"], gen_first_per_image=first["gen_img"])


# ---------------------------------------------------------------------------------------------
# what one packed sequence holds, and what it costs
@dataclass(frozen=True)
class SequenceShape:
    """A packed sequence as far as FLOPs go.

    tokens: positions the LLM runs on; doc_lengths: attention spans (documents, filler pieces);
    und_images / gen_images: images per task; targets: L_AR target positions (logits computed);
    codes: Janus-Pro's image-code positions (each an aligner input and an image-head target).
    """

    tokens: int
    doc_lengths: tuple[int, ...]
    und_images: int
    gen_images: int
    targets: int
    codes: int = 0

    @classmethod
    def from_batch(cls, batch) -> "SequenceShape":
        """A model-ready batch (``datacontract.format`` layout), from its host-side packing facts
        (``PackingMetadata``): nothing is read back from a device."""
        from .data.batch import packing_metadata

        meta = packing_metadata(batch)
        return cls(
            tokens=meta.num_tokens,
            doc_lengths=tuple(meta.doc_lengths),
            und_images=meta.num_und_images,
            gen_images=meta.num_gen,
            targets=meta.num_ar_targets,
            codes=int(meta.gen_code_positions.shape[0]),
        )


@dataclass(frozen=True)
class DocumentModel:
    """Assumed typical documents (estimates, not measurements; override on the command line).

    An understanding document is its image (576 patches + begin/end markers) plus
    ``und_text_tokens`` of chat template, question and answer, of which ``und_answer_tokens`` are
    targets; a generation document is its latents (576 + time token + end marker; Janus-Pro: 576
    codes + begin/end-of-image) plus ``gen_text_tokens`` of template and caption. With the 1.3B defaults that is ~700 and ~650
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
            doc, answers = image_slots(cfg) + 2 + self.gen_text_tokens, 0
        else:
            raise ValueError(f"task {task!r}: expected one of {TASKS}")
        n = seq_length // doc
        if n < 1:
            raise ValueError(f"a typical {task} document ({doc} tokens) does not fit in {seq_length}")
        filler = seq_length - n * doc
        lengths = (doc,) * n + ((filler,) if filler else ())
        und = task == "understanding"
        codes = 0 if und or cfg.family != "januspro" else n * image_slots(cfg)
        return SequenceShape(seq_length, lengths, n if und else 0, 0 if und else n,
                             n * answers + max(filler - 1, 0), codes)

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
    image_head: bool = False  # Janus-Pro's image head trains

    @classmethod
    def for_trainable(cls, trainable: str, family: str = "janusflow") -> "Gradients":
        def trains(key: str) -> bool:  # one representative tensor per part
            return is_trainable(key, trainable, family)

        llm = trains("llm.decoder.final_layernorm.weight")
        if family == "januspro":
            # The generation aligner's input gradient feeds the trained code embedding table: ``gen``
            # covers both (the table trains in every stage).
            before_llm = any(trains(k) for k in ("und_aligner.0.weight", "gen_aligner.0.weight", "llm.embedding.weight"))
            return cls(llm_weights=llm, llm_inputs=llm or before_llm,
                       siglip=trains("und_encoder.tower.post_layernorm.weight"),
                       und_aligner=trains("und_aligner.0.weight"), gen=trains("gen_aligner.0.weight"), repa=False,
                       image_head=trains("gen_head.0.weight"))
        before_llm = any(trains(k) for k in ("und_aligner.weight", "gen_encoder.in_conv.weight", "llm.embedding.weight"))
        return cls(llm_weights=llm, llm_inputs=llm or before_llm,
                   siglip=trains("und_encoder.tower.post_layernorm.weight"), und_aligner=trains("und_aligner.weight"),
                   gen=trains("gen_decoder.input_norm.weight"), repa=trains("repa_projector.net.0.weight"))


def _factor(weights: bool, inputs: bool) -> int:
    """FLOPs per multiply-add in training: forward 2, weight gradient 2, input gradient 2."""
    return 2 + 2 * weights + 2 * inputs


def _layers(trains: bool, input_gradient: bool, first: int, total: int) -> int:
    """Training FLOPs of one application of a part's layers (``total`` multiply-adds, ``first`` of
    them in its first layer). The first layer reads the part's input: an input gradient only where
    that input carries one (``input_gradient``: something before the part trains). Every later layer
    has a layer of the part before it: an input gradient wherever the part trains, or its input carries one."""
    return _factor(trains, input_gradient) * first + _factor(trains, trains or input_gradient) * (total - first)


def causal_pairs(lengths: Iterable[int]) -> int:
    """Query-key pairs a causal varlen kernel computes: d(d+1)/2 per document."""
    return sum(d * (d + 1) // 2 for d in lengths)


def sequence_flops(cfg: ModelConfig, sizes: MatmulSizes, grads: Gradients, seq: SequenceShape) -> dict[str, float]:
    """Training FLOPs of one packed sequence by part (one forward + backward, no recompute)."""
    llm, und, gv = cfg.llm, cfg.und_encoder, cfg.gen_vision
    patches, positions = und.num_image_tokens, gv.num_latent_tokens
    # Score matmuls have no weights: the forward, then twice that for the gradients of q, k and v.
    llm_attention = 4 * causal_pairs(seq.doc_lengths) * llm.num_attention_heads * llm.head_dim * llm.num_layers
    siglip_scores = 4 * patches**2 * und.hidden_size * und.num_layers  # forward
    siglip_fwd = 2 * sizes.siglip_per_patch * patches + siglip_scores
    # SigLIP on understanding images: forward only where frozen; where it trains, every layer's scores and
    # matmuls back-propagate, except that the patch embedding has no input gradient (it reads pixels).
    siglip_train = (_layers(grads.siglip, False, sizes.siglip_first_per_patch, sizes.siglip_per_patch) * patches
                    + (1 + 2 * grads.siglip) * siglip_scores)
    common = {  # the LLM and the understanding path, the same in both families
        "llm_blocks": _factor(grads.llm_weights, grads.llm_inputs) * sizes.llm_per_token * seq.tokens,
        "llm_attention": (1 + 2 * grads.llm_inputs) * llm_attention,
        "output_layer": _factor(grads.llm_weights, grads.llm_inputs) * sizes.output_per_token * seq.targets,
        "siglip_und": seq.und_images * siglip_train,
        # The aligner's first layer reads SigLIP's features (an input gradient only where SigLIP trains).
        "und_aligner": (_layers(grads.und_aligner, grads.siglip, sizes.und_aligner_first_per_patch,
                                sizes.und_aligner_per_patch) * patches * seq.und_images),
    }
    if cfg.family == "januspro":
        return common | {
            # The aligner's first layer reads the code embedding table, which trains with it (``Gradients``):
            # every layer runs its input gradient.
            "gen_modules": _factor(grads.gen, grads.gen) * sizes.gen_per_position * seq.codes,
            # The head's input gradient flows into the LLM whenever the LLM or anything before it trains.
            "image_head": _factor(grads.image_head, grads.llm_inputs) * sizes.image_head_per_code * seq.codes,
        }
    repa = cfg.repa.enabled
    return common | {
        "siglip_repa": seq.gen_images * siglip_fwd if repa else 0,  # no_grad: forward only
        # The encoder's first layers read data (z_t, the features of t); every other layer has a
        # trained layer before it (the generation modules train in every stage).
        "gen_modules": seq.gen_images * (
            _layers(grads.gen, False, sizes.gen_first_per_position, sizes.gen_per_position) * positions
            + _layers(grads.gen, False, sizes.gen_first_per_image, sizes.gen_per_image)),
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
    "image_head": "image head, at image-code targets (Janus-Pro)",
}


def image_slots(cfg: ModelConfig) -> int:
    """Sequence positions of one generation image: latent tokens (JanusFlow) or codes (Janus-Pro)."""
    if cfg.family == "januspro":
        return cfg.image_tokens.num_codes(cfg.und_encoder.image_size)
    return cfg.gen_vision.num_latent_tokens


def lm_training_flops(llm, tokens: int, doc_lengths: Sequence[int], logit_tokens: int) -> float:
    """A plain causal LM of the same size, everything trained: 6N per token + attention + output
    layer at ``logit_tokens`` positions (the plain-transformers baseline of the benchmark)."""
    cfg = ModelConfig(llm=llm, repa=dataclasses.replace(ModelConfig().repa, enabled=False, layer=1))
    seq = SequenceShape(tokens, tuple(doc_lengths), 0, 0, logit_tokens)
    f = sequence_flops(cfg, MatmulSizes.from_config(cfg), Gradients(True, True, False, False, False, False), seq)
    return f["llm_blocks"] + f["llm_attention"] + f["output_layer"]


def megatron_lm_flops(llm, seq_length: int, sequences: int = 1) -> float:
    """Training FLOPs of ``sequences`` sequences of ``seq_length`` tokens as Megatron-LM counts them
    (Narayanan et al. 2021, "Efficient large-scale language model training on GPU clusters", Sec. 5.1):
    ``6 N`` per token for the block matmuls (N = ``llm_per_token`` of ``MatmulSizes``, so SwiGLU and
    grouped queries are counted as built), attention scores dense over the whole sequence (the full
    ``s x s`` matrix, no causal halving, no document boundaries: ``12 s`` x width per layer and token)
    and the output layer at every position (``6 V h``); no recomputation.

    For comparing our MFU with figures quoted under that convention: on packed multimodal sequences
    it counts attention our varlen kernel never computes and logits the model never forms, and none
    of the vision modules. ``llm``: a ``ModelConfig().llm`` section.
    """
    cfg = ModelConfig(llm=llm, repa=dataclasses.replace(ModelConfig().repa, enabled=False, layer=1))
    n = MatmulSizes.from_config(cfg).llm_per_token
    width = llm.num_attention_heads * llm.head_dim
    tokens = seq_length * sequences
    return tokens * (6 * n + 12 * llm.num_layers * width * seq_length + 6 * llm.vocab_size * llm.hidden_size)


def typical_task_flops(cfg: ModelConfig, trainable: str, seq_length: int,
                       docs: DocumentModel = DocumentModel()) -> dict[str, float]:
    """Training FLOPs of the typical packed row of each task (``recipe.TASKS`` names) under the
    trainable set ``trainable``: what the loader balances over ranks and the planner reports."""
    sizes, grads = MatmulSizes.from_config(cfg), Gradients.for_trainable(trainable, cfg.family)
    return {task: float(sum(sequence_flops(cfg, sizes, grads, docs.sequence(task, cfg, seq_length)).values()))
            for task in TASKS}
