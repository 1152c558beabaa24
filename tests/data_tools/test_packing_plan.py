"""Packing invariants and fill."""

import numpy as np
import pytest

from data_tools.packing import TextStream, pack_best_fit, plan_packing
from datacontract.format import Task


def _mix(n, seed=0, und=(598, 990), gen=(588, 708), text=(50, 6000)):
    rng = np.random.default_rng(seed)
    docs = []
    for i in range(n):
        docs.append((len(docs), Task.UNDERSTANDING, int(rng.integers(*und))))
        docs.append((len(docs), Task.GENERATION, int(rng.integers(*gen))))
        if i % 2 == 0:
            docs.append((len(docs), Task.TEXT, int(rng.integers(*text))))
    return docs


def _check(plan, docs):
    lengths = {ref: n for ref, _, n in docs}
    tasks = {ref: t for ref, t, _ in docs}
    covered = {ref: [] for ref in lengths}
    for task, bins in plan.bins.items():
        for b in bins:
            assert 0 < sum(stop - start for _, start, stop in b) <= plan.seq_length
            assert tasks[b[0][0]] == task, "a sequence starts with a document of its task"
            for ref, start, stop in b:
                assert 0 <= start < stop <= lengths[ref]
                if tasks[ref] != Task.TEXT:
                    assert (start, stop) == (0, lengths[ref]), "image documents are never split"
                covered[ref].append((start, stop))
    for ref, spans in covered.items():
        spans.sort()
        assert spans[0][0] == 0 and spans[-1][1] == lengths[ref], f"document {ref} not fully packed"
        assert all(a[1] == b[0] for a, b in zip(spans, spans[1:])), f"document {ref} pieces overlap or gap"


def test_plan_invariants_and_fill_on_a_realistic_mix():
    docs = _mix(600)
    plan = plan_packing(docs, 4096, window=2000)
    _check(plan, docs)
    assert plan.fill() >= 0.98
    for task in Task:
        assert plan.fill(task) >= 0.98 or len(plan.bins[task]) < 3


def test_without_fillers_each_sequence_holds_one_task():
    docs = _mix(300, seed=1)
    plan = plan_packing(docs, 4096, window=1000, text_fillers=False)
    _check(plan, docs)
    tasks = {ref: t for ref, t, _ in docs}
    for task, bins in plan.bins.items():
        assert all(tasks[ref] == task for b in bins for ref, _, _ in b)
    assert plan.filler_tokens == 0


def test_plan_is_deterministic():
    docs = _mix(200, seed=2)
    a, b = plan_packing(docs, 4096, 500), plan_packing(docs, 4096, 500)
    assert a.bins == b.bins


def test_small_sequence_length_and_long_text_split():
    docs = [(0, Task.TEXT, 1000), (1, Task.TEXT, 5), (2, Task.UNDERSTANDING, 100)]
    plan = plan_packing(docs, 256, window=10)
    _check(plan, docs)
    assert all(sum(s - a for _, a, s in b) == 256 for b in plan.bins[Task.TEXT][:-1])


def test_best_fit_rejects_oversized_documents():
    with pytest.raises(ValueError):
        pack_best_fit([(0, 5000)], 4096, 10)


def test_text_stream_take():
    s = TextStream([(0, 5), (1, 3)])
    assert s.take(4) == [(0, 0, 4)]
    assert s.take(3) == [(0, 4, 5), (1, 0, 2)]
    assert s.take(10) == [(1, 2, 3)] and s.exhausted()


def _text_poor_mix(n=200):
    """Many image documents and little text: the gaps of the image sequences alone could take all
    of it (the demo's data with many samples)."""
    return _mix(n, seed=3, text=(20, 60))


def _text_tokens(plan, docs, where):
    tasks = {ref: t for ref, t, _ in docs}
    return sum(stop - start for task in where for b in plan.bins[task] for ref, start, stop in b
               if tasks[ref] == Task.TEXT)


def test_fillers_leave_the_text_reserve_to_text_sequences():
    docs = _text_poor_mix()
    total = sum(n for _, t, n in docs if t == Task.TEXT)
    unlimited = plan_packing(docs, 4096, window=1000, text_reserve=0.0)
    assert unlimited.bins[Task.TEXT] == [] and unlimited.filler_tokens == total  # what the reserve is for

    plan = plan_packing(docs, 4096, window=1000)  # the default reserve, 0.2
    _check(plan, docs)
    in_text_sequences = _text_tokens(plan, docs, [Task.TEXT])
    assert plan.bins[Task.TEXT], "the text task keeps sequences of its own"
    assert plan.filler_tokens == _text_tokens(plan, docs, [Task.UNDERSTANDING, Task.GENERATION])
    assert plan.filler_tokens + in_text_sequences == total
    assert in_text_sequences >= 0.2 * total
    # Fillers use their whole budget: what is left over beyond the reserve is less than one filler.
    assert in_text_sequences - 0.2 * total < 16 + 1


def test_the_reserve_changes_nothing_where_text_is_plentiful():
    docs = _mix(300, seed=4)  # text documents of up to 6,000 tokens: gaps take a small part
    assert plan_packing(docs, 4096, 1000).bins == plan_packing(docs, 4096, 1000, text_reserve=0.0).bins


@pytest.mark.parametrize("reserve", [-0.1, 1.5, float("nan")])
def test_a_reserve_outside_0_1_is_refused(reserve):
    with pytest.raises(ValueError, match="text_reserve"):
        plan_packing(_mix(5), 4096, 10, text_reserve=reserve)
