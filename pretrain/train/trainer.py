"""The DeepSpeed training loop over a recipe: accumulation, EMA, checkpoints, monitoring, signals.

One optimizer step = ``grad_accum_steps`` micro-batches on each data-parallel rank. The loss of a
micro-batch is ``sum / global count`` per objective (pretrain.losses): the counts of the whole step
on all DP ranks are all-reduced before the first forward, and ``grad_scale = dp x accumulation``
undoes DeepSpeed's averaging, so the update is the gradient of the global-batch mean exactly,
whatever the mix of each micro-batch.

With pipeline_parallel > 1 the same micro-batches go through DeepSpeed's pipeline engine
(``pretrain.train.pipeline``): every stage of a pipeline prepares them (same data stream, same draws)
and queues them on its stage before ``train_batch``. Each stage computes the latents of the
generation images itself; with an on-the-fly SDXL-VAE that is repeated work on every stage, so
pipeline runs should read shards built with precomputed latents (``data_tools build --vae``).
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

import torch

from kernels.dispatch import set_kernel_backend

from ..data.format import Task
from ..losses import combine_losses
from ..model.janusflow import JanusFlowModel
from ..model.latent_codec import build_latent_codec
from ..plan import GPUS, Gradients, MatmulSizes, SequenceShape, sequence_flops
from ..recipe import Recipe, dump_recipe
from ..runtime.distributed import init_runtime, shutdown_runtime
from ..step import batch_unit_counts, prepare_model_inputs, stage_loss_terms
from ..convert.state import load_model_state
from .checkpoint import checkpoint_weights, latest_tag, load_checkpoint, resolve_checkpoint, save_checkpoint
from .ema import EMA
from .image_grid import SampleGrid
from .init_weights import load_initial_weights
from .engine import build_engine
from .monitor import NullMonitor, TensorBoardMonitor
from .pipeline import LossContext, PreparedMicroBatch, local_stage, placeholder_batches
from .sources import build_source

OBJECTIVES = ("ar", "rf", "repa")


class StopRequested:
    """SIGTERM / SIGUSR1 (SLURM's pre-emption warning) ask for a checkpoint and a clean exit."""

    def __init__(self) -> None:
        self.flag = False
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, _frame) -> None:
        self.flag = True

    def agreed(self) -> bool:
        """True on every rank when any rank was signalled (all must save together)."""
        flag = torch.tensor([float(self.flag)])
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item())


def _noise_generator(seed: int, step: int, micro: int, dp_rank: int) -> torch.Generator:
    # The flow draws of a micro-batch depend only on where it sits in training, so a resumed run
    # draws exactly what the uninterrupted one would have.
    return torch.Generator().manual_seed(((seed * 1_000_003 + step) * 1009 + micro) * 9973 + dp_rank)


def _device_peak_flops() -> float | None:
    """Dense bf16 peak of this GPU from the planner's table (None on CPU or an unknown GPU)."""
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name().upper()
    for key, spec in GPUS.items():
        if key.upper() in name:
            return spec.peak_bf16_flops
    return None


