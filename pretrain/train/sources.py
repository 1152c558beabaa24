"""Where a rank's micro-batches come from: packed shards, or synthetic batches for smoke runs.

Both give the trainer the same interface, per optimizer step:

- ``next_step() -> list[batch]``: this data-parallel rank's ``grad_accum_steps`` micro-batches of
  the next optimizer step, in order (every pipeline stage of a replica gets the same ones);
- ``state_dict()`` / ``load_state_dict(state)``: the position, so a resumed run continues the
  same stream (``load_state_dict`` returns a line for the log when it continued otherwise, or None);
- ``replay(steps)``: the position after ``steps`` optimizer steps in the current layout (after a
  layout change; no data is read);
- ``next()``: one micro-batch, the older interface (same stream: A calls = one ``next_step()``).
"""

from __future__ import annotations

from typing import Iterator, Optional

import torch

from datacontract.format import Task
from datacontract.shards import ShardError
from ..model.config import ConfigError
from ..recipe import Recipe, WorldLayout
from ..runtime.layout import ParallelLayout
from ..synthetic import make_synthetic_batch


def mix_schedule(recipe: Recipe, world: Optional[WorldLayout] = None):
    """The recipe's ratio phases as the loader's schedule (both count optimizer steps; ``world`` is
    no longer needed and kept for old callers)."""
    from ..data.step_mix import MixSchedule

    points, start = [], 0
    for phase in recipe.data.ratio:
        points.append((start, {"und": phase.understanding, "gen": phase.generation, "text": phase.text}))
        if phase.until_step is not None:
            start = phase.until_step
    return MixSchedule(points, interpolation="step")


def task_costs(recipe: Recipe) -> Optional[dict]:
    """Training FLOPs of a typical packed row of each task in this stage (``pretrain.flops``), for
    the loader's balancing order; None when the typical documents do not fit the sequence."""
    from ..flops import typical_task_flops

    try:
        flops = typical_task_flops(recipe.model, recipe.train.trainable, recipe.data.seq_length)
    except ValueError:
        return None
    return {"und": flops["understanding"], "gen": flops["generation"], "text": flops["text"]}


def _data_error(err: ValueError, all_ranks: bool = True) -> ConfigError:
    """A damaged manifest, shard or record (``ShardError``, whose message names the file) as the one
    ``error:`` line ``pretrain.main`` prints; ``all_ranks=False`` for what only this rank read."""
    out = ConfigError(f"data.root: {err}")
    out.all_ranks = all_ranks
    return out


class ShardSource:
    def __init__(self, recipe: Recipe, world: WorldLayout, runtime: ParallelLayout) -> None:
        from ..data.loader import PackedLoader

        try:
            self.loader = PackedLoader(
                recipe.data.root, mix_schedule(recipe), micro_batch_size=world.micro_batch_size,
                dp_rank=runtime.dp_rank, dp_world=runtime.dp_size, grad_accum_steps=world.grad_accum_steps,
                num_workers=recipe.data.loader_workers, seed=recipe.data.seed, task_costs=task_costs(recipe),
                vocab_size=recipe.model.llm.vocab_size,
            )
        except ShardError as err:
            raise _data_error(err) from None
        self._iter: Iterator | None = None
        self.accept_changed_shards = recipe.data.resume_on_changed_shards
        check_layout(self.loader.layout, recipe)

    def next(self):
        if self._iter is None:
            self._iter = iter(self.loader)
        try:
            return next(self._iter)
        except ShardError as err:
            raise _data_error(err, all_ranks=False) from None

    def next_step(self) -> list:
        if self.loader.position.micro:
            raise RuntimeError("next_step() called in the middle of an optimizer step (after next())")
        return [self.next() for _ in range(self.loader.grad_accum_steps)]

    def state_dict(self) -> dict:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict) -> Optional[str]:
        try:
            changed = self.loader.load_state_dict(state, self.accept_changed_shards)
        except ShardError as err:
            raise _data_error(err) from None
        self._iter = None  # restart the (prefetching) iterator from the restored position
        if changed:
            return (f"the {' and '.join(changed)} shards changed since the checkpoint (data.resume_on_changed_shards): "
                    "their streams continue from the same counts in the new shards' order")
        return None

    def replay(self, steps: int) -> None:
        """Position the stream after ``steps`` optimizer steps in this layout (used after a layout
        change): the mix is a function of the step, so replaying it needs no data."""
        self.loader.replay(steps)
        self._iter = None


def check_layout(layout, recipe: Recipe) -> None:
    """Fail before training when the shards were built for another model or sequence length (the
    rules live with the other launch checks: ``preflight.check_layout``)."""
    from .preflight import check_layout as check

    check(layout, recipe)


class SyntheticSource:
    """Deterministic random batches: micro-batch m of step s on DP rank r is a function of
    (seed, s, m, r) (through its index ``k = s x A + m`` in the rank's stream)."""

    # Micro-batches cycle through these mixes; the last one has no generation sample, so the paths
    # where a micro-batch lacks a branch (zero-touch, empty pipeline activations) run in every test.
    MIXES = (
        [Task.UNDERSTANDING, Task.GENERATION, Task.TEXT],
        [Task.GENERATION, Task.TEXT, Task.GENERATION],
        [Task.UNDERSTANDING, Task.TEXT, Task.TEXT],
    )

    def __init__(self, recipe: Recipe, runtime: ParallelLayout, world: Optional[WorldLayout] = None) -> None:
        self.cfg, self.seed, self.dp_rank = recipe.model, recipe.data.seed, runtime.dp_rank
        self.grad_accum_steps = world.grad_accum_steps if world is not None else 1
        self.index = 0

    def batch(self, step: int, micro: int):
        """Micro-batch ``micro`` of optimizer step ``step`` on this rank."""
        index = step * self.grad_accum_steps + micro
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.dp_rank * 7919 + index)
        return make_synthetic_batch(self.cfg, self.MIXES[(index + self.dp_rank) % len(self.MIXES)], gen)

    def next(self):
        step, micro = divmod(self.index, self.grad_accum_steps)
        self.index += 1
        return self.batch(step, micro)

    def next_step(self) -> list:
        if self.index % self.grad_accum_steps:
            raise RuntimeError("next_step() called in the middle of an optimizer step (after next())")
        return [self.next() for _ in range(self.grad_accum_steps)]

    def state_dict(self) -> dict:
        return {"index": self.index, "dp_rank": self.dp_rank}

    def load_state_dict(self, state: dict) -> Optional[str]:
        self.index = int(state["index"])
        return None

    def replay(self, steps: int) -> None:
        self.index = steps * self.grad_accum_steps


def build_source(recipe: Recipe, world: WorldLayout, runtime: ParallelLayout):
    return SyntheticSource(recipe, runtime, world) if recipe.data.root is None else ShardSource(recipe, world, runtime)
