"""The trainer's data interface (``pretrain.train.sources``) on the synthetic source: per-step
micro-batches, the old per-micro-batch stream unchanged, resume and replay. (The shard source is
tested with real shards in test_packed_loader.py.)"""

from types import SimpleNamespace

import pytest
import torch

from datacontract.format import Task
from pretrain.recipe import load_recipe
from pretrain.train.sources import SyntheticSource
from tests.launch_helpers import REPO


@pytest.fixture(scope="module")
def recipe():
    return load_recipe(REPO / "recipes" / "tiny_cpu.yaml")


def _source(recipe, dp_rank=1, dp=2):
    return SyntheticSource(recipe, SimpleNamespace(dp_rank=dp_rank, dp_size=dp), recipe.validate_world(dp))


def _same(a, b):
    for name in ("input_ids", "cu_seqlens", "token_kind", "doc_tasks"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name


def test_next_step_is_the_old_stream_cut_into_steps(recipe):
    source = _source(recipe)
    accum = recipe.validate_world(2).grad_accum_steps
    steps = [source.next_step() for _ in range(3)]
    assert [len(s) for s in steps] == [accum] * 3
    old = _source(recipe)
    flat = [old.next() for _ in range(3 * accum)]
    for a, b in zip(sum(steps, []), flat):
        _same(a, b)
    # Micro-batch m of step s depends on (seed, s, m, rank) only, and some lack a generation document.
    assert any(not (b.doc_tasks == Task.GENERATION).any() for b in flat)
    _same(source.batch(1, 1), steps[1][1])


def test_resume_and_replay_continue_the_same_stream(recipe):
    reference = _source(recipe)
    expected = [reference.next_step() for _ in range(4)][2:]
    first = _source(recipe)
    first.next_step(), first.next_step()
    resumed = _source(recipe)
    resumed.load_state_dict(first.state_dict())
    replayed = _source(recipe)
    replayed.replay(2)
    for source in (resumed, replayed):
        for want, got in zip(sum(expected, []), sum([source.next_step() for _ in range(2)], [])):
            _same(want, got)
    half = _source(recipe)
    half.next()
    with pytest.raises(RuntimeError, match="middle of an optimizer step"):
        half.next_step()
