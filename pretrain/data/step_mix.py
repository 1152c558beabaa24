"""How the rows of each optimizer step are split between the tasks and laid out over micro-steps
and data-parallel ranks: pure functions of the schedule, the global batch and the step.

Mixing, per optimizer step. Every packed sequence has one primary task (its shard directory). The
``global_batch_size`` rows of optimizer step ``s`` are split between the tasks by the ratio of step
``s`` *within that step*: each task gets the floor of ``ratio x rows`` and the rows left over go to
the tasks with the largest fractional part plus *carried credit* (what the task was owed by earlier
steps), so every step's count of a task is within one row of ``ratio x rows`` (stage 2 at 14:80:6
and 512 rows: 72/410/30) and the credit carries the fractions over, keeping the long-run shares
exact. The counts are a pure function of (schedule, global batch, step): no randomness, no layout.

Layout of a step. The step's rows, grouped by task, fill its micro-steps one after the other
(micro-step m takes rows ``m*D*B ... (m+1)*D*B - 1`` for D data-parallel ranks and micro-batch B);
within a micro-step, row k goes to rank ``k mod D`` (its row ``k // D``). So ranks of one micro-step
run the same task except in the few micro-steps where one task's rows end and the next begin, and
those mixed micro-steps spread each task evenly over the ranks. With ``task_costs`` (relative
FLOPs of a row of each task, ``pretrain.train.sources.task_costs``) the order of the task groups is
the one of the task permutations with the lowest worst per-micro-step imbalance (max/mean FLOPs
over ranks), then the lowest mean; ties keep the lowest permutation.
"""

from __future__ import annotations

import bisect
import functools
import itertools
import math
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from datacontract.format import Task
from datacontract.shards import TASK_BY_NAME, TASK_DIRS


