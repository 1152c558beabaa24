"""Model families the trainer can train, each as a ``TrainSpec`` (``pretrain.train.spec``).

The recipe's model section decides the family; today every recipe describes JanusFlow.
"""

from __future__ import annotations

from ..recipe import Recipe
from ..train.spec import TrainSpec


def train_spec_for(recipe: Recipe) -> TrainSpec:
    """The ``TrainSpec`` of the model family ``recipe`` describes."""
    from .janusflow import JANUSFLOW

    return JANUSFLOW
