"""Pipeline parallelism through DeepSpeed's pipeline engine.

Each pipeline stage is one ``JanusFlowModel`` stage (megatron-core places the transformer blocks by
pipeline rank). DeepSpeed's ``PipelineModule`` holds one "layer" per stage, and its engine runs the
1F1B schedule, the point-to-point sends, the ZeRO-1 gradient reduction and the optimizer step.

What travels between stages, as DeepSpeed moves tensors only: the LLM hidden states, the generation
encoder's long skip and time embedding (the decoder on the last stage needs them), and REPA's loss
contribution. The micro-batch's structure (token kinds, document boundaries, images, the flow's
draws) is not sent: every stage of a pipeline reads the same data stream (same data-parallel rank),
prepares the same micro-batches with the same generators, and the trainer queues them on its stage
before ``train_batch``; the stage takes one per forward, as the engine runs forwards in micro-batch
order. The engine's own data iterator only yields placeholders.

REPA lives on the first stage (block ``repa.layer`` must be there, next to SigLIP). Its contribution,
already weighted and normalised by the global count, rides to the last stage as a one-element
activation and is added to the loss there; the backward brings its gradient home the same way.

Every floating-point activation must take part in the backward, or the engine has no gradient to send
back: for a micro-batch without generation samples the first stage sends empty views of the hidden
states as skip and time embedding, middle stages pass them on, and the last stage touches them with
a zero.
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from ..losses import combine_losses
from ..model.janusflow import JanusFlowModel, ModelInputs, StageActivations
from ..step import stage_loss_terms


@dataclass
class LossContext:
    """What the loss of every micro-batch of one optimizer step is normalised with (see
    ``pretrain.losses.combine_losses``)."""

    weights: dict[str, float]
    global_counts: dict[str, float]
    grad_scale: float


@dataclass
class PreparedMicroBatch:
    inputs: ModelInputs
    velocity_target: Optional[torch.Tensor]


@dataclass
class StageLogs:
    """Per-objective values this stage computed during one ``train_batch`` (summed over micro-batches)."""

    totals: dict[str, float] = field(default_factory=dict)

    def add(self, parts: dict[str, torch.Tensor]) -> None:
        for key, value in parts.items():
            self.totals[key] = self.totals.get(key, 0.0) + float(value)


class PipelineStage(nn.Module):
    """One pipeline stage as DeepSpeed's pipeline engine sees it: tensors in, tensors out.

    ``model`` is this rank's ``JanusFlowModel`` stage; its parameters are this module's ``model.*``.
    Activations are the tuple ``(hidden [T,1,H], gen_skip [N,C,s,s], gen_t_emb [N,H], repa [1])``;
    the last stage returns the micro-batch's loss (the scalar DeepSpeed backpropagates).
    """

    def __init__(self, model: JanusFlowModel) -> None:
        super().__init__()
        self.model = model
        self.pending: deque[PreparedMicroBatch] = deque()
        self.context: Optional[LossContext] = None
        self.logs = StageLogs()

    def queue_step(self, micro_batches: list[PreparedMicroBatch], context: LossContext) -> None:
        """Hand this stage the micro-batches of the next ``train_batch`` and their loss context."""
        if self.pending:
            raise RuntimeError(f"pipeline stage still holds {len(self.pending)} micro-batches of an earlier step")
        self.pending.extend(micro_batches)
        self.context = context
        self.logs = StageLogs()

    def forward(self, received):
        if not self.pending:
            raise RuntimeError("pipeline stage ran a forward with no prepared micro-batch: the engine's "
                               "gradient_accumulation_steps and the trainer's micro-batches disagree")
        micro = self.pending.popleft()
        model = self.model
        if model.pre_process:
            stage_input = carried_repa = gen_skip = gen_t_emb = None
        else:
            hidden, gen_skip, gen_t_emb, carried_repa = received
            n_gen = 0 if micro.inputs.gen_z_t is None else len(micro.inputs.gen_z_t)
            stage_input = StageActivations(hidden, gen_skip if n_gen else None, gen_t_emb if n_gen else None)
        activations, outputs = model(micro.inputs, stage_input)
        terms = stage_loss_terms(outputs, micro.velocity_target)

        if model.pre_process:
            return _first_stage_outputs(activations, self._repa_contribution(terms, activations.hidden), model)
        if not model.post_process:
            # A middle stage: skip, time embedding and REPA's term pass through as received (empty or
            # not), so the backward hands their gradients straight back.
            return activations.hidden, gen_skip, gen_t_emb, carried_repa

        loss, parts = combine_losses(terms, self.context.weights, self.context.global_counts, self.context.grad_scale)
        self.logs.add(parts)
        # The skip and time embedding of a micro-batch without generation samples are empty; touching
        # them gives them an (empty) gradient to send back like every other activation.
        return loss + carried_repa.sum() + (gen_skip.sum() + gen_t_emb.sum()) * 0.0

    def _repa_contribution(self, terms: dict, hidden: torch.Tensor) -> torch.Tensor:
        # Zero that depends on the graph when this micro-batch has no REPA units (or REPA is off).
        contribution = hidden.reshape(-1)[:1].sum() * 0.0
        if "repa" in terms:
            loss, parts = combine_losses({"repa": terms["repa"]}, self.context.weights,
                                         self.context.global_counts, self.context.grad_scale)
            self.logs.add(parts)
            contribution = contribution + loss
        return contribution.reshape(1)


def _first_stage_outputs(activations: StageActivations, carried_repa: torch.Tensor, model: JanusFlowModel) -> tuple:
    hidden = activations.hidden
    g = model.cfg.gen_vision
    if activations.gen_skip is None:
        # Empty views of the hidden states: part of the graph, so the backward accepts their gradients.
        side = g.latent_size // g.patch_size
        empty = hidden.reshape(-1)[:0]
        gen_skip, gen_t_emb = empty.reshape(0, g.channels, side, side), empty.reshape(0, hidden.shape[-1])
    else:
        gen_skip, gen_t_emb = activations.gen_skip, activations.gen_t_emb
    outputs = (hidden, gen_skip, gen_t_emb, carried_repa)
    for tensor in outputs:
        if not tensor.requires_grad:  # e.g. a fully frozen stage: still a leaf the backward accepts
            tensor.requires_grad_(True)
    return outputs


def placeholder_batches():
    """The engine's data iterator: the first and last stages each pull one item per micro-batch; the
    real micro-batches reach the stages through ``PipelineStage.queue_step``."""
    return itertools.repeat((torch.zeros(1), torch.zeros(1)))


def check_topology_matches_megatron(grid) -> None:
    """DeepSpeed's grid and megatron-core's process groups must put every rank at the same (pipeline,
    data, tensor) coordinates, or stages would exchange activations with the wrong peers."""
    from megatron.core import parallel_state as ps

    ours = (ps.get_pipeline_model_parallel_rank(), ps.get_data_parallel_rank(), ps.get_tensor_model_parallel_rank())
    theirs = (grid.get_stage_id(), grid.get_data_parallel_id(), grid.get_slice_parallel_rank())
    if ours != theirs:
        raise RuntimeError(f"rank {grid.get_global_rank()}: megatron (pp, dp, tp) = {ours} but DeepSpeed's "
                           f"pipeline grid says {theirs}")


def build_pipeline_module(model: JanusFlowModel, pipeline_parallel: int, tensor_parallel: int, data_parallel: int):
    """DeepSpeed's ``PipelineModule`` with this rank's stage as its one local layer."""
    from deepspeed.pipe import PipelineModule
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology
    from megatron.core import parallel_state as ps

    stage = ps.get_pipeline_model_parallel_rank()
    # One layer per stage, partitioned uniformly: only this rank's entry is ever built or run; the
    # others are never touched on this rank.
    layers = [PipelineStage(model) if s == stage else nn.Identity() for s in range(pipeline_parallel)]
    topology = PipeModelDataParallelTopology(num_pp=pipeline_parallel, num_mp=tensor_parallel, num_dp=data_parallel)
    module = PipelineModule(layers=layers, topology=topology, partition_method="uniform", dynamic_shape=True)
    check_topology_matches_megatron(module._grid)
    if module._local_start != stage or module._local_stop != stage + 1:
        raise RuntimeError(f"DeepSpeed gave pipeline stage {stage} layers [{module._local_start}, {module._local_stop})")
    return module


def local_stage(pipeline_module) -> PipelineStage:
    (stage,) = [m for m in pipeline_module.forward_funcs if isinstance(m, PipelineStage)]
    return stage
