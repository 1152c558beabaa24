"""The loader on real shards: the per-step global batch in any layout, the global task streams,
determinism, resumption mid-step (with and without workers), replay after a layout change, the same
micro-batches on every pipeline stage, and the text-filler rule."""

from types import SimpleNamespace

import pytest
import torch

from datacontract.format import Task
from pretrain.data.loader import PackedLoader, TaskStream
from pretrain.data.step_mix import MixSchedule
from datacontract.shards import ShardReader, read_manifest, shard_paths

MIX = MixSchedule([(0, {"und": 0.6, "gen": 0.4}), (3, {"und": 0.2, "gen": 0.4, "text": 0.4})])


def _take(loader, n):
    it = iter(loader)
    return [next(it) for _ in range(n)]


def _same(a, b):
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.cu_seqlens, b.cu_seqlens)
    assert torch.equal(a.target_mask, b.target_mask) and torch.equal(a.doc_tasks, b.doc_tasks)
    assert torch.equal(a.und_pixels, b.und_pixels) and torch.equal(a.gen_pixels, b.gen_pixels)


def _rows(batch):
    """A micro-batch's packed rows as hashable token tuples."""
    ends = batch.row_lengths.cumsum(0).tolist()
    ids = batch.input_ids.tolist()
    return [tuple(ids[a:b]) for a, b in zip([0] + ends[:-1], ends)]


def test_the_task_series_is_global_and_covers_an_epoch_once():
    stream = TaskStream(Task.TEXT, [("a", 1), ("b", 2)], seed=0)
    epoch0 = sorted(stream.locate(i)[1:] for i in range(3))
    assert epoch0 == [(0, 0), (1, 0), (1, 1)]
    assert stream.locate(3)[0] == 1 and sorted(stream.locate(i)[1:] for i in range(3, 6)) == epoch0


