"""Damaged builds at training time: a manifest, shard file or record that cannot be trained on is one
``ShardError`` line naming the file (and entry or row) and what to do, checked before the first step
where a stat can tell, never a traceback from pyarrow/PIL/numpy, and never trained on silently."""

import hashlib
import json
import os
import re
import shutil
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pytest

from datacontract.shards import MANIFEST_FORMAT, LAYOUT_KEY, ShardError, ShardLayout, ShardReader, encode_latent
from pretrain.data.batch import decode_row
from pretrain.data.loader import PackedLoader
from pretrain.data.step_mix import MixSchedule

MIX = MixSchedule.constant(und=0.4, gen=0.4, text=0.2)
VERIFY = "`python -m data_tools verify` on the build lists every such row: rebuild the shards"


@pytest.fixture
def root(built, tmp_path):
    """A private copy of the session's build (the tests damage it)."""
    out = tmp_path / "out"
    shutil.copytree(built[0], out)
    return out


def _manifest(root):
    return json.loads((root / "manifest.json").read_text())


def _edit_manifest(root, edit):
    m = _manifest(root)
    edit(m)
    (root / "manifest.json").write_text(json.dumps(m))


def _shard(root, task):
    return root / _manifest(root)["tasks"][task]["shards"][0]["path"]


def _take_all(loader):
    return sum(1 for _ in loader)


def _rewrite_rows(root, task, edit, table_edit=None):
    """Rewrite a task's first shard with ``edit(row)`` applied to every row (the manifest's size kept in
    step, so only the records differ)."""
    path = _shard(root, task)
    table = pa.ipc.open_file(pa.BufferReader(path.read_bytes())).read_all()
    rows = table.to_pylist()
    for r in rows:
        edit(r)
    table = pa.Table.from_pylist(rows, schema=table.schema)
    with pa.OSFile(str(path), "wb") as f, pa.ipc.new_file(f, table.schema) as w:
        w.write_table(table)
    _edit_manifest(root, lambda m: m["tasks"][task]["shards"][0].update(bytes=path.stat().st_size))
    return path


# ------------------------------------------------------------------------------ shard files, at start
def _truncate(p):
    p.write_bytes(p.read_bytes()[:100])


@pytest.mark.parametrize("damage, says", [
    (_truncate, "100 bytes, the manifest says {size} (cut short or replaced)"),
    (lambda p: p.write_bytes(b""), "0 bytes, the manifest says {size} (cut short or replaced)"),
    (lambda p: p.write_bytes(p.read_bytes() + b"\0"), "{more} bytes, the manifest says {size} (cut short or replaced)"),
    (os.remove, "listed in the manifest but no such file or directory"),
    (lambda p: (os.remove(p), os.mkdir(p)), "not a file"),
])
def test_a_shard_file_changed_since_the_build_fails_before_the_first_step(root, damage, says):
    path = _shard(root, "gen")
    size = path.stat().st_size
    damage(path)
    with pytest.raises(ShardError) as err:
        PackedLoader(str(root), MIX)
    assert str(err.value) == (f"{path}: {says.format(size=size, more=size + 1)}; `python -m data_tools verify {root}` "
                              "lists what is wrong; rebuild the shards")


def test_a_shard_replaced_by_another_tasks_shard_fails_before_the_first_step(root):
    und, text = _shard(root, "und"), _shard(root, "text")
    shutil.copy(text, und)
    with pytest.raises(ShardError, match=re.escape(f"{und}: {text.stat().st_size} bytes, the manifest says")):
        PackedLoader(str(root), MIX)


def test_only_the_shards_of_the_mixed_tasks_are_checked_and_stray_files_are_ignored(root):
    os.remove(_shard(root, "text"))
    (root / "und" / "shard-99999.arrow").write_bytes(b"not listed")
    assert _take_all(PackedLoader(str(root), MixSchedule.constant(und=1, gen=1), max_steps=3)) == 3


