"""The smoke job: a few optimizer steps of the recipe's model on synthetic packed batches.

Exercises the whole model path (megatron-core LLM, SigLIP, generation encoder/decoder, REPA) and the
three objectives with their global-count normalisation, on any world size with TP x PP = 1. It is
replaced by the DeepSpeed trainer as the main job; it stays useful as a quick health check.
"""

from __future__ import annotations

import time

import torch

from .data.format import Task
from .losses import combine_losses
from .model.janusflow import JanusFlowModel
from .recipe import Recipe
from .runtime.distributed import init_runtime, shutdown_runtime
from .step import batch_unit_counts, prepare_model_inputs, stage_loss_terms
from .synthetic import make_synthetic_batch


def run_smoke(recipe: Recipe, steps: int | None = None, fixed_batches: int = 2) -> list[float]:
    """Train on ``fixed_batches`` synthetic micro-batches in turn; returns the loss of each step."""
    layout = recipe.parallel
    if layout.tensor_parallel * layout.pipeline_parallel != 1:
        raise SystemExit("the smoke job runs TP=PP=1; tensor/pipeline parallel training comes with the trainer")
    runtime = init_runtime(seed=recipe.train.seed)
    steps = steps or min(recipe.optim.steps, 10)
    model = JanusFlowModel(recipe.model)
    model.set_trainable(recipe.train.trainable)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        params, lr=recipe.optim.lr, betas=tuple(recipe.optim.betas), weight_decay=recipe.optim.weight_decay
    )
    data_gen = torch.Generator().manual_seed(recipe.data.seed + runtime.dp_rank)
    mix = [Task.UNDERSTANDING, Task.GENERATION, Task.TEXT, Task.GENERATION]
    batches = [make_synthetic_batch(recipe.model, mix, data_gen) for _ in range(fixed_batches)]
    weights = {"ar": recipe.loss.ar_weight, "rf": recipe.loss.rf_weight, "repa": recipe.loss.repa_weight}
    n_params = sum(p.numel() for p in model.parameters())
    if runtime.rank == 0:
        print(f"[smoke] model {n_params/1e6:.2f}M parameters, {len(params)} trainable tensors, world {runtime.world_size}")
    losses = []
    for step in range(steps):
        started = time.perf_counter()
        batch = batches[step % fixed_batches]
        noise_gen = torch.Generator().manual_seed(recipe.train.seed * 1_000_003 + step)
        inputs, target = prepare_model_inputs(batch, batch.gen_latents, recipe.data.prompt_drop_prob, noise_gen)
        _, outputs = model(inputs)
        terms = stage_loss_terms(outputs, target)
        counts = batch_unit_counts(batch)
        counts_t = torch.tensor([counts[k] for k in ("ar", "rf", "repa")], dtype=torch.float64)
        torch.distributed.all_reduce(counts_t)
        global_counts = dict(zip(("ar", "rf", "repa"), counts_t.tolist()))
        # Each rank contributes sum/global_count; summing gradients over ranks gives the global mean.
        loss, logs = combine_losses(terms, weights, global_counts)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        for p in params:
            if p.grad is not None and runtime.world_size > 1:
                torch.distributed.all_reduce(p.grad)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, recipe.optim.grad_clip)
        optimizer.step()
        total = loss.detach().clone()
        torch.distributed.all_reduce(total)
        losses.append(float(total))
        if runtime.rank == 0:
            parts = " ".join(f"{k}={float(v):.4f}" for k, v in sorted(logs.items()))
            print(
                f"[smoke] step {step + 1}/{steps} loss={float(total):.4f} ({parts}, this rank) "
                f"grad_norm={float(grad_norm):.3f} {time.perf_counter() - started:.2f}s",
                flush=True,
            )
    shutdown_runtime()
    return losses
