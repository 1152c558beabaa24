"""Which top-level modules of JanusFlow train in each training stage (``train.trainable``).

The one statement of the rule: the model applies it (``JanusFlowModel.set_trainable``) and the
planner's FLOP and memory model reads it (``pretrain.flops``) without building a model.
- ``new_modules`` (stage 1): the randomly initialised parts only: aligners, the begin-of-image
  embedding, the generation encoder and decoder (with the time embedding), the REPA projector;
- ``all_but_und_encoder`` (stage 2): everything except SigLIP;
- ``all`` (stage 3): everything.
"""

from __future__ import annotations

TRAINABLE_SETS = ("new_modules", "all_but_und_encoder", "all")
NEW_MODULES = (
    "und_aligner", "beg_of_und_embed", "gen_encoder", "gen_enc_aligner",
    "gen_dec_aligner_norm", "gen_dec_aligner", "gen_decoder", "repa_projector",
)


def trains(top_module: str, trainable: str) -> bool:
    """Whether the top-level module ``top_module`` trains under ``train.trainable``."""
    if trainable == "new_modules":
        return top_module in NEW_MODULES
    if trainable == "all_but_und_encoder":
        return top_module != "und_encoder"
    if trainable == "all":
        return True
    raise ValueError(f"train.trainable: unknown set {trainable!r}; one of {', '.join(TRAINABLE_SETS)}")