# ------------------------------------------------------------------------------ shard contents, when opened
def test_same_size_garbage_in_a_shard_is_one_line(root):
    path = _shard(root, "und")
    path.write_bytes(np.random.default_rng(0).bytes(path.stat().st_size))
    with pytest.raises(ShardError) as err:
        _take_all(PackedLoader(str(root), MixSchedule.constant(und=1), max_steps=1))
    assert str(err.value) == f"{path}: not a readable shard (ArrowInvalid: Not an Arrow file); rebuild the shards"


def test_a_shard_of_another_build_is_refused(root):
    path = _shard(root, "und")
    table = pa.ipc.open_file(pa.BufferReader(path.read_bytes())).read_all()
    meta = dict(table.schema.metadata)
    layout = json.loads(meta[LAYOUT_KEY.encode()])
    meta[LAYOUT_KEY.encode()] = json.dumps(dict(layout, resolution=2 * layout["resolution"])).encode()
    table = table.replace_schema_metadata(meta)
    with pa.OSFile(str(path), "wb") as f, pa.ipc.new_file(f, table.schema) as w:
        w.write_table(table)
    _edit_manifest(root, lambda m: m["tasks"]["und"]["shards"][0].update(bytes=path.stat().st_size))
    with pytest.raises(ShardError) as err:
        _take_all(PackedLoader(str(root), MixSchedule.constant(und=1), max_steps=1))
    assert str(err.value) == (f"{path}: written for another layout than the manifest's (a shard of another build?); "
                              "rebuild the shards")


@pytest.mark.parametrize("delta", [-1, 1, 40])
def test_a_row_count_that_disagrees_with_the_shard_is_refused(root, delta):
    path = _shard(root, "und")
    rows = ShardReader(str(path)).num_rows
    _edit_manifest(root, lambda m: m["tasks"]["und"]["shards"][0].update(rows=rows + delta))
    with pytest.raises(ShardError) as err:
        _take_all(PackedLoader(str(root), MixSchedule.constant(und=1), max_steps=1))
    assert str(err.value) == (f"{path}: {rows} rows, the manifest says {rows + delta} (a shard of another build?); "
                              "rebuild the shards")


def test_a_valid_arrow_file_of_another_schema_is_refused(root):
    path = _shard(root, "und")
    table = pa.table({"a": list(range(ShardReader(str(path)).num_rows))})
    with pa.OSFile(str(path), "wb") as f, pa.ipc.new_file(f, table.schema) as w:
        w.write_table(table)
    _edit_manifest(root, lambda m: m["tasks"]["und"]["shards"][0].update(bytes=path.stat().st_size))
    with pytest.raises(ShardError, match=re.escape(f"{path}: not a packed shard (columns input_ids, token_kind")):
        _take_all(PackedLoader(str(root), MixSchedule.constant(und=1), max_steps=1))


@pytest.mark.parametrize("layout", [b"\xff{not json", b"[1, 2]", b'{"seq_length": "x"}'])
def test_damaged_layout_metadata_in_a_shard_is_one_shard_error(root, layout):
    # Before: a bare UnicodeDecodeError / JSONDecodeError / TypeError from the footer's metadata.
    path = _shard(root, "und")
    table = ShardReader(str(path)).table
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), LAYOUT_KEY.encode(): layout})
    # Written beside it, then renamed: the table is memory-mapped from the old file.
    with pa.OSFile(str(path) + ".new", "wb") as f, pa.ipc.new_file(f, table.schema) as w:
        w.write_table(table)
    os.replace(str(path) + ".new", path)
    with pytest.raises(ShardError, match=re.escape(f"{path}: its layout metadata cannot be read (")):
        ShardReader(str(path))


# ------------------------------------------------------------------------------ the manifest
def _shard0(field, value):
    return lambda m: m["tasks"]["und"]["shards"][0].update({field: value})


