"""Inference over pipeline stages: the whole model's forward when each rank holds one stage.

``PipelinedModel(stage, layout)`` offers what the samplers use of a whole ``JanusFlowModel`` (``cfg``, its
parameters and attention layers, ``forward(inputs) -> (None, outputs)``). Every rank of a pipeline
calls it with the same inputs: a stage receives the previous stage's activations (their shapes follow
from the inputs), runs its blocks and sends its own on; the last stage's velocity is then broadcast
to every stage, so all ranks run the same Euler loop and each can decode. The key/value cache
attaches to each stage's own attention layers as usual. Point-to-point sends follow the layout's
pipeline peers, so tensor-parallel ranks talk to their counterparts.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..model.janusflow import JanusFlowModel, ModelInputs, ModelOutputs, StageActivations
from ..runtime.layout import ParallelLayout


class PipelinedModel(nn.Module):
    def __init__(self, stage: JanusFlowModel, layout: ParallelLayout) -> None:
        super().__init__()
        self.stage = stage
        self.cfg = stage.cfg
        self.layout = layout

    def forward(self, inputs: ModelInputs) -> tuple[None, ModelOutputs]:
        stage = self.stage
        received = None if stage.pre_process else self._receive(inputs)
        activations, outputs = stage(inputs, received)
        if not stage.post_process:
            self._send(activations)
        outputs.velocity = self._share_velocity(outputs.velocity, inputs)
        return None, outputs

    # ---------------------------------------------------------------------------------------------
    def _shapes(self, inputs: ModelInputs) -> list[tuple[int, ...]]:
        """Shapes of the activations a stage hands the next for these inputs (hidden, skip, t_emb)."""
        g, hidden = self.cfg.gen_vision, self.cfg.llm.hidden_size
        shapes = [(len(inputs.input_ids), 1, hidden)]
        n_gen = _num_generation(inputs)
        if n_gen:
            side = g.latent_size // g.patch_size
            shapes += [(n_gen, g.channels, side, side), (n_gen, hidden)]
        return shapes

    def _dtype_device(self) -> tuple[torch.dtype, torch.device]:
        param = next(self.stage.parameters())
        return param.dtype, param.device

    def _receive(self, inputs: ModelInputs) -> StageActivations:
        dtype, device = self._dtype_device()
        tensors = [torch.empty(shape, dtype=dtype, device=device) for shape in self._shapes(inputs)]
        tensors = [self.layout.comm.recv(tensor, src=self.layout.prev_rank) for tensor in tensors]
        hidden, *gen = tensors
        return StageActivations(hidden, *gen) if gen else StageActivations(hidden)

    def _send(self, activations: StageActivations) -> None:
        dtype, _ = self._dtype_device()
        tensors = [activations.hidden]
        if activations.gen_skip is not None:
            tensors += [activations.gen_skip, activations.gen_t_emb]
        for tensor in tensors:
            self.layout.comm.send(tensor.detach().to(dtype), dst=self.layout.next_rank)

    def _share_velocity(self, velocity: Optional[torch.Tensor], inputs: ModelInputs) -> Optional[torch.Tensor]:
        """The last stage's velocity on every stage of the pipeline (None without generation rows)."""
        n_gen = _num_generation(inputs)
        if not n_gen:
            return velocity
        g = self.cfg.gen_vision
        if velocity is None:
            _, device = self._dtype_device()
            velocity = torch.empty((n_gen, g.latent_channels, g.latent_size, g.latent_size),
                                   dtype=torch.float32, device=device)
        velocity = velocity.float().contiguous()
        return self.layout.comm.broadcast(velocity, src=self.layout.last_stage_rank, group=self.layout.pp_group)


def _num_generation(inputs: ModelInputs) -> int:
    return 0 if inputs.gen_z_t is None else len(inputs.gen_z_t)
