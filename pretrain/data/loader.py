"""Streaming packed sequences from a build's shards into model-ready batches, resumably.

Mixing. Every packed sequence has one primary task (its shard directory). Each row of each
micro-batch is assigned a task by *credit* scheduling: before each row, every task earns its
current ratio as credit, the task with the most credit is chosen and pays 1. The shares of tasks
in the stream are then exact (never more than one row off the ratio) at every prefix, under any
ratio schedule, with no randomness: the mix is the same on every rank at every step.

Order. A task stream is an endless series of epochs; each epoch visits every sequence of the task
once, shards in a seeded random order and rows within a shard in a seeded random order. Rank r of
W data-parallel ranks takes items r, r+W, r+2W, ... of that endless series, so every rank gets
sequences even when a task has fewer sequences than ranks (it wraps into the next epoch).

Workers. The k-th micro-batch of this rank is a pure function of (seed, schedule, rank, k), so
loader worker w builds micro-batches w, w+N, ... and torch's DataLoader hands them back in order.

Resumption. ``state_dict()`` is the position after the micro-batches the trainer has taken (not
the ones prefetched): the micro-batch count, the credits and the per-task item counts, plus the
(epoch, shard, row) of each task's next item for humans. ``load_state_dict`` then makes the next
batches exactly those an uninterrupted run would have produced.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .batch import PackedBatch, collate_packed, decode_row
from .format import Task
from .shards import TASK_BY_NAME, TASK_DIRS, ShardLayout, ShardReader, read_manifest, shard_paths

STATE_VERSION = 1


@dataclass
class MixSchedule:
    """Task ratios by training step (micro-batch index on one rank).

    ``points``: [(step, {"und": w, "gen": w, "text": w}), ...] with ascending steps starting at 0.
    ``interpolation``: "step" keeps each point's ratios until the next point; "linear" moves
    linearly between points. Weights are normalised; missing tasks weigh 0.
    """

    points: List[Tuple[int, Dict[str, float]]] = field(default_factory=lambda: [(0, {"und": 1.0})])
    interpolation: str = "step"

    def __post_init__(self) -> None:
        if not self.points or self.points[0][0] != 0:
            raise ValueError("mix schedule: the first point must be at step 0")
        steps = [s for s, _ in self.points]
        if steps != sorted(steps) or len(set(steps)) != len(steps):
            raise ValueError(f"mix schedule: steps must be strictly ascending, got {steps}")
        if self.interpolation not in ("step", "linear"):
            raise ValueError("mix schedule: interpolation must be 'step' or 'linear'")
        self._vectors = []
        for step, weights in self.points:
            unknown = set(weights) - set(TASK_BY_NAME)
            if unknown:
                raise ValueError(f"mix schedule at step {step}: unknown task(s) {sorted(unknown)}; use und/gen/text")
            vec = np.array([float(weights.get(TASK_DIRS[t], 0.0)) for t in Task])
            if (vec < 0).any() or vec.sum() <= 0:
                raise ValueError(f"mix schedule at step {step}: weights must be >= 0 and not all 0")
            self._vectors.append(vec / vec.sum())

    @classmethod
    def constant(cls, **weights: float) -> "MixSchedule":
        return cls([(0, weights)])

    def tasks_used(self) -> List[Task]:
        total = np.sum(self._vectors, axis=0)
        return [t for t in Task if total[int(t)] > 0]

    def ratios(self, step: int) -> np.ndarray:
        steps = [s for s, _ in self.points]
        i = int(np.searchsorted(steps, step, side="right")) - 1
        if self.interpolation == "step" or i + 1 >= len(steps):
            return self._vectors[i]
        a, b = steps[i], steps[i + 1]
        w = (step - a) / (b - a)
        return (1 - w) * self._vectors[i] + w * self._vectors[i + 1]


@dataclass
class MixCursor:
    """Where the mixer stands: micro-batches done, credits, items taken per task."""

    step: int = 0
    credits: List[float] = field(default_factory=lambda: [0.0] * len(Task))
    consumed: List[int] = field(default_factory=lambda: [0] * len(Task))

    def copy(self) -> "MixCursor":
        return MixCursor(self.step, list(self.credits), list(self.consumed))

    def advance(self, schedule: MixSchedule, rows: int) -> List[Tuple[Task, int]]:
        """Assign the next micro-batch's rows: [(task, item index within this rank's stream)]."""
        ratios = schedule.ratios(self.step)
        out = []
        for _ in range(rows):
            for t in range(len(Task)):
                self.credits[t] += float(ratios[t])
            # Only tasks with weight now compete (a task without sequences is never drawn).
            pick = max((t for t in range(len(Task)) if ratios[t] > 0), key=lambda t: (self.credits[t], -t))
            self.credits[pick] -= 1.0
            out.append((Task(pick), self.consumed[pick]))
            self.consumed[pick] += 1
        self.step += 1
        return out


class TaskStream:
    """The endless, seeded order of one task's sequences, split across data-parallel ranks."""

    def __init__(self, task: Task, shards: Sequence[Tuple[str, int]], seed: int, dp_rank: int, dp_world: int):
        self.task = task
        self.shards = list(shards)
        self.total = sum(n for _, n in self.shards)
        if self.total == 0:
            raise ValueError(f"task {TASK_DIRS[task]} has no sequences in the shards")
        self.seed, self.rank, self.world = seed, dp_rank, dp_world
        self._epochs: "OrderedDict[int, tuple]" = OrderedDict()

    def _epoch(self, epoch: int):
        if epoch not in self._epochs:
            rng = np.random.default_rng([self.seed, int(self.task), epoch])
            order = rng.permutation(len(self.shards))
            sizes = np.array([self.shards[i][1] for i in order])
            starts = np.concatenate([[0], np.cumsum(sizes)])
            self._epochs[epoch] = (order, starts, {})
            if len(self._epochs) > 2:
                self._epochs.popitem(last=False)
        return self._epochs[epoch]

    def locate(self, item: int) -> Tuple[int, int, int]:
        """This rank's ``item``-th sequence -> (epoch, shard index in the manifest, row)."""
        g = self.rank + item * self.world
        epoch, i = divmod(g, self.total)
        order, starts, row_perms = self._epoch(epoch)
        pos = int(np.searchsorted(starts, i, side="right")) - 1
        shard = int(order[pos])
        if shard not in row_perms:
            rng = np.random.default_rng([self.seed, int(self.task), epoch, shard, 1])
            row_perms[shard] = rng.permutation(self.shards[shard][1])
        return epoch, shard, int(row_perms[shard][i - starts[pos]])