@pytest.mark.parametrize("edit, says", [
    (lambda m: m.update(format="janusflow-packed/2"),
     f"format 'janusflow-packed/2', this trainer reads {MANIFEST_FORMAT!r}; rebuild the shards with this "
     "checkout's `python -m data_tools build`"),
    (lambda m: m.pop("format"), f"format None, this trainer reads {MANIFEST_FORMAT!r}"),
    (lambda m: m.pop("tasks"), "'tasks' must map und, gen, text to their shards, got NoneType"),
    (lambda m: m.update(tasks=[1]), "'tasks' must map und, gen, text to their shards, got list"),
    (lambda m: m["tasks"].update(video=m["tasks"]["und"]), "'tasks' must map und, gen, text to their shards, got "
                                                          "['gen', 'text', 'und', 'video']"),
    (lambda m: m["tasks"]["und"].update(shards={"a": 1}), "tasks.und.shards must be a list"),
    (_shard0("rows", -3), "tasks.und.shards[0].rows must be a whole number >= 0, got -3"),
    (_shard0("rows", "5"), "tasks.und.shards[0].rows must be a whole number >= 0, got '5'"),
    (_shard0("rows", 5.5), "tasks.und.shards[0].rows must be a whole number >= 0, got 5.5"),
    (_shard0("rows", None), "tasks.und.shards[0].rows must be a whole number >= 0, got None"),
    (_shard0("rows", 10 ** 30), "tasks.und.shards[0] says 1000000000000000000000000000000 rows in"),
    (_shard0("bytes", True), "tasks.und.shards[0].bytes must be a whole number >= 0, got True"),
    (_shard0("path", 7), "tasks.und.shards[0].path must be a file name, got 7"),
    (_shard0("path", "und/a\0b"), "tasks.und.shards[0].path must be a file name, got 'und/a\\x00b'"),
    (lambda m: m["tasks"]["und"]["shards"][0].pop("path"), "tasks.und.shards[0].path must be a file name, got None"),
    (_shard0("path", "/etc/hostname"), "tasks.und.shards[0].path '/etc/hostname' is outside {root}"),
    (_shard0("path", "../elsewhere/shard.arrow"), "tasks.und.shards[0].path '../elsewhere/shard.arrow' is outside "
                                                  "{root}"),
    (lambda m: m["tasks"]["und"]["shards"].append(m["tasks"]["und"]["shards"][0]),
     "tasks.und.shards[1] lists 'und/shard-00000.arrow' again (also tasks.und.shards[0])"),
    (lambda m: m["layout"].update(resolution="32px"),
     "its layout is damaged (ValueError: invalid literal for int() with base 10: '32px')"),
])
def test_a_damaged_manifest_is_one_line_naming_the_entry(root, edit, says):
    _edit_manifest(root, edit)
    with pytest.raises(ShardError) as err:
        PackedLoader(str(root), MIX)
    message = str(err.value)
    assert message.startswith(f"{root / 'manifest.json'}: {says.format(root=root)}"), message
    assert "rebuild the shards" in message and "\n" not in message


@pytest.mark.parametrize("text, says", [("{not json", "JSONDecodeError"), ("[1, 2]", "not a manifest (a JSON list)")])
def test_a_manifest_that_is_no_manifest_is_one_line(root, text, says):
    (root / "manifest.json").write_text(text)
    with pytest.raises(ShardError, match=re.escape(f"{root / 'manifest.json'}: ") + ".*" + re.escape(says)):
        PackedLoader(str(root), MIX)


def test_the_format_read_is_the_one_data_tools_writes():
    from data_tools.build import FORMAT_VERSION

    assert MANIFEST_FORMAT == FORMAT_VERSION


# ------------------------------------------------------------------------------ records
def _set_id(r):
    r["input_ids"][1] = 100000


def _longer(r):
    n = 400
    r["input_ids"] += [7] * n
    r["token_kind"] += [0] * n
    r["target_mask"] += [1] * n
    r["doc_lengths"].append(n)
    r["doc_tasks"].append(2)


def _big_image(r):
    from PIL import Image
    import io

    out = io.BytesIO()
    Image.new("RGB", (64, 48), (1, 2, 3)).save(out, "PNG")
    r["gen_images"][0] = out.getvalue()


