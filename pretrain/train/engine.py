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
    stage = model
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
    use_full_model_names(engine, stage)
    return engine, optimizer, scheduler


def use_full_model_names(engine, stage: torch.nn.Module) -> None:
    """Name every parameter in DeepSpeed's checkpoints by its full-state name.

    DeepSpeed records ZeRO fragments under ``engine.param_names`` (built from the wrapped module's
    ``named_parameters()``), and a universal checkpoint stores each parameter in a folder of that name,
    which the loading run looks up by its own names. The pipeline engine's names carry the stage
    (``"1.model.llm.decoder.layers.0..."``: wrapper index, stage-local block), so they would differ
    between pipeline layouts; the full-state names (``llm.decoder.layers.2...``) are the same in
    every layout. Without pipeline parallelism they already are the full-state names (a no-op).

    Renamed in place right after ``deepspeed.initialize``: the ZeRO optimizer shares the dict, and
    the one thing it derived from the names at construction, the fragment map it saves
    (``_param_slice_mappings``), is rebuilt.
    """
    from ..convert.state import full_tensor_names

    full = full_tensor_names(stage)
    names = {param: full[name] for name, param in stage.named_parameters()}
    unknown = [name for param, name in engine.param_names.items() if param not in names]
    if unknown:
        raise RuntimeError(f"DeepSpeed's engine holds parameters outside this rank's model stage: {unknown[:5]}")
    if len(set(names.values())) != len(names):
        raise RuntimeError("two parameters of this rank's model stage share a full-state name")
    engine.param_names.update(names)
    optimizer = engine.optimizer
    if getattr(optimizer, "param_names", engine.param_names) is not engine.param_names:
        optimizer.param_names.update(names)
    if hasattr(optimizer, "_param_slice_mappings"):
        optimizer._param_slice_mappings = optimizer._create_param_mapping()
