"""Streaming packed sequences from a build's shards into model-ready batches, resumably.

Mixing and layout. Which tasks' rows make up each optimizer step, and which micro-step and
data-parallel rank each row goes to, are ``pretrain.data.step_mix``'s pure functions of (schedule,
global batch, step).

Order. Each task's sequences form one global endless series of epochs; each epoch visits every
sequence of the task once, shards in a seeded random order and rows within a shard in a seeded
random order. Step ``s`` takes the next ``count`` items of each task's series, so a step's global
batch, the multiset of (task, item) rows, is the same in every layout (data-parallel size,
accumulation, micro-batch size): a layout change needs nothing but the step number.

Rank r's micro-batch m of step s is a pure function of (seed, schedule, s, m, r, layout), so loader
workers build them in parallel, and every pipeline stage of a replica (same data-parallel rank)
reads the same micro-batches.

Text fillers (short text pieces that ``data_tools`` packs at the end of understanding/generation
rows, ``doc_tasks`` = text). The ratio counts rows by primary task. Rule: at a step whose ratio
gives text no weight (stage 1), fillers are dropped from the rows as they are read (the thd batch
needs no padding, so the row just gets shorter): they would otherwise add text targets to L_AR's
denominator in a stage that trains no text, and cost LLM FLOPs for nothing. Where text has weight,
fillers stay and train as text, on top of the text rows: the text share of tokens is then the
text rows' share plus the manifest's ``totals.filler_tokens`` over all tokens (a few % with
~650-token generation documents, which leave ~200 tokens per 4,096-token row).

Workers. Loader worker w builds this rank's micro-batches w, w+N, ... (counted from where the
iterator starts) and torch's DataLoader hands them back in order.

Resumption. ``state_dict()`` is the position after the micro-batches the trainer has taken (not
the ones prefetched): the optimizer step, the micro-step within it, the credits and the per-task
item counts at the start of the step, plus the (epoch, shard, row) of each task's next item for
humans. These are global (the same on every rank), so a state saved at a step boundary loads in
any layout with the same global batch; ``replay(steps)`` recomputes it from the schedule alone.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections import OrderedDict
from dataclasses import dataclass
from typing import Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import pyarrow as pa
import torch

from datacontract.format import Task
from datacontract.shards import (
    MANIFEST_NAME,
    TASK_DIRS,
    ShardError,
    ShardLayout,
    ShardReader,
    check_manifest,
    check_shard_files,
    read_manifest,
    shard_paths,
)

from .batch import PackedBatch, PackedRow, collate_packed, decode_row
from .step_mix import MixCursor, MixSchedule, StepLayout, StepPlan, order_costs

STATE_VERSION = 2


class TaskStream:
    """The endless, seeded, global order of one task's sequences (the same on every rank)."""

    def __init__(self, task: Task, shards: Sequence[Tuple[str, int]], seed: int):
        self.task = task
        self.shards = list(shards)
        self.total = sum(n for _, n in self.shards)
        if self.total == 0:
            raise ValueError(f"task {TASK_DIRS[task]} has no sequences in the shards")
        self.seed = seed
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
        """The task's ``item``-th sequence -> (epoch, shard index in the manifest, row)."""
        epoch, i = divmod(item, self.total)
        order, starts, row_perms = self._epoch(epoch)
        pos = int(np.searchsorted(starts, i, side="right")) - 1
        shard = int(order[pos])
        if shard not in row_perms:
            rng = np.random.default_rng([self.seed, int(self.task), epoch, shard, 1])
            row_perms[shard] = rng.permutation(self.shards[shard][1])
        return epoch, shard, int(row_perms[shard][i - starts[pos]])


def drop_text_fillers(row: PackedRow) -> PackedRow:
    """The row without its text documents (the fillers of an understanding/generation row; they sit
    at its end and hold no images, so the image lists are unchanged)."""
    keep = row.doc_tasks != int(Task.TEXT)
    if keep.all():
        return row
    tokens = np.repeat(keep, row.doc_lengths)
    return dataclasses.replace(
        row, input_ids=row.input_ids[tokens], token_kind=row.token_kind[tokens],
        target_mask=row.target_mask[tokens], doc_lengths=row.doc_lengths[keep], doc_tasks=row.doc_tasks[keep],
    )


