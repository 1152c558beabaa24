"""What every family does the same way: build this rank's model stage with its starting weights and
trainable set, and load a full state into it."""

from __future__ import annotations

from typing import Callable, Mapping

import torch
from torch import nn

from ..convert.state import load_model_state
from ..recipe import Recipe
from ..runtime.layout import ParallelLayout
from ..runtime.mpu import megatron_process_groups


def build_stage(model_class, recipe: Recipe, layout: ParallelLayout, log: Callable[[str], None]) -> nn.Module:
    """``model_class(cfg, pre_process, post_process, process_groups=...)`` for this rank's pipeline
    stage, initialised from the recipe's ``init`` paths, with ``train.trainable`` applied."""
    from ..train.init_weights import load_initial_weights

    model = model_class(recipe.model, layout.is_first_stage, layout.is_last_stage,
                        process_groups=megatron_process_groups(layout))
    for line in load_initial_weights(model, recipe.init, layout):
        log(line)
    model.set_trainable(recipe.train.trainable)
    return model


def load_full_state(model: nn.Module, state: Mapping[str, torch.Tensor], layout: ParallelLayout) -> None:
    load_model_state(model, state, layout=layout)
