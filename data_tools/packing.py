"""The packing plan: which documents (or pieces of text documents) go into which packed sequence.

A pure function of the ordered document lengths, so the same input always gives the same plan.

- Understanding and generation documents are packed per task (a sequence's *primary* task) by a
  best-fit heuristic over a sliding window of ``window`` documents in input order: start from the
  longest pending document, then repeatedly add the longest that fits; when that would leave a gap
  too small for any pending document, take instead the longest that leaves room for one more.
- Text is a token stream: its documents are laid end to end and cut at sequence boundaries (the
  usual LM-pretraining concatenation), so a text document longer than the sequence is split, not
  truncated. A piece that does not start a document has no BOS and its first token is not a target
  (it has no context: attention and positions restart in every document).
- Fillers: the gap left at the end of an understanding/generation sequence (at least
  ``min_filler`` tokens) is filled with a piece cut from the text stream, before the remaining
  text is packed into text sequences. With the realistic mix this raises the fill from ~96% (6 x
  ~650-token generation documents cannot fill 4,096) to ~100%, and moves a few % of text tokens
  into multimodal sequences (reported in the manifest as filler tokens). Fillers take at most
  ``1 - text_reserve`` of the text tokens: where image documents far outnumber text (the demo's
  data with many samples), unlimited fillers took every text token and left the text task with no
  sequence at all, which a recipe with a text share then refuses to train on.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

from datacontract.format import Task

# (document reference, start, stop): tokens [start, stop) of that document.
Piece = Tuple[int, int, int]

_INF = float("inf")


@dataclass
class PackPlan:
    seq_length: int
    bins: Dict[Task, List[List[Piece]]]  # per primary task, the packed sequences in order
    filler_tokens: int = 0

    def tokens(self, task: Task) -> int:
        return sum(stop - start for b in self.bins[task] for _, start, stop in b)

    def fill(self, task=None) -> float:
        tasks = [task] if task is not None else list(self.bins)
        n = sum(len(self.bins[t]) for t in tasks)
        return sum(self.tokens(t) for t in tasks) / (n * self.seq_length) if n else 0.0


def pack_best_fit(docs: Sequence[Tuple[int, int]], seq_length: int, window: int) -> List[List[Piece]]:
    """Pack whole documents ``(ref, length)`` (each length <= seq_length) into sequences."""
    pool: List[Tuple[int, int]] = []  # sorted (length, arrival order)
    refs: List[int] = []
    bins: List[List[Piece]] = []

    def make_bin() -> None:
        room, items = seq_length, []
        while pool:
            i = bisect.bisect_right(pool, (room, _INF)) - 1
            if i < 0:
                break
            length = pool[i][0]
            shortest = pool[0][0] if i != 0 else (pool[1][0] if len(pool) > 1 else _INF)
            if 0 < room - length < shortest:
                # Taking it would strand the gap; prefer one that leaves room for another document.
                j = bisect.bisect_right(pool, (room - shortest, _INF)) - 1
                if j >= 0 and j != i:
                    i = j
                    length = pool[i][0]
            _, order = pool.pop(i)
            items.append((refs[order], 0, length))
            room -= length
        bins.append(items)

    for ref, length in docs:
        if not 0 < length <= seq_length:
            raise ValueError(f"document {ref} has length {length}, outside 1..{seq_length}")
        refs.append(ref)
        bisect.insort(pool, (length, len(refs) - 1))
        if len(pool) >= window:
            make_bin()
    while pool:
        make_bin()
    return bins


class TextStream:
    """Text documents end to end; ``take(n)`` cuts the next n tokens off as pieces."""

    def __init__(self, docs: Sequence[Tuple[int, int]]) -> None:
        self.docs = [(r, n) for r, n in docs if n > 0]
        self.index = 0
        self.offset = 0

    @property
    def remaining(self) -> int:
        if self.index >= len(self.docs):
            return 0
        return sum(n for _, n in self.docs[self.index:]) - self.offset

    def exhausted(self) -> bool:
        return self.index >= len(self.docs)

    def take(self, n: int) -> List[Piece]:
        pieces: List[Piece] = []
        while n > 0 and self.index < len(self.docs):
            ref, length = self.docs[self.index]
            k = min(n, length - self.offset)
            pieces.append((ref, self.offset, self.offset + k))
            n -= k
            self.offset += k
            if self.offset == length:
                self.index, self.offset = self.index + 1, 0
        return pieces


def plan_packing(
    docs: Sequence[Tuple[int, Task, int]],
    seq_length: int,
    window: int = 20000,
    text_fillers: bool = True,
    min_filler: int = 16,
    text_reserve: float = 0.2,
) -> PackPlan:
    """``docs``: (ref, task, length) in input order -> the packing plan. ``text_reserve``: the share
    of the text tokens that fillers leave for text sequences (0: fillers may take all of them)."""
    if not 0.0 <= text_reserve <= 1.0:
        raise ValueError(f"text_reserve={text_reserve}: must be between 0 and 1")
    by_task: Dict[Task, List[Tuple[int, int]]] = {t: [] for t in Task}
    for ref, task, length in docs:
        by_task[Task(task)].append((ref, length))
    bins = {t: [] for t in Task}
    for task in (Task.UNDERSTANDING, Task.GENERATION):
        bins[task] = pack_best_fit(by_task[task], seq_length, window)
    stream = TextStream(by_task[Task.TEXT])
    filler = 0
    if text_fillers:
        budget = stream.remaining - math.ceil(text_reserve * stream.remaining)
        for task in (Task.UNDERSTANDING, Task.GENERATION):
            for b in bins[task]:
                gap = min(seq_length - sum(stop - start for _, start, stop in b), budget - filler)
                if gap >= min_filler and not stream.exhausted():
                    pieces = stream.take(gap)
                    filler += sum(stop - start for _, start, stop in pieces)
                    b.extend(pieces)
    while not stream.exhausted():
        bins[Task.TEXT].append(stream.take(seq_length))
    return PackPlan(seq_length, bins, filler)
