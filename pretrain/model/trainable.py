"""Which top-level modules train in each training stage (``train.trainable``), for both families.

The one statement of the rule: the models apply it (``set_trainable``) and the planner's FLOP and
memory model reads it (``pretrain.flops``) without building a model.
- ``new_modules`` (stage 1): the randomly initialised parts only. JanusFlow: aligners, the
  begin-of-image embedding, the generation encoder and decoder (with the time embedding), the REPA
  projector. Janus-Pro (paper, Sec. 2: "the adaptors and the image head"): both aligners, the image
  head, and the image-code embedding table ``gen_embed``, which is as new as the generation aligner it
  feeds (the released code gives it no other initialisation);
- ``all_but_und_encoder`` (stage 2): everything except SigLIP (Janus-Pro's VQ tokenizer is not part
  of the trained model at all: the shards hold its codes);
- ``all`` (stage 3): everything.
"""

from __future__ import annotations

TRAINABLE_SETS = ("new_modules", "all_but_und_encoder", "all")
NEW_MODULES = {
    "janusflow": (
        "und_aligner", "beg_of_und_embed", "gen_encoder", "gen_enc_aligner",
        "gen_dec_aligner_norm", "gen_dec_aligner", "gen_decoder", "repa_projector",
    ),
    "januspro": ("und_aligner", "gen_embed", "gen_aligner", "gen_head"),
}


def trains(top_module: str, trainable: str, family: str = "janusflow") -> bool:
    """Whether the top-level module ``top_module`` of ``family`` trains under ``train.trainable``."""
    if trainable == "new_modules":
        return top_module in NEW_MODULES[family]
    if trainable == "all_but_und_encoder":
        return top_module != "und_encoder"
    if trainable == "all":
        return True
    raise ValueError(f"train.trainable: unknown set {trainable!r}; one of {', '.join(TRAINABLE_SETS)}")