def _peak_memory_gb() -> float:
    """Peak GPU memory allocated by this process, or its peak resident memory on CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


class Trainer:
    def __init__(self, recipe: Recipe, max_steps: int | None = None) -> None:
        self.recipe = recipe
        set_kernel_backend(recipe.train.kernels)
        self.runtime = init_runtime(recipe.parallel.tensor_parallel, recipe.parallel.pipeline_parallel, recipe.train.seed)
        self.world = recipe.validate_world(self.runtime.world_size)
        recipe.check_init_paths()
        self.max_steps = min(max_steps or recipe.optim.steps, recipe.optim.steps)
        self.output_dir = Path(recipe.train.output_dir)
        self.ckpt_dir = self.output_dir / "checkpoints"

        model = JanusFlowModel(recipe.model, self.runtime.is_first_stage, self.runtime.is_last_stage)
        for line in load_initial_weights(model, recipe.init):
            self._log(line)
        model.set_trainable(recipe.train.trainable)
        self.resume_tag = latest_tag(self.ckpt_dir)
        if self.resume_tag is None and recipe.train.init_from:
            self._init_from_previous_stage(model, recipe.train.init_from)
        universal = bool(self.resume_tag and self.resume_tag.endswith("_universal"))
        self.engine, self.optimizer, self.scheduler = build_engine(model, recipe, self.world, universal)
        self.model = model  # this rank's stage, whatever wraps it for DeepSpeed
        self.pipeline = local_stage(self.engine.module) if self.world.pipeline_parallel > 1 else None
        self.ema = EMA(self.model, recipe.train.ema_decay)
        self.source = build_source(recipe, self.world, self.runtime)
        self.codec = build_latent_codec(recipe.model, recipe.init.vae, self.runtime.device)
        self.monitor = TensorBoardMonitor(self.output_dir) if self.runtime.rank == 0 else NullMonitor()
        self.sample_grid = SampleGrid(recipe, self.codec, dp_rank=self.runtime.dp_rank, log=self._log)
        self.weights = {"ar": recipe.loss.ar_weight, "rf": recipe.loss.rf_weight, "repa": recipe.loss.repa_weight}
        # The planner's FLOP model (LLM, attention per document, SigLIP, generation modules, REPA)
        # turns each micro-batch into training FLOPs for TFLOP/s and MFU.
        self.flop_sizes = MatmulSizes.from_config(recipe.model)
        self.flop_grads = Gradients.for_trainable(recipe.train.trainable)
        self.peak_flops = _device_peak_flops()
        if self.runtime.rank == 0:  # what this run trains with, next to its checkpoints (export reads it)
            self.output_dir.mkdir(parents=True, exist_ok=True)
            dump_recipe(recipe, self.output_dir / "recipe.yaml")
        self.step = 0
        self.skipped_in_a_row = 0
        self.skipped_total = 0
        self._resume()

    # ---------------------------------------------------------------------------------------------
    def _resume(self) -> None:
        tag = self.resume_tag
        if tag is not None:
            state = load_checkpoint(self.engine, self.ckpt_dir, tag, self.runtime, self.ema)
            self.step = state["step"]
            self.skipped_total = state.get("skipped_total", 0)
            if state["layout_changed"]:
                self.source.replay(self.step * self.world.grad_accum_steps)
                self._log("parallel layout changed: the data stream restarts in the new layout at this step")
            else:
                self.source.load_state_dict(state["loader"])
            if state.get("ema_restarted"):
                self._log("the checkpoint holds no EMA for this layout (or these trained tensors): "
                          "the EMA restarts from the current weights")
            self._log(f"resumed from {self.ckpt_dir / tag} at step {self.step}")

    def _init_from_previous_stage(self, model: JanusFlowModel, init_from: str) -> None:
        """A new training stage: the previous stage's raw weights (read in whatever layout it was
        trained, then sharded for this rank), a fresh optimizer and data stream."""
        try:
            root, tag = resolve_checkpoint(init_from)
        except FileNotFoundError as err:
            raise FileNotFoundError(f"train.init_from: {err}") from None
        try:
            full = checkpoint_weights(root, tag, model.cfg, "raw")
        except FileNotFoundError as err:
            raise FileNotFoundError(f"train.init_from: {err}") from None
        load_model_state(model, full)
        self._log(f"initialised from {root / tag} (weights only)")

    def _log(self, message: str) -> None:
        if self.runtime.rank == 0:
            print(f"[train] {message}", flush=True)

    def save(self) -> str:
        return save_checkpoint(
            self.engine, self.ckpt_dir, self.step, self.runtime, self.ema, self.source.state_dict(),
            {"skipped_total": self.skipped_total}, self.recipe.train.keep_last, self.recipe.model.llm.vocab_size,
        )

    # ---------------------------------------------------------------------------------------------
    def train_step(self) -> dict[str, float]:
        """One optimizer step; returns what was logged for it."""
        world, rt = self.world, self.runtime
        started = time.perf_counter()
        batches = [self.source.next().to(rt.device) for _ in range(world.grad_accum_steps)]
        local = torch.zeros(len(OBJECTIVES) + 5, dtype=torch.float64)
        for b in batches:
            counts = batch_unit_counts(b)
            local[:3] += torch.tensor([counts[k] for k in OBJECTIVES], dtype=torch.float64)
            local[3] += b.input_ids.numel()
            for task in Task:
                local[4 + int(task)] += float((b.doc_tasks == int(task)).sum())
            local[7] += sum(sequence_flops(self.recipe.model, self.flop_sizes, self.flop_grads,
                                           SequenceShape.from_batch(b)).values())
        torch.distributed.all_reduce(local, group=self._dp_group())
        global_counts = dict(zip(OBJECTIVES, local[:3].tolist()))

        lr = self.scheduler.get_last_lr()[0]  # the rate this step's update uses
        logged = torch.zeros(len(OBJECTIVES), dtype=torch.float64)
        scale = float(world.data_parallel * world.grad_accum_steps)
        prepared = []
        for micro, batch in enumerate(batches):
            gen = _noise_generator(self.recipe.train.seed, self.step, micro, rt.dp_rank)
            latents = self._clean_latents(batch)
            prepared.append(PreparedMicroBatch(*prepare_model_inputs(batch, latents, self.recipe.data.prompt_drop_prob, gen)))
        if self.pipeline is None:
            for micro in prepared:
                _, outputs = self.engine(micro.inputs)
                terms = stage_loss_terms(outputs, micro.velocity_target)
                loss, parts = combine_losses(terms, self.weights, global_counts, grad_scale=scale)
                self.engine.backward(loss)
                self.engine.step()
                for i, key in enumerate(OBJECTIVES):
                    logged[i] += float(parts.get(key, 0.0)) * self.weights[key]
        else:
            # Every stage of the pipeline prepared the same micro-batches (same data stream and draws).
            self.pipeline.queue_step(prepared, LossContext(self.weights, global_counts, scale))
            self.engine.train_batch(data_iter=placeholder_batches())
            for i, key in enumerate(OBJECTIVES):
                logged[i] += self.pipeline.logs.totals.get(key, 0.0) * self.weights[key]
        torch.distributed.all_reduce(logged, group=self._dp_group())
        if self.pipeline is not None:  # REPA was logged on the first stage, L_AR and L_RF on the last
            from megatron.core import parallel_state

            torch.distributed.all_reduce(logged, group=parallel_state.get_pipeline_model_parallel_group())

        applied = self.engine.was_step_applied()
        if applied:
            self.ema.update()
            self.skipped_in_a_row = 0
        else:
            self.skipped_in_a_row += 1
            self.skipped_total += 1
        self.step += 1
        elapsed = time.perf_counter() - started
        values = {f"loss/{k}": float(logged[i]) for i, k in enumerate(OBJECTIVES)}
        values["loss/total"] = float(logged.sum())
        values["lr"] = lr
        grad_norm = self.engine.get_global_grad_norm()
        values["grad_norm"] = float(grad_norm) if grad_norm is not None else float("nan")
        values["skipped_steps"] = float(self.skipped_total)
        values["throughput/tokens_per_s"] = float(local[3]) / elapsed
        for task in Task:
            values[f"throughput/{task.name.lower()}_docs_per_s"] = float(local[4 + int(task)]) / elapsed
            values[f"mix/{task.name.lower()}_docs"] = float(local[4 + int(task)])
        values["time/step_s"] = elapsed
        # local[7] is summed over DP replicas; each replica's work is split over its TP ranks.
        per_gpu = float(local[7]) / elapsed / rt.world_size
        values["perf/tflops_per_gpu"] = per_gpu / 1e12
        if self.peak_flops:
            values["perf/mfu"] = per_gpu / self.peak_flops
        values["memory/peak_gb"] = _peak_memory_gb()
        return values

    def _clean_latents(self, batch) -> torch.Tensor | None:
        """Scaled latents x of the micro-batch's generation images (data at t = 1)."""
        latents = batch.gen_latents
        if latents is None and batch.gen_pixels is not None and len(batch.gen_pixels):
            if self.codec is None:
                raise RuntimeError(
                    "generation documents without precomputed latents: set init.vae to a local SDXL-VAE "
                    "folder, or build the shards with data_tools --vae"
                )
            latents = self.codec.encode(batch.gen_pixels)
        return None if latents is None else latents * self.recipe.model.gen_vision.latent_scale

    def _dp_group(self):
        from megatron.core import parallel_state

        return parallel_state.get_data_parallel_group()

    def train(self) -> list[dict]:
        stop = StopRequested()
        history = []
        limit = self.recipe.train.max_consecutive_skipped_steps
        self._log(f"world {self.runtime.world_size} (tp {self.world.tensor_parallel}, pp {self.world.pipeline_parallel}, "
                  f"dp {self.world.data_parallel}), "
                  f"accumulation {self.world.grad_accum_steps}, steps {self.step}->{self.max_steps}")
        while self.step < self.max_steps:
            values = self.train_step()
            history.append(values)
            self.monitor.scalars(self.step, values)
            self.sample_grid.maybe_log(self.step, self.model, self.ema, self.monitor)
            if self.step % self.recipe.train.log_interval == 0 or self.step == self.max_steps:
                self._log(
                    f"step {self.step}/{self.max_steps} loss {values['loss/total']:.4f} "
                    f"(ar {values['loss/ar']:.4f} rf {values['loss/rf']:.4f} repa {values['loss/repa']:.4f}) "
                    f"lr {values['lr']:.2e} grad {values['grad_norm']:.3f} "
                    f"{values['throughput/tokens_per_s']:.0f} tok/s {values['perf/tflops_per_gpu'] * 1e3:.2f} GFLOP/s/gpu"
                    + (f" MFU {values['perf/mfu']:.1%}" if "perf/mfu" in values else "")
                    + f" skipped {int(values['skipped_steps'])}"
                )
            if self.skipped_in_a_row >= limit:
                raise RuntimeError(
                    f"{self.skipped_in_a_row} consecutive steps had a NaN/Inf loss or gradient "
                    f"(train.max_consecutive_skipped_steps={limit}); stopping"
                )
            if stop.agreed():
                self._log(f"stop requested: saving {self.save()} and exiting")
                break
            if self.step % self.recipe.train.save_interval == 0 or self.step == self.max_steps:
                self.save()
        self.monitor.close()
        return history

    def close(self) -> None:
        shutdown_runtime()
