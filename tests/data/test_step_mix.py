"""The per-step global mix of the stage recipes at 1, 2, 8, 256 and 512 data-parallel ranks.

The assignment is a pure function of (schedule, step, layout), so the layouts are simulated: every
(micro-step, rank) slot of a step is asked for its rows, as each rank's loader would. Run with ``-s``
to see the per-step counts.
"""

from __future__ import annotations

from collections import Counter

import pytest

from datacontract.format import Task
from pretrain.data.step_mix import MixCursor, MixSchedule, StepLayout, StepPlan, apportion_step, order_costs
from pretrain.model.config import ConfigError
from pretrain.plan import SCHEDULE
from pretrain.recipe import load_recipe
from pretrain.train.sources import mix_schedule, task_costs

RANKS = (1, 2, 8, 256, 512)
NAMES = {Task.UNDERSTANDING: "und", Task.GENERATION: "gen", Task.TEXT: "text"}


@pytest.fixture(scope="module", params=[0, 1, 2], ids=["stage1", "stage2", "stage3"])
def stage(request):
    recipe = load_recipe(SCHEDULE[request.param])
    return recipe, mix_schedule(recipe), order_costs(task_costs(recipe))


def _layouts(recipe):
    out = []
    for ranks in RANKS:
        for micro in (1, 2):
            try:
                w = load_recipe(SCHEDULE[0], [f"parallel.micro_batch_size={micro}",
                                              f"parallel.global_batch_size={recipe.parallel.global_batch_size}"]
                                ).validate_world(ranks)
            except ConfigError:
                continue  # e.g. 256 rows over 512 ranks
            out.append(StepLayout(w.data_parallel, w.grad_accum_steps, w.micro_batch_size))
    return out


def _global_batch(plan: StepPlan):
    """Every slot asked separately, as the ranks do: the step's rows as a multiset, and slot sizes."""
    lay, rows, sizes = plan.layout, Counter(), set()
    for micro in range(lay.grad_accum_steps):
        for rank in range(lay.data_parallel):
            mine = plan.micro_batch(micro, rank)
            sizes.add(len(mine))
            rows.update(mine)
    return rows, sizes


def _steps(recipe):
    steps = list(range(12))
    for phase in recipe.data.ratio[:-1]:  # around each change of ratio
        steps += list(range(phase.until_step - 3, phase.until_step + 3))
    return steps


def test_every_step_holds_the_ratio_within_one_row_in_every_layout(stage):
    recipe, schedule, costs = stage
    batch = recipe.parallel.global_batch_size
    layouts = _layouts(recipe)
    assert {lay.data_parallel for lay in layouts} >= set(RANKS) - ({512} if batch < 512 else set())
    print(f"\n{recipe.train.stage}: global batch {batch}; per-step rows und/gen/text")
    for step in _steps(recipe):
        cursor = MixCursor.at_step(schedule, batch, step)
        reference = None
        for lay in layouts:
            plan = StepPlan.build(cursor, schedule, lay, costs)
            rows, sizes = _global_batch(plan)
            assert sizes == {lay.micro_batch_size} and max(rows.values()) == 1  # B rows per slot, no repeats
            if reference is None:
                reference = rows
                counts = Counter(task for task, _ in rows)
                fractions = recipe.data.ratio_at(step)
                for task, name in zip(Task, ("understanding", "generation", "text")):
                    assert abs(counts[task] - fractions[name] * batch) < 1, (step, task, counts)
            assert rows == reference, (step, lay)  # the same (task, item) rows at every layout
            if step in (0, 1, 10_000) or (step == 2 and lay.data_parallel in (256, 512)):
                per_micro = [Counter(NAMES[t] for r in range(lay.data_parallel) for t, _ in plan.micro_batch(m, r))
                             for m in range(min(lay.grad_accum_steps, 3))]
                print(f"  step {step:>6} DP {lay.data_parallel:>3} B {lay.micro_batch_size} A {lay.grad_accum_steps:>3}: "
                      f"{counts[Task.UNDERSTANDING]}/{counts[Task.GENERATION]}/{counts[Task.TEXT]}; first micro-steps "
                      + " | ".join(" ".join(f"{k} {v}" for k, v in sorted(c.items())) for c in per_micro))


def test_consecutive_steps_take_each_tasks_series_without_gaps(stage):
    recipe, schedule, costs = stage
    batch = recipe.parallel.global_batch_size
    lay = StepLayout(8, batch // 8, 1)
    cursor, seen = MixCursor(), {t: [] for t in Task}
    for _ in range(40):
        for task, item in StepPlan.build(cursor, schedule, lay, costs).rows:
            seen[task].append(item)
        cursor.advance(schedule, batch)
    for task in Task:
        assert sorted(seen[task]) == list(range(len(seen[task])))
        assert len(seen[task]) == cursor.consumed[task]


def test_long_run_shares_stay_within_one_row_of_exact():
    """Credit carried across steps: the cumulative count of each task never drifts a row from
    ratio x rows so far, through a phase change and under linear interpolation (a brute-force sum)."""
    for schedule in (MixSchedule([(0, {"und": 30, "gen": 50, "text": 20}), (50, {"und": 14, "gen": 80, "text": 6})]),
                     MixSchedule([(0, {"und": 1}), (300, {"gen": 3, "text": 1})], interpolation="linear")):
        for rows in (512, 7):
            cursor, total, target = MixCursor(), [0, 0, 0], [0.0, 0.0, 0.0]
            for step in range(400):
                ratios = schedule.ratios(step)
                counts = cursor.advance(schedule, rows)
                for t in range(3):
                    assert abs(counts[t] - ratios[t] * rows) < 1
                    total[t] += counts[t]
                    target[t] += ratios[t] * rows
                    assert abs(total[t] - target[t]) < 1


def test_apportion_gives_each_task_its_floor_or_ceiling():
    assert apportion_step([0.14, 0.80, 0.06], [0.0] * 3, 512) in ([72, 410, 30], [72, 409, 31], [71, 410, 31])
    assert apportion_step([0.5, 0.5, 0.0], [0.0, 0.0, 0.7], 4) == [2, 2, 0]  # no rows for a task without weight
    assert apportion_step([0.5, 0.5, 0.0], [0.0, 0.3, 0.0], 3) == [1, 2, 0]  # the credit decides
