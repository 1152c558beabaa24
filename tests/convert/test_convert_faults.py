"""``python -m pretrain.convert hf-llama-to-megatron`` (and the safetensors IO under every command) on
bad input: one ``error:`` line naming the file, key or option and what to do, exit 1, no traceback,
no output left behind; good input (float16/bfloat16, sharded) still converts bit-exactly.

Each case says what happened before the fix. The HF checkpoints are random tensors of the right
shapes (``hf_shapes`` of a tiny GQA config): no model is built.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

import pretrain.convert.state as state_module
from pretrain.convert.__main__ import main
from pretrain.convert.llama import hf_config_dict, hf_shapes, hf_to_megatron
from pretrain.convert.state import load_state, save_state
from pretrain.model.config import LLMConfig
from tests.conftest import one_error

CFG = LLMConfig(vocab_size=64, hidden_size=32, ffn_hidden_size=48, num_layers=2, num_attention_heads=8,
                num_query_groups=4)
SHARDS = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")


def hf_state() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {k: torch.randn(s, generator=gen) for k, s in hf_shapes(CFG).items()}


def hf_folder(folder, state=None, config=None):
    """An HF Llama folder: model.safetensors (``state``, default ``hf_state()``) and config.json."""
    folder.mkdir(parents=True, exist_ok=True)
    save_state(hf_state() if state is None else state, folder / "model.safetensors")
    text = config if isinstance(config, str) else json.dumps(config or hf_config_dict(CFG))
    (folder / "config.json").write_text(text)
    return folder


def sharded_folder(folder, state=None):
    """An HF Llama folder in two shards with its model.safetensors.index.json; returns the weight map."""
    state = hf_state() if state is None else state
    folder.mkdir(parents=True)
    keys = list(state)
    weight_map = {k: SHARDS[i >= len(keys) // 2] for i, k in enumerate(keys)}
    for shard in SHARDS:
        save_state({k: state[k] for k in keys if weight_map[k] == shard}, folder / shard)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps(hf_config_dict(CFG)))
    return weight_map


def convert(checkpoint, out, *extra) -> int:
    return main(["hf-llama-to-megatron", "--checkpoint", str(checkpoint), "--out", str(out), *extra])


def assert_converted(out, state) -> None:
    expected = {"llm." + k: v for k, v in hf_to_megatron(state, CFG).items()}
    got = load_state(out)
    assert got.keys() == expected.keys()
    for key in got:
        assert got[key].dtype == expected[key].dtype and torch.equal(got[key], expected[key]), key


# ---------------------------------------------------------------------------------------------
# weights
@pytest.mark.parametrize("key, value, says", [
    ("model.norm.weight", torch.full((32,), float("nan")), "holds NaN or inf values"),
    ("model.layers.1.mlp.up_proj.weight", torch.full((48, 32), float("-inf")), "holds NaN or inf values"),
    ("model.embed_tokens.weight", torch.ones(64, 32, dtype=torch.int8), "is torch.int8, not floating point"),
    ("model.layers.0.input_layernorm.weight", torch.ones(32, dtype=torch.int32), "is torch.int32, not floating"),
    ("model.norm.weight", torch.ones(32, dtype=torch.bool), "is torch.bool, not floating point"),
], ids=["nan", "inf", "int8", "int32", "bool"])
def test_bad_values_are_named_by_file_and_key(tmp_path, capsys, key, value, says):
    # Before: converted with exit 0, the NaN or integer tensor copied into the output as it was.
    folder = hf_folder(tmp_path / "hf", {**hf_state(), key: value})
    out = tmp_path / "llm.safetensors"
    assert convert(folder, out) == 1
    line = one_error(capsys)
    assert line.startswith(f"error: {folder / 'model.safetensors'}: tensor {key!r} ") and says in line, line
    assert not out.exists()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_converts_bit_exactly(tmp_path, dtype):
    state = {k: v.to(dtype) for k, v in hf_state().items()}
    out = tmp_path / "llm.safetensors"
    assert convert(hf_folder(tmp_path / "hf", state), out) == 0
    assert_converted(out, state)


def test_weights_not_matching_config_name_both_files(tmp_path, capsys):
    # Before: "error: HF Llama state: ..." without saying which checkpoint or which config.json.
    folder = hf_folder(tmp_path / "hf", config={**hf_config_dict(CFG), "intermediate_size": 50})
    assert convert(folder, tmp_path / "llm.safetensors") == 1
    line = one_error(capsys)
    assert line.startswith(f"error: {folder}: the weights do not match {folder / 'config.json'}; "), line
    assert not (tmp_path / "llm.safetensors").exists()


@pytest.mark.parametrize("layers", [3, 100_000])
def test_layer_count_not_matching_config_is_one_line(tmp_path, capsys, layers):
    # Before: every tensor of every absent layer listed: 9 lines per layer (a million layers took
    # a minute, 5 GB and 9 million lines of message).
    folder = hf_folder(tmp_path / "hf", config={**hf_config_dict(CFG), "num_hidden_layers": layers})
    assert convert(folder, tmp_path / "llm.safetensors") == 1
    assert capsys.readouterr().err.strip() == (
        f"error: {folder}: holds 2 layers (model.layers.N) but {folder / 'config.json'} says "
        f"num_hidden_layers={layers}: use the config.json of these weights")
    assert not (tmp_path / "llm.safetensors").exists()


# ---------------------------------------------------------------------------------------------
# checkpoint files and folders
def test_folder_named_like_a_shard_is_named(tmp_path, capsys):
    # Before: "error: <--out path>: No such device (os error 19)": the output was blamed.
    folder = hf_folder(tmp_path / "hf")
    (folder / "extra.safetensors").mkdir()
    out = tmp_path / "llm.safetensors"
    assert convert(folder, out) == 1
    assert one_error(capsys) == (f"error: {folder / 'extra.safetensors'}: a folder named like a checkpoint "
                                 "shard; move it out of the checkpoint folder")
    assert not out.exists()


def test_missing_checkpoint_is_named_as_such(tmp_path, capsys):
    # Before: "no config.json next to the checkpoint; pass --config", for a checkpoint that is not there.
    assert convert(tmp_path / "nowhere", tmp_path / "llm.safetensors") == 1
    assert one_error(capsys) == f"error: {tmp_path / 'nowhere'}: no such file or folder"


def test_sharded_folder_converts(tmp_path):
    sharded_folder(tmp_path / "hf")
    out = tmp_path / "llm.safetensors"
    assert convert(tmp_path / "hf", out) == 0
    assert_converted(out, hf_state())


def _drop_second_shard(folder, weight_map):
    (folder / SHARDS[1]).unlink()


def _move_one_key(folder, weight_map):
    # the index puts a tensor in the other shard than the one holding it (shards of two downloads)
    key = next(k for k, s in weight_map.items() if s == SHARDS[0])
    index = {"weight_map": {**weight_map, key: SHARDS[1]}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))


def _add_single_file(folder, weight_map):
    save_state(hf_state(), folder / "model.safetensors")


def _garble_index(folder, weight_map):
    (folder / "model.safetensors.index.json").write_text("{")


def _index_outside(folder, weight_map):
    index = {"weight_map": {**weight_map, "model.norm.weight": "../elsewhere.safetensors"}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))


@pytest.mark.parametrize("damage, file, says", [
    # before: 11 "missing" tensors, not the missing file
    (_drop_second_shard, "model.safetensors.index.json",
     f"names 1 shard(s) not in {{folder}}, e.g. {SHARDS[1]}: the download is incomplete"),
    # before: converted with exit 0
    (_move_one_key, SHARDS[0], f"holds tensor 'model.embed_tokens.weight', which the index puts in {SHARDS[1]}"),
    # before: "keys also in another shard", about a file that is no shard
    (_add_single_file, "model.safetensors", "not a shard named by model.safetensors.index.json"),
    # before: converted with exit 0 (the index was never read)
    (_garble_index, "model.safetensors.index.json", "not a readable checkpoint index"),
    (_index_outside, "model.safetensors.index.json", "names '../elsewhere.safetensors', not a .safetensors file"),
], ids=["missing-shard", "index-disagrees", "single-file-and-shards", "bad-index", "index-outside"])
def test_sharded_folder_faults_are_named(tmp_path, capsys, damage, file, says):
    folder = tmp_path / "hf"
    damage(folder, sharded_folder(folder))
    out = tmp_path / "llm.safetensors"
    assert convert(folder, out) == 1
    line = one_error(capsys)
    assert line.startswith(f"error: {folder / file}: ") and says.format(folder=folder) in line, line
    assert not out.exists()


def test_only_pickled_weights_are_refused(tmp_path, capsys):
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "pytorch_model.bin").write_bytes(b"not to be unpickled")
    (folder / "config.json").write_text(json.dumps(hf_config_dict(CFG)))
    assert convert(folder, tmp_path / "llm.safetensors") == 1
    assert one_error(capsys).startswith(f"error: {folder / 'pytorch_model.bin'}: only .safetensors checkpoints")


# ---------------------------------------------------------------------------------------------
# config.json
def _with(**changes) -> str:
    return json.dumps({**hf_config_dict(CFG), **changes})


@pytest.mark.parametrize("config, says", [
    # before: "language_config: expected a JSON object", a section an HF config.json does not have
    ("[1, 2]", "expected a JSON object (an HF Llama config.json), got a list"),
    # before: the last hidden_size won, and the error was 21 wrong shapes
    (_with()[:-1] + ', "hidden_size": 64}', "key 'hidden_size' is given more than once"),
    # before: a RecursionError traceback
    ("[" * 100_000 + "]" * 100_000, "not a config file (JSON nested too deeply)"),
    # before: converted with exit 0 (same tensor names and shapes, another architecture)
    (_with(model_type="mistral"), "model_type='mistral' (supported: 'llama')"),
    (_with(model_type="gemma"), "model_type='gemma' (supported: 'llama')"),
    # before: "not the expected layout ('str' object has no attribute 'get')"
    (_with(rope_scaling="linear"), "rope_scaling must be an object or null, got 'linear'"),
], ids=["list", "duplicate-key", "deep-nesting", "mistral", "gemma", "rope-scaling-string"])
def test_bad_config_json_is_named(tmp_path, capsys, config, says):
    folder = hf_folder(tmp_path / "hf", config=config)
    out = tmp_path / "llm.safetensors"
    assert convert(folder, out) == 1
    line = one_error(capsys)
    assert line.startswith(f"error: {folder / 'config.json'}: ") and says in line, line
    assert not out.exists()


def test_config_json_folder_is_named(tmp_path, capsys):
    # Before: "no config.json next to the checkpoint" though there is one (a folder).
    folder = hf_folder(tmp_path / "hf")
    (folder / "config.json").unlink()
    (folder / "config.json").mkdir()
    assert convert(folder, tmp_path / "llm.safetensors") == 1
    assert one_error(capsys) == f"error: {folder / 'config.json'}: a folder, not a JSON file"


# ---------------------------------------------------------------------------------------------
# outputs
def test_output_over_the_input_is_refused(tmp_path, capsys):
    # Before: the checkpoint file was overwritten by its conversion (exit 0), and an output in the
    # checkpoint folder became one more "shard" of it.
    folder = hf_folder(tmp_path / "hf")
    weights = folder / "model.safetensors"
    original = weights.read_bytes()
    link = tmp_path / "link.safetensors"
    os.symlink(weights, link)
    cases = [
        (weights, weights, "the checkpoint being converted; write to another file"),
        (weights, link, "the checkpoint being converted; write to another file"),
        (folder, folder / "llm.safetensors", f"inside the checkpoint folder {folder}; write it elsewhere"),
    ]
    for checkpoint, out, says in cases:
        assert convert(checkpoint, out) == 1
        assert one_error(capsys) == f"error: --out {out}: {says}"
    assert weights.read_bytes() == original and link.is_symlink()
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]


def test_failed_write_leaves_no_output(tmp_path, capsys, monkeypatch):
    # Before: save_file wrote the output in place, so a write cut short (a full disk, a kill) left a
    # truncated llm.safetensors behind, and an older complete one was destroyed.
    def cut_short(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"\x10\x00\x00\x00\x00\x00\x00\x00{")  # the start of a safetensors header
        raise OSError(28, "No space left on device", filename)

    folder = hf_folder(tmp_path / "hf")
    monkeypatch.setattr(state_module, "save_file", cut_short)
    out = tmp_path / "out" / "llm.safetensors"
    assert convert(folder, out) == 1
    assert "No space left on device" in one_error(capsys)
    assert list(out.parent.iterdir()) == []  # neither the output nor a temporary file
    out.write_bytes(b"an older complete conversion")
    assert convert(folder, out) == 1
    one_error(capsys)
    assert out.read_bytes() == b"an older complete conversion" and list(out.parent.iterdir()) == [out]


def test_output_is_written_whole_under_its_name(tmp_path):
    folder = hf_folder(tmp_path / "hf")
    out = tmp_path / "llm.safetensors"
    out.write_bytes(b"replaced")
    assert convert(folder, out) == 0
    assert_converted(out, hf_state())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "llm.safetensors"]


# ---------------------------------------------------------------------------------------------
# import-release reads through the same checks
def test_import_release_refuses_nan_weights(tmp_path, capsys):
    # Before: a released checkpoint holding NaN was imported (exit 0) into a state that trains to NaN.
    from pretrain.model.config import RepaConfig
    from tests.conftest import _tiny_model_config
    from tests.convert.test_release_errors import SIGLIP, import_args, released

    folder = tmp_path / "release"
    folder.mkdir()
    released(folder, _tiny_model_config(repa=RepaConfig(enabled=False, layer=2)))
    weights = folder / "model.safetensors"
    state = load_state(weights)
    key = next(iter(state))
    state[key] = torch.full_like(state[key], float("nan"))
    save_state(state, weights)
    (tmp_path / "siglip.json").write_text(json.dumps(SIGLIP))
    out = tmp_path / "ours.safetensors"
    assert main(import_args(folder, out, tmp_path / "siglip.json")) == 1
    assert one_error(capsys).startswith(f"error: {weights}: tensor {key!r} holds NaN or inf values")
    assert not out.exists()
    # and its output may not overwrite the release it reads
    assert main(import_args(weights, weights, tmp_path / "siglip.json")) == 1
    assert "the checkpoint being converted" in one_error(capsys)


def test_a_huge_config_json_is_refused_before_it_is_read(tmp_path, capsys):
    # Before: read whole into memory (a checkpoint passed as --config: gigabytes), then judged.
    folder = hf_folder(tmp_path / "hf")
    config = folder / "config.json"
    with open(config, "r+b") as file:
        file.truncate(17 << 20)  # sparse: no disk used
    assert convert(folder, tmp_path / "llm.safetensors") == 1
    assert one_error(capsys) == (f"error: {config}: 17 MiB, larger than a config file can be (16 MiB); "
                                 "give the model's config.json")
    assert not (tmp_path / "llm.safetensors").exists()