class _ShardCache:
    def __init__(self, size: int = 16) -> None:
        self.size = size
        self.readers: "OrderedDict[str, ShardReader]" = OrderedDict()

    def get(self, path: str, rows: int, layout: ShardLayout) -> ShardReader:
        if path in self.readers:
            self.readers.move_to_end(path)
        else:
            self.readers[path] = ShardReader(path, rows, layout)  # checked against the manifest once
            if len(self.readers) > self.size:
                self.readers.popitem(last=False)[1].close()
        return self.readers[path]


@dataclass(frozen=True)
class _Failure:
    """A micro-batch that could not be built: handed back in its place, so that the loader raises
    ``ShardError`` with the one-line message even from a worker process (torch would re-raise a
    worker's exception with its traceback in the message)."""

    message: str


@dataclass(frozen=True)
class _Position:
    cursor: MixCursor  # at the start of the current step
    micro: int  # micro-steps of that step already taken


class PackedSequenceDataset(torch.utils.data.IterableDataset):
    """Yields this rank's micro-batches from ``start`` on (workers split them round robin)."""

    def __init__(self, streams: Dict[Task, TaskStream], layout: ShardLayout, schedule: MixSchedule,
                 step_layout: StepLayout, dp_rank: int, costs: Optional[List[int]], start: _Position,
                 max_steps: Optional[int] = None, vocab_size: Optional[int] = None) -> None:
        super().__init__()
        self.streams, self.layout, self.schedule = streams, layout, schedule
        self.step_layout, self.dp_rank, self.costs = step_layout, dp_rank, costs
        self.start = start
        self.max_steps = max_steps
        self.vocab_size = vocab_size
        self._cache = None

    def plan(self) -> Iterator[Tuple[int, List[Tuple[Task, int]]]]:
        """(optimizer step, this rank's rows) of every micro-batch from the start position on."""
        cursor, micro = self.start.cursor.copy(), self.start.micro
        while self.max_steps is None or cursor.step < self.max_steps:
            plan = StepPlan.build(cursor, self.schedule, self.step_layout, self.costs)
            for m in range(micro, self.step_layout.grad_accum_steps):
                yield cursor.step, plan.micro_batch(m, self.dp_rank)
            micro = 0
            cursor.advance(self.schedule, self.step_layout.global_batch)

    def read(self, task: Task, item: int, drop_fillers: bool) -> PackedRow:
        if self._cache is None:
            self._cache = _ShardCache()
        stream = self.streams[task]
        _, shard, row = stream.locate(item)
        path, rows = stream.shards[shard]
        reader = self._cache.get(path, rows, self.layout)
        try:
            decoded = decode_row(reader.read_row(row), self.layout, self.vocab_size)
        except (ValueError, TypeError, OSError, pa.ArrowException) as err:
            raise ShardError(f"{path} row {row}: {err}; `python -m data_tools verify` on the build lists every "
                             "such row: rebuild the shards") from None
        return drop_text_fillers(decoded) if drop_fillers and task != Task.TEXT else decoded

    def batch(self, step: int, assignment: List[Tuple[Task, int]]) -> PackedBatch:
        drop = float(self.schedule.ratios(step)[int(Task.TEXT)]) == 0.0
        batch = collate_packed([self.read(task, item, drop) for task, item in assignment])
        # Which rows these are: the trainer keys the micro-batch's random draws by them, so a row
        # draws the same numbers in every data-parallel layout.
        batch.row_ids = tuple((int(task), int(item)) for task, item in assignment)
        return batch

    def __iter__(self) -> Iterator[PackedBatch]:
        info = torch.utils.data.get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        for k, (step, assignment) in enumerate(self.plan()):
            if k % nw == wid:
                try:
                    batch = self.batch(step, assignment)
                except ShardError as err:
                    yield _Failure(str(err))
                    return
                yield batch


def _keep(x):
    return x


def read_manifest_checked(root: str) -> dict:
    """``read_manifest`` + ``check_manifest`` + its layout, every failure a ``ShardError`` naming the file."""
    where = os.path.join(root, MANIFEST_NAME)
    try:
        manifest = read_manifest(root)
    except FileNotFoundError as err:
        raise ShardError(str(err)) from None
    except (OSError, ValueError) as err:  # unreadable, not UTF-8, not JSON
        raise ShardError(f"{where}: cannot be read ({type(err).__name__}: {err}); rebuild the shards") from None
    check_manifest(root, manifest)
    try:
        ShardLayout.from_json(manifest["layout"])
    except (KeyError, ValueError, TypeError) as err:
        raise ShardError(f"{where}: its layout is damaged ({type(err).__name__}: {err}); rebuild the shards") from None
    return manifest