class _ShardCache:
    def __init__(self, size: int = 16) -> None:
        self.size = size
        self.readers: "OrderedDict[str, ShardReader]" = OrderedDict()

    def get(self, path: str) -> ShardReader:
        if path in self.readers:
            self.readers.move_to_end(path)
        else:
            self.readers[path] = ShardReader(path)
            if len(self.readers) > self.size:
                self.readers.popitem(last=False)[1].close()
        return self.readers[path]


class PackedSequenceDataset(torch.utils.data.IterableDataset):
    """Yields this rank's micro-batches from ``start`` on (workers split them round robin)."""

    def __init__(self, streams: Dict[Task, TaskStream], layout: ShardLayout, schedule: MixSchedule,
                 micro_batch_size: int, start: MixCursor, max_steps: Optional[int] = None) -> None:
        super().__init__()
        self.streams, self.layout, self.schedule = streams, layout, schedule
        self.micro_batch_size = micro_batch_size
        self.start = start
        self.max_steps = max_steps
        self._cache = None

    def plan(self) -> Iterator[Tuple[int, List[Tuple[Task, int]]]]:
        cursor = self.start.copy()
        while self.max_steps is None or cursor.step < self.start.step + self.max_steps:
            step = cursor.step
            yield step, cursor.advance(self.schedule, self.micro_batch_size)

    def read(self, task: Task, item: int):
        if self._cache is None:
            self._cache = _ShardCache()
        stream = self.streams[task]
        _, shard, row = stream.locate(item)
        reader = self._cache.get(stream.shards[shard][0])
        return decode_row(reader.read_row(row), self.layout)

    def batch(self, assignment: List[Tuple[Task, int]]) -> PackedBatch:
        return collate_packed([self.read(task, item) for task, item in assignment])

    def __iter__(self) -> Iterator[PackedBatch]:
        info = torch.utils.data.get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        for step, assignment in self.plan():
            if (step - self.start.step) % nw == wid:
                yield self.batch(assignment)


