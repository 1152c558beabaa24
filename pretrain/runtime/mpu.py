"""megatron-core's process groups in the shape DeepSpeed expects as ``mpu``.

DeepSpeed calls "model parallel" what megatron calls tensor parallel: it reduces gradient norms
over that group (counting each tensor-parallel shard once, replicated tensors once) and keeps ZeRO
partitions inside the data-parallel group. Pipeline stages are DeepSpeed's own business when its
pipeline engine is used, so they are exposed here only for completeness.
"""

from __future__ import annotations

from megatron.core import parallel_state as ps


class MegatronMPU:
    """Adapter passed as ``deepspeed.initialize(..., mpu=MegatronMPU())``."""

    # tensor parallel == DeepSpeed's "model parallel"
    def get_model_parallel_rank(self) -> int:
        return ps.get_tensor_model_parallel_rank()

    def get_model_parallel_world_size(self) -> int:
        return ps.get_tensor_model_parallel_world_size()

    def get_model_parallel_group(self):
        return ps.get_tensor_model_parallel_group()

    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_group = get_model_parallel_group

    def get_tensor_model_parallel_src_rank(self) -> int:
        return ps.get_tensor_model_parallel_src_rank()

    # data parallel
    def get_data_parallel_rank(self) -> int:
        return ps.get_data_parallel_rank()

    def get_data_parallel_world_size(self) -> int:
        return ps.get_data_parallel_world_size()

    def get_data_parallel_group(self):
        return ps.get_data_parallel_group()

    # pipeline parallel
    def get_pipeline_model_parallel_rank(self) -> int:
        return ps.get_pipeline_model_parallel_rank()

    def get_pipeline_model_parallel_world_size(self) -> int:
        return ps.get_pipeline_model_parallel_world_size()

    def get_pipeline_model_parallel_group(self):
        return ps.get_pipeline_model_parallel_group()

    get_pipe_parallel_rank = get_pipeline_model_parallel_rank
    get_pipe_parallel_world_size = get_pipeline_model_parallel_world_size
    get_pipe_parallel_group = get_pipeline_model_parallel_group

    # no sequence parallelism across ranks (megatron's sequence_parallel is off)
    def get_sequence_parallel_world_size(self) -> int:
        return 1

    def get_sequence_parallel_rank(self) -> int:
        return 0