@pytest.mark.parametrize("task, edit, says", [
    ("und", _set_id, r"token ids \d+\.\.100000 outside the model's vocabulary 0\.\.511; were the shards built with "
                     r"another tokenizer than the model's\?"),
    ("und", lambda r: r["input_ids"].__setitem__(1, -5), r"token ids -5\.\.\d+ outside the model's vocabulary 0\.\.511; were the "
                                                         r"shards built with another tokenizer than the model's\?"),
    ("und", lambda r: r["doc_lengths"].__setitem__(0, r["doc_lengths"][0] + 1),
     r"lengths disagree: input_ids (\d+), token_kind \1, target_mask \1, documents sum to \d+, (\d+) document "
     r"lengths for \2 tasks"),
    ("und", lambda r: (r["doc_lengths"].insert(0, 0), r["doc_tasks"].insert(0, 0)),
     r"document lengths \[0, .*\] \(each must be at least 1\)"),
    ("text", lambda r: r["token_kind"].__setitem__(1, 9), r"unknown token kind 9 \(format\.TokenKind has 0\.\.5\)"),
    ("text", lambda r: r["doc_tasks"].__setitem__(0, 7), r"unknown document task 7 \(format\.Task has 0\.\.2\)"),
    ("text", _longer, r"\d+ tokens, more than the layout's seq_length 256"),
    ("text", lambda r: r["input_ids"].__setitem__(0, None), r"input_ids is null or holds a null"),
    ("gen", lambda r: r["gen_images"].__setitem__(0, b"no image at all"),
     r"gen_images\[0\] is bytes that are no image \(UnidentifiedImageError\)"),
    ("gen", _big_image, r"gen_images\[0\] is a 64x48 image, the layout has 32x32"),
    ("gen", lambda r: r["gen_images"].pop(), r"0 understanding and \d+ generation images for 0 and \d+ image "
                                             r"slots \(4 and 4 per image\)"),
    ("und", lambda r: r["und_images"].append(r["und_images"][0]),
     r"\d+ understanding and 0 generation images for \d+ and 0 image slots \(4 and 4 per image\)"),
])
def test_a_bad_record_is_one_line_naming_its_file_and_row(root, task, edit, says, workers=0):
    path = _rewrite_rows(root, task, edit)
    loader = PackedLoader(str(root), MixSchedule.constant(**{task: 1}), max_steps=2, vocab_size=512,
                          num_workers=workers)
    with pytest.raises(ShardError) as err:
        _take_all(loader)
    message = str(err.value)
    assert re.fullmatch(re.escape(f"{path} row ") + r"\d+: " + says + re.escape(f"; {VERIFY}"), message), message


def test_a_bad_record_read_by_a_loader_worker_is_the_same_one_line(root):
    """Not torch's re-raise of the worker's exception (its traceback in the message)."""
    test_a_bad_record_is_one_line_naming_its_file_and_row(
        root, "gen", lambda r: r["gen_images"].__setitem__(0, b"no image at all"),
        r"gen_images\[0\] is bytes that are no image \(UnidentifiedImageError\)", workers=2)


def test_records_that_fit_the_layout_load_unchanged(root):
    """The checks refuse nothing a clean build holds (every row of every task, ids inside the tiny vocabulary)."""
    m = _manifest(root)
    layout = ShardLayout.from_json(m["layout"])
    for entry in m["tasks"].values():
        for shard in entry["shards"]:
            reader = ShardReader(str(root / shard["path"]), shard["rows"], layout)
            for i in range(reader.num_rows):
                decode_row(reader.read_row(i), layout, vocab_size=512)


def _latent_row(root, latents):
    path = _shard(root, "gen")
    raw = ShardReader(str(path)).read_row(0)
    raw["gen_latents"], raw["gen_latent_dtype"] = [encode_latent(z, "float16") for z in latents], "float16"
    layout = ShardLayout.from_json(dict(_manifest(root)["layout"], latent_shape=[4, 2, 2], latent_dtype="float16"))
    return raw, layout


