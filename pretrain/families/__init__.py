"""Model families the trainer can train, each as a ``TrainSpec`` (``pretrain.train.spec``).

The recipe's ``model.family`` decides which: ``janusflow`` (rectified-flow generation) or
``januspro`` (autoregressive generation of image codes).
"""

from __future__ import annotations

from ..recipe import Recipe
from ..train.spec import TrainSpec


def train_spec_for(recipe: Recipe) -> TrainSpec:
    """The ``TrainSpec`` of the model family ``recipe`` describes."""
    family = recipe.model.family
    if family == "januspro":
        from .januspro import JANUSPRO

        return JANUSPRO
    if family == "janusflow":
        from .janusflow import JANUSFLOW

        return JANUSFLOW
    raise ValueError(f"model.family: no trainer spec for {family!r}")
