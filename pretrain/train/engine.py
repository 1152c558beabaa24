"""The one function that wraps the model in DeepSpeed (ZeRO, precision, clipping, accumulation).

Precision, deliberately (``train.precision: bf16``):
- The model is built in fp32 (megatron-core's ``params_dtype``) and DeepSpeed casts it to bf16 at
  initialisation, keeping fp32 master weights in the optimizer. Building in bf16 directly would give
  the same bf16 weights (the masters are made from them either way); megatron-core's own ``bf16``
  flag only selects fused kernels and its pipeline dtype, neither of which is used here.
- Gradients accumulate over micro-steps in fp32 (``data_types.grad_accum_dtype``), not in bf16: with
  tens of micro-steps per step a bf16 accumulator loses the small contributions. With ZeRO-1 this is
  DeepSpeed's BF16 optimizer (fp32 gradient buffers per partition); with ZeRO-2, its ZeRO optimizer
  reduces into fp32 partitions.
- A step whose gradient norm is not finite is skipped and counted (the trainer asks
  ``engine.was_step_applied()``); the trainer additionally checks the updated weights are finite.
- The EMA averages the fp32 master weights, not the bf16 copies (``pretrain.train.ema``).
The CPU recipes train in fp32; ``train.precision: bf16`` on the CPU runs the same bf16 path (slowly),
which is how the CPU tests check it (``tests/train/test_trainer_in_process.py``).

Communication: on GPUs ZeRO's gradient reduction overlaps the backward (``overlap_comm``) in buckets of
``REDUCE_BUCKET`` elements (large enough for full-bandwidth NCCL messages, small enough that the
first bucket leaves early in the backward); ``contiguous_gradients`` avoids fragmentation.
"""

from __future__ import annotations

import torch

from ..recipe import Recipe, WorldLayout
from ..runtime.layout import ParallelLayout
from ..runtime.mpu import MegatronMPU
from .schedule import lr_multiplier

# 5e8 elements is DeepSpeed's own default; 2e8 starts the first reduction earlier in the backward
# of a 1.3B model (24 blocks of ~51M parameters: about four blocks per bucket).
REDUCE_BUCKET = 200_000_000


def uses_bf16(recipe: Recipe) -> bool:
    """Whether this run trains in bf16 (``train.precision``; on the CPU too, where it is slow but
    runs the same DeepSpeed path, which is how the CPU tests cover it)."""
    return recipe.train.precision == "bf16"


def deepspeed_config(recipe: Recipe, world: WorldLayout, load_universal: bool = False) -> dict:
    """DeepSpeed's JSON config from the recipe (see the module docstring for the choices)."""
    bf16 = uses_bf16(recipe)
    zero = {"stage": recipe.parallel.zero_stage}
    if recipe.parallel.zero_stage >= 1 and recipe.parallel.pipeline_parallel == 1:
        # Overlap only where DeepSpeed's side streams are real (CUDA): on the CPU accelerator the
        # overlapped reduction gave wrong gradients with 2 ranks (gradient norm 3.5% off one rank with
        # twice the accumulation; exact without overlap: tests/train/test_data_parallel_equivalence.py).
        zero.update(overlap_comm=torch.cuda.is_available(), contiguous_gradients=True,
                    reduce_bucket_size=REDUCE_BUCKET, allgather_bucket_size=REDUCE_BUCKET)
    return {
        "train_batch_size": recipe.parallel.global_batch_size,
        "train_micro_batch_size_per_gpu": world.micro_batch_size,
        "gradient_accumulation_steps": world.grad_accum_steps,
        "gradient_clipping": recipe.optim.grad_clip,
        "zero_optimization": zero,
        # immediate_grad_update: each bf16 gradient is added to its fp32 buffer as soon as it is made
        # and released. Without it DeepSpeed 0.19.8 adds the bf16 .grad to the fp32 buffer after every
        # micro-step without clearing it, so with accumulation the first micro-batches count several
        # times (measured: gradient norm 8.0 instead of 5.07 at 2 micro-steps; the test compares).
        "bf16": {"enabled": bf16, "immediate_grad_update": True} if bf16 else {"enabled": False},
        "data_types": {"grad_accum_dtype": "fp32" if bf16 else None},
        "steps_per_print": 10**9,  # our own monitor logs; keep DeepSpeed quiet
        "wall_clock_breakdown": False,
        "checkpoint": {"load_universal": load_universal},
        # Stages send whole activations: DeepSpeed's partitioning of them over the tensor-parallel
        # ranks assumes one activation that needs a gradient, and we send four.
        "pipeline": {"pipe_partitioned": False, "grad_partitioned": False},
    }


def build_engine(model: torch.nn.Module, recipe: Recipe, world: WorldLayout, layout: ParallelLayout,
                 step, full_names: dict[str, str], load_universal: bool = False):
    """-> (engine, optimizer, lr_scheduler). AdamW over the trainable parameters only.

    ``model`` is this rank's stage, ``step`` the family's ``ModelStep`` and ``full_names`` its
    {local: full-model} tensor names. With pipeline_parallel > 1 the stage is wrapped in DeepSpeed's
    ``PipelineModule`` (``pretrain.train.pipeline``) and the engine is its pipeline engine, which
    brings its own process grid (checked against ``layout``); otherwise the layout's groups reach
    DeepSpeed through ``MegatronMPU``.
    """
    import deepspeed

    from .pipeline import build_pipeline_module

    if recipe.parallel.zero_stage < 1:
        # A step with a NaN/Inf gradient is skipped by ZeRO's overflow check; stage 0 has none.
        raise ValueError("parallel.zero_stage: the trainer needs ZeRO stage 1 or more (it skips bad steps)")
    mpu = MegatronMPU(layout)
    stage = model
    if world.pipeline_parallel > 1:
        model = build_pipeline_module(model, step, layout)
        mpu = None
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        trainable,
        lr=recipe.optim.lr,
        betas=tuple(recipe.optim.betas),
        weight_decay=recipe.optim.weight_decay,
        eps=1e-8,
    )
    optim = recipe.optim
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_multiplier(step, optim.warmup_steps, optim.steps, optim.decay_steps))
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model,
        model_parameters=trainable,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        config=deepspeed_config(recipe, world, load_universal),
        mpu=mpu,
    )
    use_full_model_names(engine, stage, full_names)
    return engine, optimizer, scheduler


def use_full_model_names(engine, stage: torch.nn.Module, full: dict[str, str]) -> None:
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
