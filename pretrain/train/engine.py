"""The one function that wraps the model in DeepSpeed (ZeRO, precision, clipping, accumulation)."""

from __future__ import annotations

import torch

from ..recipe import Recipe, WorldLayout
from ..runtime.mpu import MegatronMPU
from .schedule import constant_with_warmup


def deepspeed_config(recipe: Recipe, world: WorldLayout, load_universal: bool = False) -> dict:
    """DeepSpeed's JSON config from the recipe. bf16 only on GPUs: CPU runs stay in fp32."""
    bf16 = recipe.train.precision == "bf16" and torch.cuda.is_available()
    return {
        "train_batch_size": recipe.parallel.global_batch_size,
        "train_micro_batch_size_per_gpu": world.micro_batch_size,
        "gradient_accumulation_steps": world.grad_accum_steps,
        "gradient_clipping": recipe.optim.grad_clip,
        "zero_optimization": {"stage": recipe.parallel.zero_stage},
        "bf16": {"enabled": bf16},
        "steps_per_print": 10**9,  # our own monitor logs; keep DeepSpeed quiet
        "wall_clock_breakdown": False,
        "checkpoint": {"load_universal": load_universal},
        # Stages send whole activations: DeepSpeed's partitioning of them over the tensor-parallel
        # ranks assumes one activation that needs a gradient, and we send four.
        "pipeline": {"pipe_partitioned": False, "grad_partitioned": False},
    }


def build_engine(model: torch.nn.Module, recipe: Recipe, world: WorldLayout, load_universal: bool = False):
    """-> (engine, optimizer, lr_scheduler). AdamW over the trainable parameters only.

    With pipeline_parallel > 1 the model (this rank's stage) is wrapped in DeepSpeed's
    ``PipelineModule`` (``pretrain.train.pipeline``) and the engine is its pipeline engine, which
    brings its own process grid; otherwise megatron's groups reach DeepSpeed through ``MegatronMPU``.
    """
    import deepspeed

    from .pipeline import build_pipeline_module

    if recipe.parallel.zero_stage < 1:
        # A step with a NaN/Inf gradient is skipped by ZeRO's overflow check; stage 0 has none.
        raise ValueError("parallel.zero_stage: the trainer needs ZeRO stage 1 or more (it skips bad steps)")
    mpu = MegatronMPU()
    if world.pipeline_parallel > 1:
        model = build_pipeline_module(model, world.pipeline_parallel, world.tensor_parallel, world.data_parallel)
        mpu = None
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        trainable,
        lr=recipe.optim.lr,
        betas=tuple(recipe.optim.betas),
        weight_decay=recipe.optim.weight_decay,
        eps=1e-8,
    )
    warmup = recipe.optim.warmup_steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: constant_with_warmup(step, warmup))
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model,
        model_parameters=trainable,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        config=deepspeed_config(recipe, world, load_universal),
        mpu=mpu,
    )
    return engine, optimizer, scheduler
