"""Pipeline parallelism through DeepSpeed's pipeline engine, for any model family.

Each pipeline stage is this rank's model stage (the family builds it for the layout's pipeline
rank). DeepSpeed's ``PipelineModule`` holds one "layer" per stage, and its engine runs the 1F1B
schedule, the point-to-point sends, the ZeRO-1 gradient reduction and the optimizer step.

What travels between stages, as DeepSpeed moves tensors only: the family's activations
(``ModelStep.forward(...).send``) and, as one last one-element tensor, the loss contribution of the
terms that earlier stages own (e.g. JanusFlow's REPA term on the first stage), already weighted and
normalised by the global count; the last stage adds it to its own loss, and the backward brings its
gradient home the same way. The micro-batch's structure (token kinds, document boundaries, images,
random draws) is not sent: every stage of a pipeline reads the same data stream (same data-parallel
rank), prepares the same micro-batches with the same generators, and the trainer queues them on its
stage before ``train_batch``; the stage takes one per forward, as the engine runs forwards in
micro-batch order. The engine's own data iterator only yields placeholders.

Every floating-point activation must take part in the backward, or the engine has no gradient to send
back: the last stage touches every received activation with a zero.
"""

from __future__ import annotations

import itertools
from collections import deque
from typing import Optional, Sequence

import torch
from torch import nn

from ..runtime.layout import ParallelLayout
from .forward_backward import LossContext, micro_batch_loss
from .spec import ModelStep, Prepared


class PipelineStage(nn.Module):
    """One pipeline stage as DeepSpeed's pipeline engine sees it: tensors in, tensors out.

    ``model`` is this rank's model stage; its parameters are this module's ``model.*``. The last
    stage returns the micro-batch's loss (the scalar DeepSpeed backpropagates).
    """

    def __init__(self, model: nn.Module, step: ModelStep, layout: ParallelLayout) -> None:
        super().__init__()
        self.model = model
        self.step = step
        self.layout = layout
        self.pending: deque[Prepared] = deque()
        self.context: Optional[LossContext] = None
        self.logs: Optional[torch.Tensor] = None

    def queue_step(self, micro_batches: list[Prepared], context: LossContext) -> None:
        """Hand this stage the micro-batches of the next ``train_batch`` and their loss context."""
        if self.pending:
            raise RuntimeError(f"pipeline stage still holds {len(self.pending)} micro-batches of an earlier step")
        self.pending.extend(micro_batches)
        self.context = context
        self.logs = None

    def take_logs(self) -> torch.Tensor:
        """Per-objective values this stage computed during the last ``train_batch`` (summed over
        micro-batches; zero for objectives other stages own)."""
        logs = self.logs
        if logs is None:
            logs = torch.zeros(len(self.context.objectives), dtype=torch.float64, device=self.layout.device)
        self.logs = None
        return logs

    def _log(self, values: torch.Tensor) -> None:
        self.logs = values if self.logs is None else self.logs + values

    def forward(self, received):
        if not self.pending:
            raise RuntimeError("pipeline stage ran a forward with no prepared micro-batch: the engine's "
                               "gradient_accumulation_steps and the trainer's micro-batches disagree")
        micro = self.pending.popleft()
        own, carried = (None, None) if self.layout.is_first_stage else (tuple(received[:-1]), received[-1])
        result = self.step.forward(self.model, micro, own)

        if not self.layout.is_last_stage:
            contribution = carried
            if result.terms:
                loss, values = micro_batch_loss(result.terms, self.context)
                self._log(values)
                contribution = loss.reshape(1) if contribution is None else contribution + loss.reshape(1)
            if contribution is None:  # zero that depends on the graph
                contribution = result.send[0].reshape(-1)[:1].sum().reshape(1) * 0.0
            # DeepSpeed's p2p moves contiguous tensors only; a family's activations may come in
            # another layout (JanusFlow's generation features are channels-last on the CPU).
            outputs = tuple(t.contiguous() for t in result.send) + (contribution,)
            for tensor in outputs:
                if tensor.is_floating_point() and not tensor.requires_grad:
                    tensor.requires_grad_(True)  # e.g. a fully frozen stage: a leaf the backward accepts
            return outputs

        loss, values = micro_batch_loss(result.terms, self.context)
        self._log(values)
        # Activations this micro-batch did not use (empty skips, say) still get an (empty or zero)
        # gradient to send back, like every other activation.
        untouched = sum(t.sum() for t in own if t.is_floating_point()) * 0.0
        return loss + carried.sum() + untouched


def placeholder_batches():
    """The engine's data iterator: the first and last stages each pull one item per micro-batch; the
    real micro-batches reach the stages through ``PipelineStage.queue_step``."""
    return itertools.repeat((torch.zeros(1), torch.zeros(1)))


def check_topology_matches_layout(grid, layout: ParallelLayout) -> None:
    """DeepSpeed's grid and our layout must put every rank at the same (pipeline, data, tensor)
    coordinates, or stages would exchange activations with the wrong peers."""
    ours = (layout.pp_rank, layout.dp_rank, layout.tp_rank)
    theirs = (grid.get_stage_id(), grid.get_data_parallel_id(), grid.get_slice_parallel_rank())
    if ours != theirs:
        raise RuntimeError(f"rank {grid.get_global_rank()}: our layout (pp, dp, tp) = {ours} but DeepSpeed's "
                           f"pipeline grid says {theirs}")


def build_pipeline_module(model: nn.Module, step: ModelStep, layout: ParallelLayout):
    """DeepSpeed's ``PipelineModule`` with this rank's stage as its one local layer."""
    from deepspeed.pipe import PipelineModule
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    stage = layout.pp_rank
    # One layer per stage, partitioned uniformly: only this rank's entry is ever built or run; the
    # others are never touched on this rank.
    layers = [PipelineStage(model, step, layout) if s == stage else nn.Identity() for s in range(layout.pp_size)]
    topology = PipeModelDataParallelTopology(num_pp=layout.pp_size, num_mp=layout.tp_size, num_dp=layout.dp_size)
    module = PipelineModule(layers=layers, topology=topology, partition_method="uniform", dynamic_shape=True)
    check_topology_matches_layout(module._grid, layout)
    if module._local_start != stage or module._local_stop != stage + 1:
        raise RuntimeError(f"DeepSpeed gave pipeline stage {stage} layers [{module._local_start}, {module._local_stop})")
    return module


def local_stage(pipeline_module) -> PipelineStage:
    (stage,) = [m for m in pipeline_module.forward_funcs if isinstance(m, PipelineStage)]
    return stage


class PipelineForwardBackward:
    """The step's micro-batches through DeepSpeed's pipeline engine. Every stage of a pipeline
    prepared the same micro-batches (same data stream, same draws) and queues them on its stage."""

    def __init__(self, engine) -> None:
        self.engine, self.stage = engine, local_stage(engine.module)

    def run(self, prepared: Sequence[Prepared], ctx: LossContext) -> torch.Tensor:
        self.stage.queue_step(list(prepared), ctx)
        self.engine.train_batch(data_iter=placeholder_batches())
        return self.stage.take_logs()