def test_latents_must_be_finite_and_one_per_generation_image(root):
    raw, layout = _latent_row(root, [])
    n = len(raw["gen_images"])
    good = [np.full((4, 2, 2), 0.5, np.float32) for _ in range(n)]
    raw, layout = _latent_row(root, good)
    assert len(decode_row(raw, layout).gen_latents) == n
    bad = [z.copy() for z in good]
    bad[-1][1, 0, 1] = np.nan
    raw, layout = _latent_row(root, bad)
    with pytest.raises(ValueError, match=r"^a latent holds NaN or Inf$"):
        decode_row(raw, layout)
    raw, layout = _latent_row(root, good[:-1])
    with pytest.raises(ValueError, match=rf"^{n - 1} latents for {n} generation images$"):
        decode_row(raw, layout)


# ------------------------------------------------------------------------------ resuming
def test_resuming_on_shards_rebuilt_with_other_contents_is_refused(root):
    loader = PackedLoader(str(root), MIX, grad_accum_steps=2)
    it = iter(loader)
    for _ in range(3):
        next(it)
    state = loader.state_dict()
    # The same shards moved elsewhere (or rebuilt bit for bit) continue the stream.
    moved = root.parent / "moved"
    shutil.copytree(root, moved)
    again = PackedLoader(str(moved), MIX, grad_accum_steps=2)
    again.load_state_dict(state)
    # A checkpoint saved before the loader recorded its shards loads as before.
    PackedLoader(str(root), MIX, grad_accum_steps=2).load_state_dict({k: v for k, v in state.items() if k != "shards"})
    # Rebuilt with other contents: the und series is another one, the position in it means nothing.
    _edit_manifest(root, lambda m: m["tasks"]["und"]["shards"][0].update(sha256=hashlib.sha256(b"other").hexdigest()))
    with pytest.raises(ShardError) as err:
        PackedLoader(str(root), MIX, grad_accum_steps=2).load_state_dict(state)
    assert str(err.value) == (
        f"{root / 'manifest.json'}: the und shards are not those the checkpoint's data position counts in (rebuilt "
        "with other contents since?), so the run would not continue its data order; restore the shards it was "
        "trained on, or set data.resume_on_changed_shards=true to continue over these (a new order from the same "
        "counts)")
    # Asked for (data.resume_on_changed_shards): the same counts, continued over the new shards.
    continued = PackedLoader(str(root), MIX, grad_accum_steps=2)
    assert continued.load_state_dict(state, accept_changed_shards=True) == ["und"]
    assert continued.position.cursor.consumed == [int(c) for c in state["consumed"]]
    assert continued.position.cursor.step == state["step"]


# ------------------------------------------------------------------------------ the trainer's source
def test_the_trainer_gets_one_config_error_line(root, monkeypatch):
    from pretrain.model.config import ConfigError
    from pretrain.recipe import load_recipe
    from pretrain.train import sources
    from tests.launch_helpers import REPO

    monkeypatch.setattr(sources, "check_layout", lambda layout, recipe: None)  # the tiny build's images are smaller
    recipe = load_recipe(REPO / "recipes" / "tiny_cpu.yaml", [f"data.root={root}", "data.loader_workers=0"])
    world = recipe.validate_world(1)
    runtime = SimpleNamespace(dp_rank=0, dp_size=1, pp_rank=0)
    gen = _rewrite_rows(root, "gen", lambda r: r["gen_images"].__setitem__(0, b"junk"))
    source = sources.ShardSource(recipe, world, runtime)
    with pytest.raises(ConfigError) as err:
        for _ in range(4):
            source.next_step()
    assert re.fullmatch(re.escape(f"data.root: {gen} row ") + r"\d+: gen_images\[0\] is bytes that are no image "
                        r"\(UnidentifiedImageError\); " + re.escape(VERIFY), str(err.value))
    assert err.value.all_ranks is False  # only the rank that read the row knows: it says it
    os.remove(_shard(root, "text"))
    with pytest.raises(ConfigError) as err:
        sources.ShardSource(recipe, world, runtime)
    assert str(err.value).startswith(f"data.root: {_shard(root, 'text')}: listed in the manifest but no such file")
    assert getattr(err.value, "all_ranks", True) is True
