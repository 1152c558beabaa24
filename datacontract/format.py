"""The contract between the offline shards (``data_tools``) and the model: packed multimodal sequences.

Glossary: a *document* (or sample) is one understanding, generation or text example; a *packed
sequence* holds several documents, at most ``seq_length`` tokens; attention never crosses a document
boundary and positions restart at 0 in every document.

Layout of one document, position by position (``TokenKind`` says where each input embedding comes from):

- understanding: BOS, chat-template text with each image as
  ``[UND_IMAGE_BEGIN, UND_IMAGE x N_und, <end_of_image> text]``, the question, "Assistant:", then the
  answer and EOS. Targets (loss) are the answer tokens and EOS.
- generation: BOS, chat-template text with the caption, then ``[GEN_TIME, GEN_LATENT x N_gen,
  <end_of_image> text]``. The time token sits where the released sampler puts it (in place of the
  begin-of-generation marker). No token targets: the loss is on the velocity at the latent positions.
- text: plain tokens, every token after the first is a target.

Janus-Pro (``model.family: januspro``) generates images as discrete codes of a VQ tokenizer, so its
generation document is BOS, chat-template text with the caption, ``<begin_of_image>`` (a plain TEXT
token), ``[GEN_CODE x N_codes]`` (``input_ids`` hold the codes, 0..codebook-1, row-major) and
``<end_of_image>``. Every code is a target (``target_mask`` 1), predicted by the image head from the
position before it; ``<end_of_image>`` is not a target. Its understanding images are
``<begin_of_image>`` (TEXT), ``UND_IMAGE x N_und``, ``<end_of_image>``: no learned begin embedding.

A generation document whose prompt is dropped for classifier-free guidance keeps its length: its
prompt tokens after BOS are hidden from attention (``hidden`` keys), as the released sampler masks
the unconditional row. Janus-Pro's released sampler instead replaces those tokens by the pad token
and attends to them (BOS and ``<begin_of_image>`` kept); its family does the same in training. The drop is drawn at training time, not stored in the shards.
"""

from __future__ import annotations

import enum


class Task(enum.IntEnum):
    UNDERSTANDING = 0
    GENERATION = 1
    TEXT = 2


class TokenKind(enum.IntEnum):
    TEXT = 0  # word embedding of input_ids
    UND_IMAGE_BEGIN = 1  # the learned beg_of_und_embed
    UND_IMAGE = 2  # one aligned SigLIP patch feature, images in order of appearance, row-major
    GEN_TIME = 3  # the time embedding t_emb
    GEN_LATENT = 4  # one generation-encoder token of the noisy latent z_t, row-major
    GEN_CODE = 5  # Janus-Pro: one VQ code of the image (input_ids holds it), embedded by gen_embed


# Columns of one packed sequence in an Arrow shard (one row = one packed sequence).
COL_INPUT_IDS = "input_ids"  # list<int32>[L]: token ids; image/latent/time slots hold a placeholder id
COL_TOKEN_KIND = "token_kind"  # list<uint8>[L]: TokenKind
COL_TARGET_MASK = "target_mask"  # list<uint8>[L]: 1 where token i is predicted from position i-1
COL_DOC_LENGTHS = "doc_lengths"  # list<int32>[D]: lengths of the documents, in order, summing to L
COL_DOC_TASKS = "doc_tasks"  # list<uint8>[D]: Task of each document
COL_UND_IMAGES = "und_images"  # list<binary>: encoded understanding images (resized, padded), in order
COL_GEN_IMAGES = "gen_images"  # list<binary>: encoded generation images (resized, cropped), in order
COL_GEN_LATENTS = "gen_latents"  # optional list<binary>: VAE latents, raw little-endian float16/bf16
COL_GEN_LATENT_DTYPE = "gen_latent_dtype"  # optional string: "float16" or "bfloat16"

PACKED_COLUMNS = (
    COL_INPUT_IDS,
    COL_TOKEN_KIND,
    COL_TARGET_MASK,
    COL_DOC_LENGTHS,
    COL_DOC_TASKS,
    COL_UND_IMAGES,
    COL_GEN_IMAGES,
)
