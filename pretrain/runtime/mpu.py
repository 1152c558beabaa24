"""The parallel layout in the shape DeepSpeed expects as ``mpu``.

DeepSpeed calls "model parallel" what megatron calls tensor parallel: it reduces gradient norms
over that group (counting each tensor-parallel shard once, replicated tensors once) and keeps ZeRO
partitions inside the data-parallel group. Pipeline stages are DeepSpeed's own business when its
pipeline engine is used, so they are exposed here only for completeness.
"""

from __future__ import annotations

from .layout import ParallelLayout


class MegatronMPU:
    """Adapter passed as ``deepspeed.initialize(..., mpu=MegatronMPU(layout))``."""

    def __init__(self, layout: ParallelLayout) -> None:
        self.layout = layout

    # tensor parallel == DeepSpeed's "model parallel"
    def get_model_parallel_rank(self) -> int:
        return self.layout.tp_rank

    def get_model_parallel_world_size(self) -> int:
        return self.layout.tp_size

    def get_model_parallel_group(self):
        return self.layout.tp_group

    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_group = get_model_parallel_group

    def get_tensor_model_parallel_src_rank(self) -> int:
        # The global rank of tensor-parallel rank 0 of this rank's group.
        import torch.distributed as dist

        return dist.get_global_rank(self.layout.tp_group, 0) if self.layout.tp_group is not None else 0

    # data parallel
    def get_data_parallel_rank(self) -> int:
        return self.layout.dp_rank

    def get_data_parallel_world_size(self) -> int:
        return self.layout.dp_size

    def get_data_parallel_group(self):
        return self.layout.dp_group

    # pipeline parallel
    def get_pipeline_model_parallel_rank(self) -> int:
        return self.layout.pp_rank

    def get_pipeline_model_parallel_world_size(self) -> int:
        return self.layout.pp_size

    def get_pipeline_model_parallel_group(self):
        return self.layout.pp_group

    get_pipe_parallel_rank = get_pipeline_model_parallel_rank
    get_pipe_parallel_world_size = get_pipeline_model_parallel_world_size
    get_pipe_parallel_group = get_pipeline_model_parallel_group

    # no sequence parallelism across ranks (megatron's sequence_parallel is off)
    def get_sequence_parallel_world_size(self) -> int:
        return 1

    def get_sequence_parallel_rank(self) -> int:
        return 0


def megatron_process_groups(layout: ParallelLayout):
    """The layout's groups as megatron-core's ``ProcessGroupCollection`` (tensor, pipeline and context
    parallel: what its transformer blocks, embedding and output layer take), so megatron is handed
    its groups instead of reading its global state. None for a layout without groups
    (``ParallelLayout.single()``): megatron then uses its own defaults."""
    if layout.tp_group is None or layout.pp_group is None or layout.cp_group is None:
        return None
    from megatron.core.process_groups_config import ProcessGroupCollection

    return ProcessGroupCollection(tp=layout.tp_group, pp=layout.pp_group, cp=layout.cp_group)