def _keep(x):
    return x


class PackedLoader:
    """Micro-batches of packed sequences for one data-parallel rank; stateful for checkpoints.

    ``root``: output root of a build (``manifest.json``). ``micro_batch_size``: packed rows per
    micro-batch. Iterating yields ``PackedBatch`` forever (or ``max_steps``); each ``iter()``
    continues from the current state.
    """

    def __init__(self, root: str, schedule: MixSchedule, micro_batch_size: int = 1, dp_rank: int = 0,
                 dp_world: int = 1, num_workers: int = 0, seed: int = 0, prefetch_factor: int = 2,
                 pin_memory: bool = False, max_steps: Optional[int] = None) -> None:
        if not 0 <= dp_rank < dp_world:
            raise ValueError(f"dp_rank {dp_rank} outside 0..{dp_world - 1}")
        if micro_batch_size < 1:
            raise ValueError("micro_batch_size must be at least 1")
        manifest = read_manifest(root)
        self.layout = ShardLayout.from_json(manifest["layout"])
        self.schedule = schedule
        self.streams: Dict[Task, TaskStream] = {}
        for task in schedule.tasks_used():
            shards = shard_paths(root, manifest, task)
            if not sum(n for _, n in shards):
                raise ValueError(f"the mix gives weight to {TASK_DIRS[task]}, but {root} has no such sequences")
            self.streams[task] = TaskStream(task, shards, seed, dp_rank, dp_world)
        self.root, self.seed, self.dp_rank, self.dp_world = root, seed, dp_rank, dp_world
        self.micro_batch_size, self.num_workers = micro_batch_size, num_workers
        self.prefetch_factor, self.pin_memory, self.max_steps = prefetch_factor, pin_memory, max_steps
        self.cursor = MixCursor()

    def dataset(self) -> PackedSequenceDataset:
        remaining = None if self.max_steps is None else max(0, self.max_steps - self.cursor.step)
        return PackedSequenceDataset(self.streams, self.layout, self.schedule, self.micro_batch_size,
                                     self.cursor.copy(), remaining)

    def __iter__(self) -> Iterator[PackedBatch]:
        ds = self.dataset()
        if self.num_workers == 0:
            source = iter(ds)
        else:
            source = iter(torch.utils.data.DataLoader(
                ds, batch_size=None, collate_fn=_keep, num_workers=self.num_workers,
                prefetch_factor=self.prefetch_factor, pin_memory=self.pin_memory,
                multiprocessing_context="fork" if os.name == "posix" else None,
            ))
        for batch in source:
            self.cursor.advance(self.schedule, self.micro_batch_size)
            yield batch

    # ------------------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict:
        cursor = {}
        for task, stream in self.streams.items():
            epoch, shard, row = stream.locate(self.cursor.consumed[int(task)])
            cursor[TASK_DIRS[task]] = {"epoch": epoch, "shard": shard, "row": row,
                                       "items": self.cursor.consumed[int(task)]}
        return {
            "version": STATE_VERSION,
            "step": self.cursor.step,
            "credits": list(self.cursor.credits),
            "consumed": list(self.cursor.consumed),
            "cursor": cursor,
            "seed": self.seed,
            "dp_rank": self.dp_rank,
            "dp_world": self.dp_world,
            "micro_batch_size": self.micro_batch_size,
        }

    def load_state_dict(self, state: dict) -> None:
        for key in ("seed", "dp_rank", "dp_world", "micro_batch_size"):
            if state[key] != getattr(self, key):
                raise ValueError(
                    f"loader state was saved with {key}={state[key]}, this loader has {getattr(self, key)}: "
                    "the data order would change"
                )
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"unknown loader state version {state.get('version')}")
        self.cursor = MixCursor(int(state["step"]), [float(c) for c in state["credits"]],
                                [int(c) for c in state["consumed"]])
