"""The DeepSpeed training loop over a recipe, for any model family: accumulation, EMA, checkpoints,
monitoring, signals.

The trainer knows engines, data streams, checkpoints and logging, and nothing of the model: the
family's ``TrainSpec`` (``pretrain.train.spec``, chosen by ``pretrain.families``) builds the model
stage and does the per-micro-batch work.

One optimizer step = ``grad_accum_steps`` micro-batches on each data-parallel rank. The loss of a
micro-batch is ``sum / global count`` per objective: the units of the whole step on all DP ranks
are counted on the host from the loader's batches and all-reduced once before the first forward,
and ``grad_scale = dp x accumulation`` undoes DeepSpeed's averaging, so the update is the gradient
of the global-batch mean exactly, whatever the mix of each micro-batch.

Host round trips: none per micro-step. The step's counts are host-side; losses stay on the device
and are summed there over the log interval, then read once (``train.log_interval``), which is also
when the metrics are written. DeepSpeed's optimizer step reads its gradient norm (overflow check).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from fused_kernels.dispatch import set_kernel_backend

from ..recipe import Recipe
from ..runtime.distributed import init_runtime, shutdown_runtime
from .checkpoint import latest_tag, load_checkpoint, resolve_checkpoint, save_checkpoint
from .ema import EMA
from .engine import build_engine
from .forward_backward import LossContext, PlainForwardBackward
from .monitor import NullMonitor, TensorBoardMonitor, one_line, remaining_time
from .pipeline import PipelineForwardBackward
from .preflight import record_run_recipe
from .sources import build_source
from .update_guard import UpdateGuard
from .watchdog import StepWatchdog
from .spec import TrainSpec
from .stop import StopRequested


def noise_generator(seed: int, step: int, micro: int, dp_rank: int, rows=None) -> torch.Generator:
    """The generator of a micro-batch's random draws (flow time, noise, prompt drop).

    With ``rows`` (the micro-batch's (task, item) identities from the loader) the draws depend only on
    the step and the rows themselves: a row draws the same numbers in every data-parallel layout (two
    ranks or one with twice the accumulation give the same update) and in a resumed run. Without
    (synthetic batches) they depend on where the micro-batch sits: (step, micro-step, rank).
    """
    if rows:
        material = [seed, step] + [int(task) * 2**40 + int(item) for task, item in rows]
    else:
        material = [seed, step, micro, dp_rank, 2**62]
    state = np.random.SeedSequence(material).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


def device_peak_flops() -> Optional[float]:
    """Dense bf16 peak of this GPU from the planner's table (None on CPU or an unknown GPU)."""
    if not torch.cuda.is_available():
        return None
    from ..flops import GPUS

    name = torch.cuda.get_device_name().upper()
    for key, spec in GPUS.items():
        if key.upper() in name:
            return spec.peak_bf16_flops
    return None


def peak_memory_gb() -> float:
    """Peak GPU memory allocated by this process, or its peak resident memory on CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


class IntervalMetrics:
    """What is logged every ``train.log_interval`` steps, accumulated without reading the device.

    Losses are summed on the device; the host-side figures (tokens, FLOPs, documents per task,
    seconds) as Python numbers. ``read()`` makes the one host read of the interval.
    """

    def __init__(self, objectives: tuple[str, ...]) -> None:
        self.objectives = objectives
        self.reset()

    def reset(self) -> None:
        self.steps = 0
        self.losses: Optional[torch.Tensor] = None
        self.grad_norms: list = []
        self.host: dict[str, float] = {}
        self.seconds = 0.0

    def add(self, losses: torch.Tensor, grad_norm, host: dict[str, float], seconds: float) -> None:
        self.steps += 1
        self.losses = losses if self.losses is None else self.losses + losses
        if grad_norm is not None:
            self.grad_norms.append(grad_norm)
        for key, value in host.items():
            self.host[key] = self.host.get(key, 0.0) + value
        self.seconds += seconds

    def read(self) -> dict[str, float]:
        """Means over the interval's steps (losses, gradient norm) and rates over its time."""
        losses = (self.losses / self.steps).tolist()
        values = {f"loss/{k}": v for k, v in zip(self.objectives, losses)}
        values["loss/total"] = float(sum(losses))
        norms = [float(g) for g in self.grad_norms]
        values["grad_norm"] = sum(norms) / len(norms) if norms else float("nan")
        values["throughput/tokens_per_s"] = self.host.get("tokens", 0.0) / self.seconds
        values["flops_per_s"] = self.host.get("flops", 0.0) / self.seconds  # whole world
        for key, value in self.host.items():
            if key.startswith("docs/"):
                task = key[len("docs/"):]
                values[f"throughput/{task}_docs_per_s"] = value / self.seconds
                values[f"mix/{task}_docs"] = value / self.steps
        values["time/step_s"] = self.seconds / self.steps
        self.reset()
        return values


class Trainer:
    def __init__(self, recipe: Recipe, max_steps: Optional[int] = None, spec: Optional[TrainSpec] = None) -> None:
        if spec is None:
            from ..families import train_spec_for

            spec = train_spec_for(recipe)
        self.recipe, self.spec = recipe, spec
        set_kernel_backend(recipe.train.kernels)
        # A trainer built inside a process that already runs the distributed runtime (tests, notebooks)
        # uses it and leaves it running when it closes.
        self._owns_runtime = not torch.distributed.is_initialized()
        timeout = recipe.train.collective_timeout_minutes
        self.layout = init_runtime(recipe.parallel.tensor_parallel, recipe.parallel.pipeline_parallel, recipe.train.seed,
                                   timeout_minutes=timeout)
        self.world = recipe.validate_world(self.layout.world_size)
        recipe.check_init_paths()
        self.max_steps = min(max_steps or recipe.optim.steps, recipe.optim.steps)
        self.output_dir = Path(recipe.train.output_dir)
        self.ckpt_dir = self.output_dir / "checkpoints"

        model = spec.build_model(recipe, self.layout, self._log)
        self.resume_tag = latest_tag(self.ckpt_dir)
        if self.resume_tag is None and recipe.train.init_from:
            self._init_from_previous_stage(model, recipe.train.init_from)
        universal = bool(self.resume_tag and self.resume_tag.endswith("_universal"))
        self.step_fn = spec.build_step(recipe, self.layout)
        self.engine, self.optimizer, self.scheduler = build_engine(
            model, recipe, self.world, self.layout, self.step_fn, spec.full_tensor_names(model), universal)
        self.model = model  # this rank's stage, whatever wraps it for DeepSpeed
        if self.world.pipeline_parallel > 1:
            self.forward_backward = PipelineForwardBackward(self.engine)
        else:
            self.forward_backward = PlainForwardBackward(self.engine, self.step_fn)
        self.update_guard = UpdateGuard(self.engine, self.layout.comm)
        self.ema = EMA(self.model, recipe.train.ema_decay, sharded=True)  # of the fp32 masters, ZeRO-sharded
        self.source = build_source(recipe, self.world, self.layout)
        self.sample_grid = spec.build_sample_grid(recipe, self.layout, self.step_fn, self._log)
        self.weights = spec.loss_weights(recipe)
        self.metrics = IntervalMetrics(spec.objectives)
        self.peak_flops = device_peak_flops()
        self.step = 0
        self.skipped_in_a_row = 0
        self.skipped_total = 0
        self._resume()
        # What this run trains with, next to its checkpoints (export reads it); written only once the
        # start or resume succeeded, so a failed resume leaves the run's recorded recipe as it was.
        record_run_recipe(recipe, self.output_dir, self.layout.rank)
        # Last: a failed start leaves no TensorBoard writer thread or event file behind. The records of
        # steps after the one resumed at are set aside (an abandoned trajectory, see TensorBoardMonitor).
        self.monitor = (TensorBoardMonitor(self.output_dir, start_step=self.step, log=self._log)
                        if self.layout.is_main else NullMonitor())
        # Where the remaining time is measured from: this process's pace (a resumed run's earlier
        # starts ran elsewhere, at other speeds); train() restarts it.
        self._pace_from = (time.monotonic(), self.step)

    # ---------------------------------------------------------------------------------------------
    def _resume(self) -> None:
        tag = self.resume_tag
        if tag is not None:
            state = load_checkpoint(self.engine, self.ckpt_dir, tag, self.layout, self.ema)
            tag = state.get("tag", tag)  # an earlier checkpoint when the newest failed verification
            self.step = state["step"]
            self.skipped_total = state.get("skipped_total", 0)
            if state["layout_changed"]:
                self.source.replay(self.step)  # the mix is a function of the step: no data read
                self._log("parallel layout changed: the data stream restarts in the new layout at this step")
            else:
                note = self.source.load_state_dict(state["loader"])
                if note:
                    self._log(note)
            if state.get("ema_restarted"):
                self._log("the checkpoint holds no EMA for this layout (or these trained tensors): "
                          "the EMA restarts from the current weights")
            self._log(f"resumed from {self.ckpt_dir / tag} at step {self.step}")

    def _init_from_previous_stage(self, model, init_from: str) -> None:
        """A new training stage: the previous stage's raw weights (read in whatever layout it was
        trained, then sharded for this rank), a fresh optimizer and data stream."""
        try:
            root, tag = resolve_checkpoint(init_from)
            full = self.spec.read_checkpoint_weights(root, tag, self.recipe)
        except FileNotFoundError as err:
            raise FileNotFoundError(f"train.init_from: {err}") from None
        self.spec.load_full_state(model, full, self.layout)
        self._log(f"initialised from {root / tag} (weights only)")

    def _log(self, message: str) -> None:
        # One event, one line: a prompt, a path or an error message may hold a newline.
        if self.layout.is_main:
            print(f"[train] {one_line(message)}", flush=True)

    def save(self) -> str:
        return save_checkpoint(
            self.engine, self.ckpt_dir, self.step, self.layout, self.ema, self.source.state_dict(),
            {"skipped_total": self.skipped_total}, self.recipe.train.keep_last, self.recipe.model.llm.vocab_size,
        )

    # ---------------------------------------------------------------------------------------------
    def train_step(self) -> bool:
        """One optimizer step. Returns whether the update was applied (False: skipped, NaN/Inf)."""
        layout, step_fn, objectives = self.layout, self.step_fn, self.spec.objectives
        started = time.perf_counter()
        batches = self.source.next_step()  # this rank's micro-batches of the step, on the host

        # Host-side accounting of the step: units per objective (for the loss normalisation),
        # tokens, FLOPs and documents per task (for the metrics). One small all-reduce.
        tasks = None
        local = []
        for b in batches:
            counts = step_fn.unit_counts(b)
            per_task = step_fn.task_counts(b)
            tasks = tasks or list(per_task)
            local.append([counts.get(k, 0) for k in objectives] + [b.input_ids.numel(), step_fn.flops(b)]
                         + [per_task[t] for t in tasks])
        summed = torch.tensor(local, dtype=torch.float64).sum(0)
        summed = layout.comm.all_reduce(summed, group=layout.dp_group).tolist()
        n = len(objectives)
        global_counts = dict(zip(objectives, summed[:n]))
        host = {"tokens": summed[n], "flops": summed[n + 1]}
        host.update({f"docs/{t}": v for t, v in zip(tasks, summed[n + 2:])})

        lr = self.scheduler.get_last_lr()[0]  # the rate this step's update uses
        ctx = LossContext(objectives, self.weights, global_counts,
                          grad_scale=float(self.world.data_parallel * self.world.grad_accum_steps))
        # Each micro-batch moves to the device when it is used (the pipeline engine needs them all
        # queued before its schedule starts; the plain loop takes them one by one).
        prepared = (
            step_fn.prepare(batch.to(layout.device),
                            noise_generator(self.recipe.train.seed, self.step, micro, layout.dp_rank,
                                            getattr(batch, "row_ids", None)))
            for micro, batch in enumerate(batches)
        )
        self.update_guard.reset()
        logged = self.forward_backward.run(prepared, ctx)
        logged = layout.comm.all_reduce(logged, group=layout.dp_group)
        if layout.pp_size > 1:  # each objective was logged on the stage that owns it
            logged = layout.comm.all_reduce(logged, group=layout.pp_group)

        # Skipped: a NaN/Inf gradient (DeepSpeed's overflow check) or an update that would have made
        # the weights non-finite (the guard put them back).
        applied = self.engine.was_step_applied() and not self.update_guard.tripped
        if applied:
            self.ema.update()
            self.skipped_in_a_row = 0
        else:
            self.skipped_in_a_row += 1
            self.skipped_total += 1
        self.step += 1
        self.metrics.add(logged, self.engine.get_global_grad_norm(), host, time.perf_counter() - started)
        self._lr = lr
        return applied

    def _write_metrics(self) -> dict[str, float]:
        values = self.metrics.read()
        values["lr"] = self._lr
        values["skipped_steps"] = float(self.skipped_total)
        # FLOPs are summed over DP replicas; each replica's work is split over its TP x PP ranks.
        per_gpu = values.pop("flops_per_s") / self.layout.world_size
        values["perf/tflops_per_gpu"] = per_gpu / 1e12
        if self.peak_flops:
            values["perf/mfu"] = per_gpu / self.peak_flops
        values["memory/peak_gb"] = peak_memory_gb()
        self.monitor.scalars(self.step, values)
        return values

    def train(self) -> None:
        stop = StopRequested()
        self._log(f"world {self.layout.world_size} (tp {self.world.tensor_parallel}, pp {self.world.pipeline_parallel}, "
                  f"dp {self.world.data_parallel}), "
                  f"accumulation {self.world.grad_accum_steps}, steps {self.step}->{self.max_steps}")
        # Fires a little before the collectives' own timeout, so a hang ends with the watchdog's words.
        watchdog = StepWatchdog(self.layout.rank, minimum_s=0.8 * 60 * self.recipe.train.collective_timeout_minutes)
        self._pace_from = (time.monotonic(), self.step)
        try:
            while self.step < self.max_steps:
                # The watch covers the whole iteration: a rank can stop in the step, a save or a grid.
                watchdog.step_started(self.step)
                self.train_step()
                carry_on = self._after_step(stop)
                watchdog.step_finished()
                if not carry_on:
                    break
        finally:
            stop.restore()
            watchdog.close()
            self.monitor.close()

    def _remaining(self) -> str:
        since, first_step = self._pace_from
        return remaining_time(time.monotonic() - since, self.step - first_step, self.max_steps - self.step)

    def _after_step(self, stop: StopRequested) -> bool:
        """Metrics, sample grid, skip limit, stop request and checkpoint after a step; False to stop."""
        train = self.recipe.train
        limit = train.max_consecutive_skipped_steps
        if self.step % train.log_interval == 0 or self.step == self.max_steps or self.skipped_in_a_row >= limit:
            values = self._write_metrics()
            self._log(
                f"step {self.step}/{self.max_steps} loss {values['loss/total']:.4f} ("
                + " ".join(f"{k} {values[f'loss/{k}']:.4f}" for k in self.spec.objectives)
                + f") lr {values['lr']:.2e} grad {values['grad_norm']:.3f} "
                f"{values['throughput/tokens_per_s']:.0f} tok/s {values['perf/tflops_per_gpu'] * 1e3:.2f} GFLOP/s/gpu"
                + (f" MFU {values['perf/mfu']:.1%}" if "perf/mfu" in values else "")
                + f" skipped {int(values['skipped_steps'])}"
                + f" eta {self._remaining()}"
            )
        self.sample_grid.maybe_log(self.step, self.model, self.ema, self.monitor)
        if self.skipped_in_a_row >= limit:
            raise RuntimeError(
                f"{self.skipped_in_a_row} consecutive steps had a NaN/Inf loss or gradient "
                f"(train.max_consecutive_skipped_steps={limit}); stopping"
            )
        if stop.agreed(self.layout.comm):
            self._log(stop.saving_line(self.save()))
            return False
        if self.step % train.save_interval == 0 or self.step == self.max_steps:
            tag = self.save()
            # A stop asked for during the save (a pre-emption often comes while a long save runs): the
            # checkpoint just written is the stop's; no further step and second save in the grace time.
            if self.step < self.max_steps and stop.agreed(self.layout.comm):
                self._log(f"{stop.saving_line(tag)} (saved as the request came)")
                return False
        return True

    def close(self) -> None:
        self.monitor.close()
        if self._owns_runtime:
            shutdown_runtime()
