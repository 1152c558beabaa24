"""The seam between the trainer and a model family: what a family hands the trainer.

The trainer (``pretrain.train.trainer``) knows engines, data streams, checkpoints and logging; it
does not know which model it trains. A model family (``pretrain.families``) provides a ``TrainSpec``:
how to build this rank's model stage for a parallel layout, how to turn a loader batch into model
inputs and loss terms, how many units of each objective a batch holds (for the global normalisation
of the losses), its FLOP model, its checkpoint naming and its periodic sample grid.

Contracts:
- ``ModelStep.unit_counts`` and ``ModelStep.flops`` read the batch *as the loader made it, on the
  host*: no device tensor is read, so the step's accounting costs no host round trip.
- ``ModelStep.forward`` runs one stage of the model on one prepared micro-batch. ``received`` is the
  tuple of activations from the previous pipeline stage (None on the first stage, and always None
  without pipeline parallelism). It returns the tensors to send to the next stage (None on the last
  stage) and the loss terms this stage owns (``pretrain.losses.LossTerm`` by objective name).
- Loss terms are combined in one place, ``pretrain.train.forward_backward.micro_batch_loss``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Protocol

import torch
from torch import nn

from ..losses import LossTerm
from ..recipe import Recipe
from ..runtime.layout import ParallelLayout


@dataclass
class Prepared:
    """One micro-batch ready for the model: ``inputs`` go to the model stage, ``targets`` to the
    loss terms (family-defined, e.g. the velocity target of the flow)."""

    inputs: Any
    targets: Any = None


@dataclass
class StageResult:
    """What ``ModelStep.forward`` returns for one micro-batch on one stage."""

    send: Optional[tuple[torch.Tensor, ...]]  # activations for the next pipeline stage (None on the last)
    terms: dict[str, LossTerm]


class ModelStep(Protocol):
    """The family's per-micro-batch work, built once per run for a recipe and a layout."""

    def unit_counts(self, batch) -> Mapping[str, int]:
        """Units of every objective in ``batch`` (host-side, before the forward)."""

    def flops(self, batch) -> float:
        """Training FLOPs of ``batch`` on the whole model replica (the family's FLOP model)."""

    def task_counts(self, batch) -> Mapping[str, int]:
        """Documents of each task in ``batch`` (for the mix and throughput figures)."""

    def prepare(self, batch, generator: torch.Generator) -> Prepared:
        """Device batch -> model inputs, with every random draw from ``generator``."""

    def forward(self, model: nn.Module, prepared: Prepared, received: Optional[tuple]) -> StageResult:
        """Run this rank's stage (``model``: the stage, or the engine wrapping it) on one micro-batch."""


@dataclass(frozen=True)
class TrainSpec:
    """A model family as the trainer sees it.

    - ``objectives``: names of the loss terms, in logging order; their weights come from
      ``loss_weights(recipe)``.
    - ``build_model(recipe, layout, log)``: this rank's stage with its starting weights (the
      recipe's ``init`` paths) and its trainable set applied.
    - ``load_full_state(model, state, layout)``: load a full (single-process-named) state dict
      into this rank's stage (``train.init_from``).
    - ``read_checkpoint_weights(root, tag, recipe)``: the full raw weights of one of our checkpoints
      in whatever layout it was saved.
    - ``full_tensor_names(model)``: {local name: full-model name} of the stage's tensors (how
      DeepSpeed names them in checkpoints, the same in every layout).
    - ``build_step(recipe, layout)``: the ``ModelStep``.
    - ``build_sample_grid(recipe, layout, step, log)``: an object with ``maybe_log(step, model, ema,
      monitor)`` (may do nothing).
    """

    name: str
    objectives: tuple[str, ...]
    loss_weights: Callable[[Recipe], dict[str, float]]
    build_model: Callable[[Recipe, ParallelLayout, Callable[[str], None]], nn.Module]
    load_full_state: Callable[[nn.Module, Mapping[str, torch.Tensor], ParallelLayout], None]
    read_checkpoint_weights: Callable[[Any, str, Recipe], dict[str, torch.Tensor]]
    full_tensor_names: Callable[[nn.Module], dict[str, str]]
    build_step: Callable[[Recipe, ParallelLayout], ModelStep]
    build_sample_grid: Callable[[Recipe, ParallelLayout, ModelStep, Callable[[str], None]], Any]
