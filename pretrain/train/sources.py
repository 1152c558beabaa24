"""Where a rank's micro-batches come from: packed shards, or synthetic batches for smoke runs.

Both are stateful (``state_dict``/``load_state_dict``) so a resumed run continues the same stream.
"""

from __future__ import annotations

from typing import Iterator

import torch

from ..data.format import Task
from ..recipe import Recipe, WorldLayout
from ..runtime.distributed import Runtime
from ..synthetic import make_synthetic_batch


def mix_schedule(recipe: Recipe, world: WorldLayout):
    """The recipe's ratio phases (in optimizer steps) as the loader's schedule (in micro-batches)."""
    from ..data.loader import MixSchedule

    per_step = world.grad_accum_steps  # the loader counts micro-batches
    points, start = [], 0
    for phase in recipe.data.ratio:
        points.append((start * per_step, {"und": phase.understanding, "gen": phase.generation, "text": phase.text}))
        if phase.until_step is not None:
            start = phase.until_step
    return MixSchedule(points, interpolation="step")


class ShardSource:
    def __init__(self, recipe: Recipe, world: WorldLayout, runtime: Runtime) -> None:
        from ..data.loader import PackedLoader

        self.loader = PackedLoader(
            recipe.data.root, mix_schedule(recipe, world), micro_batch_size=world.micro_batch_size,
            dp_rank=runtime.dp_rank, dp_world=runtime.dp_size, num_workers=recipe.data.loader_workers,
            seed=recipe.data.seed,
        )
        self._iter: Iterator | None = None
        check_layout(self.loader.layout, recipe)

    def next(self):
        if self._iter is None:
            self._iter = iter(self.loader)
        return next(self._iter)

    def state_dict(self) -> dict:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.loader.load_state_dict(state)
        self._iter = None  # restart the (prefetching) iterator from the restored position

    def replay(self, micro_batches: int) -> None:
        """Position the stream after ``micro_batches`` in this layout (used after a layout change):
        the mix schedule is deterministic, so replaying it needs no data."""
        from ..data.loader import MixCursor

        cursor = MixCursor()
        for _ in range(micro_batches):
            cursor.advance(self.loader.schedule, self.loader.micro_batch_size)
        self.loader.cursor = cursor
        self._iter = None


def check_layout(layout, recipe: Recipe) -> None:
    """Fail before training when the shards were built for another model or sequence length."""
    cfg, gv = recipe.model, recipe.model.gen_vision
    expected = {
        "resolution": recipe.data.resolution,
        "und_tokens_per_image": cfg.und_encoder.num_image_tokens,
        "gen_tokens_per_image": gv.num_latent_tokens,
    }
    wrong = [f"{k}: shards {getattr(layout, k)}, recipe {v}" for k, v in expected.items() if getattr(layout, k) != v]
    if layout.seq_length > recipe.data.seq_length:
        wrong.append(f"seq_length: shards {layout.seq_length} > recipe data.seq_length {recipe.data.seq_length}")
    if layout.latent_shape and tuple(layout.latent_shape) != (gv.latent_channels, gv.latent_size, gv.latent_size):
        wrong.append(f"latent shape: shards {tuple(layout.latent_shape)}, recipe "
                     f"{(gv.latent_channels, gv.latent_size, gv.latent_size)}")
    if wrong:
        raise ValueError(f"data.root={recipe.data.root}: shards do not fit the recipe ({'; '.join(wrong)}); "
                         "rebuild them with matching data_tools options or fix the recipe")


class SyntheticSource:
    """Deterministic random batches: micro-batch k of DP rank r is a function of (seed, r, k)."""

    # Micro-batches cycle through these mixes; the last one has no generation sample, so the paths
    # where a micro-batch lacks a branch (zero-touch, empty pipeline activations) run in every test.
    MIXES = (
        [Task.UNDERSTANDING, Task.GENERATION, Task.TEXT],
        [Task.GENERATION, Task.TEXT, Task.GENERATION],
        [Task.UNDERSTANDING, Task.TEXT, Task.TEXT],
    )

    def __init__(self, recipe: Recipe, runtime: Runtime) -> None:
        self.cfg, self.seed, self.dp_rank = recipe.model, recipe.data.seed, runtime.dp_rank
        self.index = 0

    def next(self):
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.dp_rank * 7919 + self.index)
        batch = make_synthetic_batch(self.cfg, self.MIXES[(self.index + self.dp_rank) % len(self.MIXES)], gen)
        self.index += 1
        return batch

    def state_dict(self) -> dict:
        return {"index": self.index, "dp_rank": self.dp_rank}

    def load_state_dict(self, state: dict) -> None:
        self.index = int(state["index"])

    def replay(self, micro_batches: int) -> None:
        self.index = micro_batches


def build_source(recipe: Recipe, world: WorldLayout, runtime: Runtime):
    return SyntheticSource(recipe, runtime) if recipe.data.root is None else ShardSource(recipe, world, runtime)