@dataclass
class MixSchedule:
    """Task ratios by optimizer step.

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
        self._steps = steps
        self._lists = [[float(x) for x in v] for v in self._vectors]  # fast path for "step" schedules

    @classmethod
    def constant(cls, **weights: float) -> "MixSchedule":
        return cls([(0, weights)])

    def ratio_list(self, step: int) -> List[float]:
        """``ratios(step)`` as Python floats (the same values; cheaper in the mixer's loop)."""
        if self.interpolation == "step":
            return self._lists[bisect.bisect_right(self._steps, step) - 1]
        return [float(x) for x in self.ratios(step)]

    def tasks_used(self) -> List[Task]:
        total = np.sum(self._vectors, axis=0)
        return [t for t in Task if total[int(t)] > 0]

    def ratios(self, step: int) -> np.ndarray:
        i = bisect.bisect_right(self._steps, step) - 1
        if self.interpolation == "step" or i + 1 >= len(self._steps):
            return self._vectors[i]
        a, b = self._steps[i], self._steps[i + 1]
        w = (step - a) / (b - a)
        return (1 - w) * self._vectors[i] + w * self._vectors[i + 1]


@dataclass(frozen=True)
class StepLayout:
    """How one optimizer step's rows are cut: D data-parallel ranks x A micro-steps x B rows."""

    data_parallel: int = 1
    grad_accum_steps: int = 1
    micro_batch_size: int = 1

    def __post_init__(self) -> None:
        for key in ("data_parallel", "grad_accum_steps", "micro_batch_size"):
            if getattr(self, key) < 1:
                raise ValueError(f"loader layout: {key} must be at least 1, got {getattr(self, key)}")

    @property
    def rows_per_micro_step(self) -> int:
        return self.data_parallel * self.micro_batch_size

    @property
    def global_batch(self) -> int:
        return self.rows_per_micro_step * self.grad_accum_steps


def apportion_step(ratios: Sequence[float], credits: Sequence[float], rows: int) -> List[int]:
    """Rows per task for one step: floor of ``ratio x rows``, the rest to the largest fractional
    part + carried credit (only tasks whose quota is not whole, so no count leaves ``[floor, ceil]``)."""
    quotas = [float(r) * rows for r in ratios]
    counts = [math.floor(q) for q in quotas]
    extra = rows - sum(counts)
    candidates = sorted((t for t in range(len(quotas)) if quotas[t] - counts[t] > 0),
                        key=lambda t: (-(credits[t] + quotas[t] - counts[t]), t))
    for t in candidates[:extra]:
        counts[t] += 1
    return counts


@dataclass
class MixCursor:
    """Where the mixer stands at the start of optimizer step ``step``: the credit each task carries
    and the items each task's global series has given out."""

    step: int = 0
    credits: List[float] = field(default_factory=lambda: [0.0] * len(Task))
    consumed: List[int] = field(default_factory=lambda: [0] * len(Task))

    def copy(self) -> "MixCursor":
        return MixCursor(self.step, list(self.credits), list(self.consumed))

    def counts(self, schedule: MixSchedule, rows: int) -> List[int]:
        """Rows per task (``Task`` order) of step ``self.step``."""
        return apportion_step(schedule.ratio_list(self.step), self.credits, rows)

    def advance(self, schedule: MixSchedule, rows: int) -> List[int]:
        """Take step ``self.step``'s counts and move to the next step; returns the counts."""
        ratios = schedule.ratio_list(self.step)
        counts = apportion_step(ratios, self.credits, rows)
        for t in range(len(Task)):
            self.credits[t] += ratios[t] * rows - counts[t]
            self.consumed[t] += counts[t]
        self.step += 1
        return counts

    @classmethod
    def at_step(cls, schedule: MixSchedule, rows: int, step: int) -> "MixCursor":
        """The cursor after ``step`` optimizer steps of ``rows`` rows (replayed from the schedule)."""
        cursor = cls()
        while cursor.step < step:
            cursor.advance(schedule, rows)
        return cursor


def order_costs(task_costs: Optional[Mapping[str, float]]) -> Optional[List[int]]:
    """Relative row costs as integers (thousandths of the cheapest), so every rank and worker
    compares imbalances exactly and picks the same order."""
    if task_costs is None:
        return None
    unknown = set(task_costs) - set(TASK_BY_NAME)
    if unknown:
        raise ValueError(f"task_costs: unknown task(s) {sorted(unknown)}; use und/gen/text")
    values = [float(task_costs.get(TASK_DIRS[t], 0.0)) for t in Task]
    positive = [v for v in values if v > 0]
    if not positive:
        raise ValueError("task_costs: give a positive cost to at least one task")
    return [max(1, round(1000 * v / min(positive))) for v in values]


def micro_step_loads(rows: Sequence[int], layout: StepLayout, costs: Sequence[int]) -> np.ndarray:
    """Cost per (micro-step, rank) [A, D] of a step whose rows (tasks, in slab order) are ``rows``."""
    c = np.asarray([costs[t] for t in rows], dtype=np.int64)
    a, d, b = layout.grad_accum_steps, layout.data_parallel, layout.micro_batch_size
    return c.reshape(a, b, d).sum(axis=1)  # row k of a micro-step goes to rank k % D


def _order_key(loads: np.ndarray) -> Tuple[Fraction, Fraction]:
    d = loads.shape[1]
    ratios = [Fraction(int(m.max()) * d, int(m.sum())) for m in loads]
    return max(ratios), sum(ratios, Fraction(0)) / len(ratios)


def choose_task_order(counts: Sequence[int], layout: StepLayout, costs: Optional[Sequence[int]]) -> Tuple[int, ...]:
    """Order of the task groups in a step: ``Task`` order without costs, else the permutation with
    the lowest (worst, mean) per-micro-step imbalance, ties to the first permutation."""
    tasks = tuple(t for t in range(len(counts)) if counts[t] > 0)
    if costs is None or len(tasks) < 2:
        return tasks
    best, best_key = tasks, None
    for order in itertools.permutations(tasks):
        rows = [t for t in order for _ in range(counts[t])]
        key = _order_key(micro_step_loads(rows, layout, costs))
        if best_key is None or key < best_key:
            best, best_key = order, key
    return best


@dataclass(frozen=True)
class StepPlan:
    """One optimizer step's global batch and where each of its rows goes."""

    step: int
    counts: Tuple[int, ...]  # rows per task, ``Task`` order
    first_item: Tuple[int, ...]  # per task: index of its first item in the task's global series
    order: Tuple[int, ...]  # task groups in slab order
    layout: StepLayout

    @classmethod
    def build(cls, cursor: MixCursor, schedule: MixSchedule, layout: StepLayout,
              costs: Optional[Sequence[int]] = None) -> "StepPlan":
        counts = cursor.counts(schedule, layout.global_batch)
        return cls(cursor.step, tuple(counts), tuple(cursor.consumed),
                   choose_task_order(counts, layout, costs), layout)

    @functools.cached_property
    def rows(self) -> List[Tuple[Task, int]]:
        """All (task, global item) rows of the step, in slab order."""
        return [(Task(t), self.first_item[t] + i) for t in self.order for i in range(self.counts[t])]

    def micro_batch(self, micro: int, dp_rank: int) -> List[Tuple[Task, int]]:
        """Rows of data-parallel rank ``dp_rank`` in micro-step ``micro``, in row order."""
        lay = self.layout
        if not (0 <= micro < lay.grad_accum_steps and 0 <= dp_rank < lay.data_parallel):
            raise ValueError(f"micro-step {micro} / rank {dp_rank} outside the layout {lay}")
        slab = self.rows[micro * lay.rows_per_micro_step:(micro + 1) * lay.rows_per_micro_step]
        return slab[dp_rank::lay.data_parallel]