def test_a_steps_global_batch_is_the_same_in_every_layout(built):
    """All ranks' micro-batches of a step hold the same packed rows whatever the layout."""
    out, _ = built
    by_layout = {}
    for dp, accum, micro in ((1, 1, 8), (1, 8, 1), (2, 2, 2), (4, 2, 1), (8, 1, 1)):
        steps = [[] for _ in range(4)]
        for rank in range(dp):
            batches = _take(PackedLoader(out, MIX, micro_batch_size=micro, dp_rank=rank, dp_world=dp,
                                         grad_accum_steps=accum, seed=3), 4 * accum)
            for k, b in enumerate(batches):
                assert int(b.row_lengths.numel()) == micro
                steps[k // accum] += _rows(b)
        by_layout[(dp, accum, micro)] = [sorted(s) for s in steps]
    reference = by_layout.pop((1, 1, 8))
    assert all(len(s) == 8 for s in reference)
    for layout, steps in by_layout.items():
        assert steps == reference, layout


def test_a_step_holds_the_ratio_of_its_step(built):
    out, _ = built
    for step, batch in enumerate(_take(PackedLoader(out, MIX, micro_batch_size=10, seed=1), 5)):
        ratios = MIX.ratios(step)
        counts = _primary_counts(batch)
        for t in Task:
            assert abs(counts[t] - ratios[t] * 10) < 1, (step, counts)


def _primary_counts(batch):
    """Rows per primary task: a row's first document is its primary task's (fillers come last)."""
    counts = {t: 0 for t in Task}
    doc_starts = batch.cu_seqlens[:-1].tolist()
    tasks = batch.doc_tasks.tolist()
    row_start = 0
    for length in batch.row_lengths.tolist():
        counts[Task(tasks[doc_starts.index(row_start)])] += 1
        row_start += length
    return counts


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_mid_step_gives_the_same_next_batches(built, workers):
    out, _ = built
    kw = dict(micro_batch_size=2, dp_rank=1, dp_world=2, grad_accum_steps=3, seed=5)
    reference = _take(PackedLoader(out, MIX, **kw), 12)
    first = PackedLoader(out, MIX, num_workers=workers, **kw)
    got = _take(first, 7)  # two steps and one micro-step of the third
    state = first.state_dict()
    assert (state["step"], state["micro"]) == (2, 1) and set(state["cursor"]) == {"und", "gen", "text"}
    resumed = PackedLoader(out, MIX, num_workers=workers, **kw)
    resumed.load_state_dict(state)
    got += _take(resumed, 5)
    for a, b in zip(reference, got):
        _same(a, b)
    with pytest.raises(ValueError, match="seed"):
        PackedLoader(out, MIX, **{**kw, "seed": 6}).load_state_dict(state)
    with pytest.raises(ValueError, match="middle of step"):
        PackedLoader(out, MIX, **{**kw, "dp_world": 3, "grad_accum_steps": 2}).load_state_dict(state)


def test_replay_after_a_layout_change_reads_what_the_new_layout_would_have(built):
    out, _ = built
    old = PackedLoader(out, MIX, micro_batch_size=1, dp_rank=0, dp_world=4, grad_accum_steps=2, seed=2)
    _take(old, 6)  # three steps in the old layout
    new_kw = dict(micro_batch_size=2, dp_rank=1, dp_world=2, grad_accum_steps=2, seed=2)
    from_start = _take(PackedLoader(out, MIX, **new_kw), 10)[6:]  # steps 3 and 4 in the new layout
    replayed = PackedLoader(out, MIX, **new_kw)
    replayed.replay(3)
    for a, b in zip(from_start, _take(replayed, 4)):
        _same(a, b)
    # A state taken at a step boundary is global: it loads in the new layout to the same effect.
    loaded = PackedLoader(out, MIX, **new_kw)
    loaded.load_state_dict(old.state_dict())
    for a, b in zip(from_start, _take(loaded, 4)):
        _same(a, b)


def test_every_pipeline_stage_of_a_replica_reads_the_same_micro_batches(built, monkeypatch):
    from pretrain.recipe import load_recipe
    from pretrain.train import sources
    from pretrain.train.sources import ShardSource
    from tests.launch_helpers import REPO

    out, _ = built
    monkeypatch.setattr(sources, "check_layout", lambda layout, recipe: None)  # 4-token images, tiny_cpu has 16
    recipe = load_recipe(REPO / "recipes" / "tiny_cpu.yaml", [f"data.root={out}", "data.loader_workers=0"])
    world = recipe.validate_world(2)  # DP 2, accumulation 2
    steps = {}
    for pp_rank in (0, 1):
        source = ShardSource(recipe, world, SimpleNamespace(dp_rank=1, dp_size=2, pp_rank=pp_rank))
        steps[pp_rank] = [source.next_step() for _ in range(2)]
        assert [len(s) for s in steps[pp_rank]] == [world.grad_accum_steps] * 2
    for a, b in zip(sum(steps[0], []), sum(steps[1], [])):
        _same(a, b)


def _raw_non_text_tokens(out, task, manifest):
    """Tokens of each row of a task's shards outside text documents, read straight from the shards."""
    lengths = set()
    for path, _ in shard_paths(out, manifest, task):
        reader = ShardReader(path)
        for i in range(reader.num_rows):
            row = reader.read_row(i)
            lengths.add(sum(n for n, t in zip(row["doc_lengths"], row["doc_tasks"]) if t != Task.TEXT))
        reader.close()
    return lengths


def test_fillers_are_dropped_where_the_step_trains_no_text(built):
    out, manifest = built
    assert manifest["totals"]["filler_tokens"] > 0, "the fixture's build should contain text fillers"
    no_text = MixSchedule([(0, {"und": 1, "gen": 1}), (2, {"und": 1, "gen": 1, "text": 1})])
    batches = _take(PackedLoader(out, no_text, micro_batch_size=16, seed=0), 4)
    allowed = _raw_non_text_tokens(out, Task.UNDERSTANDING, manifest) | _raw_non_text_tokens(out, Task.GENERATION,
                                                                                               manifest)
    for b in batches[:2]:  # text weighs 0: no text document, rows are their image documents only
        assert not (b.doc_tasks == Task.TEXT).any()
        assert set(b.row_lengths.tolist()) <= allowed
    # With text in the mix, fillers stay inside understanding/generation rows (and train as text).
    with_fillers = [b for b in batches[2:] if any(_fillers(b))]
    assert with_fillers


def _fillers(batch):
    """For each row: whether it is an understanding/generation row holding a text document."""
    starts, tasks, out, pos = batch.cu_seqlens[:-1].tolist(), batch.doc_tasks.tolist(), [], 0
    for length in batch.row_lengths.tolist():
        docs = [tasks[i] for i, s in enumerate(starts) if pos <= s < pos + length]
        out.append(docs[0] != Task.TEXT and Task.TEXT in docs)
        pos += length
    return out


def test_a_missing_task_fails_early(built, tmp_path):
    import json, shutil

    out, manifest = built
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    manifest = read_manifest(out)
    manifest["tasks"]["text"]["shards"] = []
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="text"):
        PackedLoader(str(copy), MixSchedule.constant(und=1, text=1))
    PackedLoader(str(copy), MixSchedule.constant(und=1))
    with pytest.raises(ValueError):
        PackedLoader(out, MixSchedule.constant(und=1), dp_rank=3, dp_world=3)
