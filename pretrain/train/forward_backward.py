"""One optimizer step's forward and backward passes, behind one interface with two implementations.

``PlainForwardBackward`` (here): every micro-batch through the DeepSpeed engine on this rank (data
and tensor parallelism). ``PipelineForwardBackward`` (``pretrain.train.pipeline``): the micro-batches
through DeepSpeed's pipeline engine (1F1B schedule over the stages). Both take the step's prepared
micro-batches and a ``LossContext`` and return this rank's per-objective loss values summed over
its micro-batches, as one device tensor (nothing is read back to the host here).

Losses are combined in one place, ``micro_batch_loss``: ``sum_k weight_k * total_k / global_count_k``
per micro-batch (``pretrain.losses.combine_losses``), scaled by ``grad_scale = dp x accumulation`` to
undo DeepSpeed's averaging, so the update is the gradient of the global-batch mean exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

from ..losses import LossTerm, combine_losses
from .spec import ModelStep, Prepared


@dataclass
class LossContext:
    """What every micro-batch loss of one optimizer step is normalised with."""

    objectives: tuple[str, ...]
    weights: dict[str, float]
    global_counts: dict[str, float]  # units of each objective in the whole step, all DP ranks
    grad_scale: float


def micro_batch_loss(terms: Mapping[str, LossTerm], ctx: LossContext) -> tuple[torch.Tensor, torch.Tensor]:
    """(the scalar to backpropagate, the per-objective values to log [len(objectives)]).

    The logged value of objective k is ``total_k / global_count_k`` (unweighted): summed over the
    step's micro-batches and data-parallel ranks it is the global-batch mean of objective k.
    """
    loss, parts = combine_losses(terms, ctx.weights, ctx.global_counts, ctx.grad_scale)
    # float64: the logged sums run over many micro-batches and ranks (a few elements, on the device).
    zero = loss.detach().new_zeros((), dtype=torch.float64)
    logged = torch.stack([parts[k].double() if k in parts else zero for k in ctx.objectives])
    return loss, logged


class PlainForwardBackward:
    """Forward, backward and (at the accumulation boundary) the update of every micro-batch."""

    def __init__(self, engine, step: ModelStep) -> None:
        self.engine, self.step = engine, step

    def run(self, prepared: Sequence[Prepared], ctx: LossContext) -> torch.Tensor:
        logged = None
        for micro in prepared:
            result = self.step.forward(self.engine, micro, None)
            loss, values = micro_batch_loss(result.terms, ctx)
            self.engine.backward(loss)
            # DeepSpeed counts micro-steps: the update happens at the accumulation boundary.
            self.engine.step()
            logged = values if logged is None else logged + values
        return logged
