"""The parallel layout of this process: its place in every process group, and the groups themselves.

One object, built once by ``pretrain.runtime.distributed.init_runtime`` from megatron-core's
process groups and passed down to whatever needs it (the trainer, converters, samplers, checkpoint
code). Nothing outside ``pretrain.runtime`` and the LLM adapter (``pretrain.model.llm``) reads
megatron-core's global ``parallel_state``: a test enforces it.

Ranks are within each group (``tp_rank`` within the tensor-parallel group, ...); ``rank`` and the
pipeline peers (``prev_rank``, ``next_rank``, ``last_stage_rank``) are global ranks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from .comm import Collectives


@dataclass(frozen=True)
class ParallelLayout:
    rank: int
    world_size: int
    tp_rank: int
    tp_size: int
    pp_rank: int
    pp_size: int
    dp_rank: int
    dp_size: int
    device: torch.device
    tp_group: Any = field(default=None, repr=False, compare=False)
    pp_group: Any = field(default=None, repr=False, compare=False)
    dp_group: Any = field(default=None, repr=False, compare=False)
    cp_group: Any = field(default=None, repr=False, compare=False)  # context parallel: size 1 here; megatron asks
    prev_rank: Optional[int] = None  # global rank of the previous pipeline stage (None on the first)
    next_rank: Optional[int] = None  # global rank of the next pipeline stage (None on the last)
    last_stage_rank: int = 0  # global rank of this pipeline's last stage
    comm: Collectives = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.comm is None:
            object.__setattr__(self, "comm", Collectives(self.device))
        if self.tp_size * self.pp_size * self.dp_size != self.world_size:
            raise ValueError(f"parallel layout: tp {self.tp_size} x pp {self.pp_size} x dp {self.dp_size} "
                             f"!= world size {self.world_size}")

    @classmethod
    def single(cls, device: torch.device | str = "cpu") -> "ParallelLayout":
        """A world of one: what unit tests and single-process tools use (no process group needed)."""
        return cls(rank=0, world_size=1, tp_rank=0, tp_size=1, pp_rank=0, pp_size=1, dp_rank=0, dp_size=1,
                   device=torch.device(device))

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    @property
    def is_main(self) -> bool:
        """Rank 0 of the world: the one that logs and writes run-level files."""
        return self.rank == 0