def shards_fingerprint(manifest: dict, task: Task) -> str:
    """What a task's data order is a function of, besides the seed: its shards, their rows and
    contents (the build's checksums; a deterministic rebuild gives the same), not where they lie."""
    entry = manifest["tasks"].get(TASK_DIRS[task], {"shards": []})
    listed = [[s["path"], s["rows"], s.get("sha256") or s["bytes"]] for s in entry["shards"]]
    return hashlib.sha256(json.dumps(listed).encode()).hexdigest()[:16]


class PackedLoader:
    """Micro-batches of packed sequences for one data-parallel rank; stateful for checkpoints.

    ``root``: output root of a build (``manifest.json``). ``schedule``: task ratios by optimizer
    step. The layout: ``dp_world`` data-parallel ranks, ``grad_accum_steps`` micro-steps of
    ``micro_batch_size`` rows per optimizer step (global batch = their product). ``task_costs``:
    relative FLOPs of a row of each task ({"und": c, ...}) for the balancing order (None: ``Task``
    order). Iterating yields this rank's ``PackedBatch``es in order (micro-step 0..A-1 of each step),
    forever or up to optimizer step ``max_steps``; each ``iter()`` continues from the current state.
    """

    def __init__(self, root: str, schedule: MixSchedule, micro_batch_size: int = 1, dp_rank: int = 0,
                 dp_world: int = 1, num_workers: int = 0, seed: int = 0, prefetch_factor: int = 2,
                 pin_memory: bool = False, max_steps: Optional[int] = None, grad_accum_steps: int = 1,
                 task_costs: Optional[Mapping[str, float]] = None, vocab_size: Optional[int] = None) -> None:
        if not 0 <= dp_rank < dp_world:
            raise ValueError(f"dp_rank {dp_rank} outside 0..{dp_world - 1}")
        if micro_batch_size < 1:
            raise ValueError("micro_batch_size must be at least 1")
        self.step_layout = StepLayout(dp_world, grad_accum_steps, micro_batch_size)
        manifest = read_manifest_checked(root)
        self.manifest = manifest
        self.layout = ShardLayout.from_json(manifest["layout"])
        self.schedule = schedule
        self.streams: Dict[Task, TaskStream] = {}
        for task in schedule.tasks_used():
            shards = shard_paths(root, manifest, task)
            if not sum(n for _, n in shards):
                raise ValueError(f"the mix gives weight to {TASK_DIRS[task]}, but {root} has no such sequences")
            self.streams[task] = TaskStream(task, shards, seed)
        # Before the first step: a shard deleted, cut short or swapped since the build fails now, not
        # when the stream first reaches it (one stat per shard; the rows are checked when opened).
        check_shard_files(root, manifest, self.streams)
        self.fingerprints = {TASK_DIRS[t]: shards_fingerprint(manifest, t) for t in self.streams}
        self.vocab_size = vocab_size
        self.root, self.seed, self.dp_rank, self.dp_world = root, seed, dp_rank, dp_world
        self.micro_batch_size, self.grad_accum_steps = micro_batch_size, grad_accum_steps
        self.num_workers, self.costs = num_workers, order_costs(task_costs)
        self.prefetch_factor, self.pin_memory, self.max_steps = prefetch_factor, pin_memory, max_steps
        self.position = _Position(MixCursor(), 0)

    @property
    def global_batch_size(self) -> int:
        return self.step_layout.global_batch

    def dataset(self) -> PackedSequenceDataset:
        return PackedSequenceDataset(self.streams, self.layout, self.schedule, self.step_layout, self.dp_rank,
                                     self.costs, _Position(self.position.cursor.copy(), self.position.micro),
                                     self.max_steps, self.vocab_size)

    def step_plan(self, step: int) -> StepPlan:
        """The global batch of optimizer ``step`` and its layout (replayed from the schedule)."""
        cursor = self.position.cursor
        if cursor.step > step:
            cursor = MixCursor()
        cursor = cursor.copy()
        while cursor.step < step:
            cursor.advance(self.schedule, self.global_batch_size)
        return StepPlan.build(cursor, self.schedule, self.step_layout, self.costs)

    def _taken(self) -> None:
        cursor, micro = self.position.cursor, self.position.micro + 1
        if micro == self.grad_accum_steps:
            cursor = cursor.copy()
            cursor.advance(self.schedule, self.global_batch_size)
            micro = 0
        self.position = _Position(cursor, micro)

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
            if isinstance(batch, _Failure):
                raise ShardError(batch.message)
            self._taken()
            yield batch

    # ------------------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict:
        cursor = self.position.cursor
        readable = {}
        for task, stream in self.streams.items():
            epoch, shard, row = stream.locate(cursor.consumed[int(task)])
            readable[TASK_DIRS[task]] = {"epoch": epoch, "shard": shard, "row": row,
                                         "items": cursor.consumed[int(task)]}
        return {
            "version": STATE_VERSION,
            "step": cursor.step,
            "micro": self.position.micro,
            "credits": list(cursor.credits),
            "consumed": list(cursor.consumed),
            "cursor": readable,
            "seed": self.seed,
            "global_batch_size": self.global_batch_size,
            "dp_rank": self.dp_rank,
            "dp_world": self.dp_world,
            "micro_batch_size": self.micro_batch_size,
            "grad_accum_steps": self.grad_accum_steps,
            "shards": dict(self.fingerprints),
        }

    def load_state_dict(self, state: dict, accept_changed_shards: bool = False) -> list[str]:
        """Continue exactly where ``state`` was taken. A state taken at a step boundary loads in any
        layout of the same global batch (its fields are global); a mid-step one only in its own.

        Shards rebuilt with other contents since ``state`` was taken are refused (``ShardError``), or,
        with ``accept_changed_shards``, continued: each task's stream keeps its count of items taken,
        now over the new shards' order. Returns the tasks whose shards changed (continued)."""
        version = state.get("version")
        if version == 1:  # per-micro-batch mixer: its data order is gone; restart at its optimizer step
            self._load_version_1(state)
            return []
        if version != STATE_VERSION:
            raise ValueError(f"unknown loader state version {version}")
        for key in ("seed", "global_batch_size"):
            if state[key] != getattr(self, key):
                raise ValueError(
                    f"loader state was saved with {key}={state[key]}, this loader has {getattr(self, key)}: "
                    "the data order would change"
                )
        changed = [task for task, saved in (state.get("shards") or {}).items()  # older states: no record
                   if task in self.fingerprints and saved != self.fingerprints[task]]
        if changed and not accept_changed_shards:
            raise ShardError(
                f"{os.path.join(self.root, MANIFEST_NAME)}: the {' and '.join(changed)} shards are not those the "
                "checkpoint's data position counts in (rebuilt with other contents since?), so the run would not "
                "continue its data order; restore the shards it was trained on, or set "
                "data.resume_on_changed_shards=true to continue over these (a new order from the same counts)")
        same_layout = all(state[k] == getattr(self, k) for k in ("dp_rank", "dp_world", "micro_batch_size",
                                                                  "grad_accum_steps"))
        if state["micro"] and not same_layout:
            raise ValueError(f"loader state was saved in the middle of step {state['step']} on another rank or "
                             "layout: resume at a step boundary (or replay(step))")
        cursor = MixCursor(int(state["step"]), [float(c) for c in state["credits"]], [int(c) for c in state["consumed"]])
        self.position = _Position(cursor, int(state["micro"]))
        return changed

    def _load_version_1(self, state: dict) -> None:
        old_accum, rest = divmod(self.global_batch_size, state["dp_world"] * state["micro_batch_size"])
        if rest or state["step"] % max(old_accum, 1) or state["seed"] != self.seed:
            raise ValueError("loader state version 1 (per-micro-batch mixing) does not fall on an optimizer step of "
                             "this global batch and seed: resume with replay(step)")
        self.replay(state["step"] // old_accum)

    def replay(self, steps: int) -> None:
        """Position the stream after ``steps`` optimizer steps (no data is read)."""
        self.position = _Position(MixCursor.at_step(self.schedule, self.global_batch_size, steps), 0)
