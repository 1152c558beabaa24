"""Bad input to ``python -m pretrain.sample`` and ``python -m pretrain.chat``: one ``error:`` line naming
the file or option, a non-zero exit, no traceback, and nothing written.

Each case once reached a traceback after minutes of loading, or worse exited 0 with black images or
an empty answer. The CLIs run in this process (``main(argv)``) on the tiny checkpoints of
``conftest.cli_files``; files to damage are copies under ``tmp_path``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import shutil

import pytest
import torch

from pretrain.chat import main as chat_main
from pretrain.sample.__main__ import main as sample_main
from tests.conftest import one_error


def run(main, argv) -> int:
    """The exit code of ``main(argv)``, whether returned or raised by argparse (``parser.error``)."""
    try:
        return main([str(a) for a in argv])
    except SystemExit as stop:
        return stop.code


def sample_args(root, tok, out, checkpoint=None):
    return ["--checkpoint", checkpoint or root / "ours" / "model.safetensors", "--tokenizer", tok, "--vae",
            root / "vae", "--steps", "1", "--prompt", "a red cat", "--prompt", "a cup", "--out", out]


def chat_args(root, tok, checkpoint=None):
    return ["--checkpoint", checkpoint or root / "ours" / "model.safetensors", "--tokenizer", tok,
            "--image", root / "image.png", "--question", "What is it?", "--max-new-tokens", "2"]


def both(root, tok, out, checkpoint=None):
    """(main, argv) of each CLI on the same checkpoint."""
    return [(sample_main, sample_args(root, tok, out, checkpoint)), (chat_main, chat_args(root, tok, checkpoint))]


# ---------------------------------------------------------------------------------------------
# options
NO_CUDA = ("cuda", "CUDA is not available") if not torch.cuda.is_available() else ("cuda:99", "CUDA device(s)")
COMMON_OPTIONS = [
    (["--seed", "-1"], "--seed: -1 must be between 0 and 4294967295"),
    (["--seed", str(2**64)], "--seed: 18446744073709551616 must be between 0"),
    (["--latent-size", "0"], "--latent-size: 0 must be at least 1"),
    (["--device", "bogus"], "--device bogus: not a device"),
    (["--device", "meta"], "--device meta: only cpu and cuda"),
    (["--device", NO_CUDA[0]], NO_CUDA[1]),
    (["--temperature", "nan"], "--temperature: nan is not a finite number"),
    (["--temperature", "-1", "--top-p", "0.9"], "--temperature"),
    (["--top-p", "nan"], "--top-p: nan is not a finite number"),
    (["--top-p", "0"], "--top-p"),
    (["--top-p", "1.5"], "--top-p"),
]
SAMPLE_OPTIONS = [
    (["--cfg", "nan"], "--cfg: nan is not a finite number"),
    (["--cfg", "inf"], "--cfg: inf is not a finite number"),
    (["--cfg=-inf"], "--cfg: -inf is not a finite number"),
    (["--cfg", "lots"], "--cfg: 'lots' is not a number"),
    (["--temperature", "inf"], "--temperature: inf is not a finite number"),
]
CHAT_OPTIONS = [
    (["--temperature", "-1", "--top-p", "0.9"], "--temperature: -1.0 must be >= 0"),
    (["--temperature", "inf", "--top-p", "0.9"], "--temperature: inf is not a finite number"),
    (["--top-p", "-0.5"], "--top-p: -0.5 must be in (0, 1]"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be at least 1"),
    # greedy decoding (no --top-p) used to ignore a temperature without a word
    (["--temperature", "0.7"], "--temperature applies to nucleus sampling: give --top-p too"),
    (["--temperature", "0"], "--temperature applies to nucleus sampling: give --top-p too"),
]


@pytest.mark.parametrize("extra, says", COMMON_OPTIONS + SAMPLE_OPTIONS)
def test_sample_refuses_unusable_option_values(cli_files, tmp_path, capsys, extra, says):
    root, tok = cli_files
    assert run(sample_main, sample_args(root, tok, tmp_path / "out") + extra) == 2
    assert says in one_error(capsys)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("extra, says", COMMON_OPTIONS + CHAT_OPTIONS)
def test_chat_refuses_unusable_option_values(cli_files, capsys, extra, says):
    root, tok = cli_files
    assert run(chat_main, chat_args(root, tok) + extra) == 2
    assert says in one_error(capsys)


def test_chat_names_a_missing_image_before_loading(cli_files, tmp_path, capsys, monkeypatch):
    root, tok = cli_files
    monkeypatch.setattr("pretrain.sample.loading.load_model_from_args", _never_loaded)
    args = chat_args(root, tok)
    args[args.index("--image") + 1] = tmp_path / "none.png"
    assert run(chat_main, args) == 1
    assert f"--image {tmp_path / 'none.png'}: no such file" in one_error(capsys)


def _never_loaded(args):
    raise AssertionError("the model was loaded although an option was already known to be wrong")


# ---------------------------------------------------------------------------------------------
# weights and checkpoint files
def _state_with(tiny_model, key, value):
    from pretrain.convert.state import full_model_state

    state = {k: v.clone() for k, v in full_model_state(tiny_model).items()}
    state[key].view(-1)[0] = value
    return state


@pytest.mark.parametrize("key, value", [
    ("llm.decoder.final_layernorm.weight", math.nan),
    ("gen_dec_aligner.weight", math.inf),
    ("und_encoder.tower.post_layernorm.bias", -math.inf),
])
def test_non_finite_weights_are_named_not_sampled(cli_files, tiny_model, tmp_path, capsys, key, value):
    # Before: a black PNG (sample) or an empty answer (chat), exit 0.
    from pretrain.convert.state import save_state

    root, tok = cli_files
    bad = tmp_path / "bad.safetensors"
    meta = {"model_config": json.dumps(dataclasses.asdict(tiny_model.cfg))}
    save_state(_state_with(tiny_model, key, value), bad, meta)
    for main, argv in both(root, tok, tmp_path / "out", bad):
        assert run(main, argv) == 1
        assert f"error: {bad}: tensor '{key}' holds NaN or inf values" in one_error(capsys)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("damage", ["empty", "truncated", "not safetensors"])
def test_damaged_checkpoint_files_are_named(cli_files, tmp_path, capsys, damage):
    root, tok = cli_files
    data = (root / "ours" / "model.safetensors").read_bytes()
    bad = tmp_path / "model.safetensors"
    damaged = {"empty": b"", "truncated": data[: len(data) // 2], "not safetensors": b"<html>404</html>" * 8}
    bad.write_bytes(damaged[damage])
    for main, argv in both(root, tok, tmp_path / "out", bad):
        assert run(main, argv) == 1
        line = one_error(capsys)
        assert f"error: {bad}: unreadable (truncated or damaged" in line and "re-export or re-download it" in line
    assert not (tmp_path / "out").exists()


def test_damaged_shard_and_missing_checkpoints_are_named(cli_files, tmp_path, capsys):
    root, tok = cli_files
    shards = tmp_path / "shards"
    shards.mkdir()
    shutil.copy(root / "ours" / "model.safetensors", shards / "a.safetensors")
    (shards / "b.safetensors").write_bytes((shards / "a.safetensors").read_bytes()[:100])
    cases = [(shards, f"{shards / 'b.safetensors'}: unreadable (truncated or damaged"),
             (tmp_path / "none.safetensors", f"{tmp_path / 'none.safetensors'}: no such file or folder"),
             (tmp_path / "no_folder", f"{tmp_path / 'no_folder'}: no such file or folder")]
    for checkpoint, says in cases:
        for main, argv in both(root, tok, tmp_path / "out", checkpoint):
            assert run(main, argv) == 1
            assert says in one_error(capsys)


# ---------------------------------------------------------------------------------------------
# tokenizers
@pytest.fixture(scope="module")
def small_vocab_checkpoint(runtime, tmp_path_factory):
    """Our state of a tiny JanusFlow whose vocabulary (256) is smaller than the test tokenizer's."""
    from pretrain.convert.state import full_model_state, save_state
    from pretrain.model.janusflow import JanusFlowModel
    from tests.conftest import _tiny_model_config

    cfg = _tiny_model_config()
    assert cfg.llm.vocab_size == 256
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("small_vocab") / "model.safetensors"
    save_state(full_model_state(JanusFlowModel(cfg)), path, {"model_config": json.dumps(dataclasses.asdict(cfg))})
    return path


def test_a_tokenizer_larger_than_the_vocabulary_is_refused(cli_files, small_vocab_checkpoint, tmp_path, capsys):
    # Before: IndexError deep in the embedding lookup.
    root, tok = cli_files
    for main, argv in both(root, tok, tmp_path / "out", small_vocab_checkpoint):
        assert run(main, argv) == 1
        assert re.search(rf"error: tokenizer {re.escape(str(tok))} has \d+ tokens but the model's vocabulary is 256",
                         one_error(capsys))
    assert not (tmp_path / "out").exists()


def test_no_tokenizer_in_the_default_folder_says_pass_tokenizer(cli_files, tmp_path, capsys):
    root, tok = cli_files
    for main, argv in both(root, tok, tmp_path / "out"):
        i = argv.index("--tokenizer")
        del argv[i:i + 2]
        assert run(main, argv) == 1
        assert f"error: {root / 'ours'}: no tokenizer (tokenizer.json); pass --tokenizer" in one_error(capsys)


@pytest.mark.parametrize("contents, says", [
    ("{", "tokenizer.json: not valid JSON"),
    ("", "tokenizer.json: not valid JSON"),
    ("[]", "the tokenizer cannot be loaded"),
    ('{"model": {"type": "BPE"}}', "the tokenizer cannot be loaded"),
    (None, "no tokenizer (tokenizer.json)"),  # an empty folder
])
def test_broken_tokenizer_files_are_named(cli_files, tmp_path, capsys, contents, says):
    root, tok = cli_files
    bad = tmp_path / "tok"
    if contents is None:
        bad.mkdir()
    else:
        shutil.copytree(tok, bad)
        (bad / "tokenizer.json").write_text(contents)
    for main, argv in both(root, bad, tmp_path / "out"):
        assert run(main, argv) == 1
        line = one_error(capsys)
        assert f"error: {bad}" in line and says in line and "pass --tokenizer" not in line


# ---------------------------------------------------------------------------------------------
# config.json, --config, --siglip
def _release_copy(root, tmp_path, config_text):
    folder = tmp_path / "release"
    folder.mkdir()
    shutil.copy(root / "release" / "model.safetensors", folder / "model.safetensors")
    (folder / "config.json").write_text(config_text)
    return folder


def _edited_config(root, edit):
    config = json.loads((root / "release" / "config.json").read_text())
    edit(config)
    return json.dumps(config)


CONFIG_CASES = [
    (lambda root: "{", "not valid JSON (Expecting property name"),
    (lambda root: "[]", "expected a JSON object (an official config.json), got a list"),
    (lambda root: "{}", "missing key 'language_config'"),
    (lambda root: _edited_config(root, lambda c: c.pop("vision_gen_enc_config")),
     "missing key 'vision_gen_enc_config'"),
    (lambda root: _edited_config(root, lambda c: c["vision_und_enc_config"].pop("params")),
     "missing key 'vision_und_enc_config.params'"),
    (lambda root: _edited_config(root, lambda c: c["language_config"].update(hidden_size="64")),
     'language_config.hidden_size must be an integer >= 1, got "64"'),
    (lambda root: _edited_config(root, lambda c: c["vision_gen_dec_config"].update(params=[])),
     "vision_gen_dec_config.params: expected a JSON object, got a list"),
    (lambda root: _edited_config(root, lambda c: c["vision_gen_enc_config"]["params"].update(stride=0)),
     "vision_gen_enc_config.params.stride must be an integer >= 1, got 0"),
    (lambda root: _edited_config(root, lambda c: c["vision_und_enc_config"]["params"].pop("model_name")),
     "missing key 'model_name'"),
]


@pytest.mark.parametrize("config, says", CONFIG_CASES)
def test_bad_config_json_is_named(cli_files, tmp_path, capsys, config, says):
    root, tok = cli_files
    folder = _release_copy(root, tmp_path, config(root))
    argv = sample_args(root, tok, tmp_path / "out", folder) + ["--siglip", root / "siglip.json", "--latent-size", "8"]
    assert run(sample_main, argv) == 1
    line = one_error(capsys)
    assert f"error: {folder / 'config.json'}: " in line and says in line
    assert not (tmp_path / "out").exists()


def test_config_paths_are_named_as_given(cli_files, tmp_path, capsys):
    root, tok = cli_files
    # --config was passed: the message must not ask for it
    missing = tmp_path / "nonexist.json"
    bare = sample_args(root, tok, tmp_path / "out", root / "bare.safetensors")
    assert run(sample_main, bare + ["--config", missing]) == 1
    assert one_error(capsys).endswith(f"error: --config {missing}: no such file")
    # a released folder without its config.json
    folder = tmp_path / "release"
    folder.mkdir()
    shutil.copy(root / "release" / "model.safetensors", folder / "model.safetensors")
    assert run(sample_main, sample_args(root, tok, tmp_path / "out", folder)) == 1
    assert "no config.json next to the released checkpoint; pass --config" in one_error(capsys)
    # a recipe YAML that is not a mapping
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("[1, 2]\n")
    assert run(sample_main, bare + ["--config", recipe]) == 1
    assert f"error: {recipe}: " in one_error(capsys)


@pytest.mark.parametrize("siglip, says", [
    ("{", "not valid JSON"),
    ("[]", "expected a SigLIP entry"),
    ("{}", "got an empty object"),
    ('{"siglip_tiny": {"image_size": 32, "patch_size": 8, "width": 32, "heads": 2, "mlp_ratio": 2}}',
     "siglip_tiny: missing 'layers'"),
    ('{"image_size": 32, "patch_size": 8, "width": "32", "layers": 2, "heads": 2, "mlp_ratio": 2}',
     'width must be a positive integer, got "32"'),
    ('{"siglip_tiny": 3}', "siglip_tiny: expected a SigLIP entry"),
])
def test_bad_siglip_file_is_named(cli_files, tmp_path, capsys, siglip, says):
    root, tok = cli_files
    path = tmp_path / "siglip.json"
    path.write_text(siglip)
    argv = sample_args(root, tok, tmp_path / "out", root / "release") + ["--siglip", path, "--latent-size", "8"]
    assert run(sample_main, argv) == 1
    line = one_error(capsys)
    assert f"error: {path}" in line and says in line


# ---------------------------------------------------------------------------------------------
# model_config metadata written by another version of the code
def _set(section, key, value):
    return lambda c: c[section].update({key: value})


@pytest.mark.parametrize("edit, says", [
    (_set("llm", "bogus", 1), "model_config.llm: unknown key 'bogus'"),
    (_set("llm", "hidden_size", "64"), 'model_config.llm.hidden_size: expected int, got "64"'),
    (_set("llm", "num_layers", 2.5), "model_config.llm.num_layers: expected int, got 2.5"),
    (_set("gen_vision", "latent_scale", None), "model_config.gen_vision.latent_scale: expected float, got null"),
    (_set("repa", "enabled", 1), "model_config.repa.enabled: expected bool, got 1"),
    (_set("llm", "vocab_size", 0), "model.llm.vocab_size: must be positive"),
    (lambda c: c.update(llm=[1]), "model_config.llm: expected an object"),
    (lambda c: c.update(extra={}), "model_config: unknown sections ['extra']"),
    (lambda c: c.update(family=3), "model_config.family: expected str"),
    ("{not json", "the model_config metadata is not valid JSON"),
])
def test_foreign_model_config_metadata_is_named(cli_files, tiny_model, tmp_path, capsys, edit, says):
    from pretrain.convert.state import full_model_state, save_state

    root, tok = cli_files
    meta = dataclasses.asdict(tiny_model.cfg)
    if isinstance(edit, str):
        text = edit
    else:
        edit(meta)
        text = json.dumps(meta)
    bad = save_state(full_model_state(tiny_model), tmp_path / "model.safetensors", {"model_config": text})
    for main, argv in both(root, tok, tmp_path / "out", bad):
        assert run(main, argv) == 1
        assert f"error: {bad}: {says}" in one_error(capsys)


# ---------------------------------------------------------------------------------------------
# outputs
def test_unwritable_outputs_are_refused_before_loading(cli_files, tmp_path, capsys, monkeypatch):
    root, tok = cli_files
    monkeypatch.setattr("pretrain.sample.loading.load_model_from_args", _never_loaded)
    a_file = tmp_path / "a_file"
    a_file.write_text("kept")
    in_the_way = tmp_path / "in_the_way"
    (in_the_way / "001.png").mkdir(parents=True)
    latents_dir = tmp_path / "latents_dir"
    (latents_dir / "latents.safetensors").mkdir(parents=True)
    cases = [
        (a_file, [], f"--out {a_file}: an existing file"),
        (a_file / "sub", [], f"--out {a_file / 'sub'}: {a_file} is a file, so no folder can be made under it"),
        (in_the_way, [], f"{in_the_way / '001.png'} is a folder"),
        (latents_dir, ["--save-latents"], f"{latents_dir / 'latents.safetensors'} is a folder"),
    ]
    for out, extra, says in cases:
        assert run(sample_main, sample_args(root, tok, out) + extra) == 1
        assert says in one_error(capsys)
    assert a_file.read_text() == "kept" and sorted(p.name for p in in_the_way.iterdir()) == ["001.png"]


def test_a_failed_write_is_one_line(cli_files, tmp_path, capsys, monkeypatch):
    from PIL import Image

    def full_disk(self, fp, *args, **kwargs):
        raise OSError(28, "No space left on device", str(fp))

    monkeypatch.setattr(Image.Image, "save", full_disk)
    root, tok = cli_files
    assert run(sample_main, sample_args(root, tok, tmp_path / "out")) == 1
    assert f"error: {tmp_path / 'out' / '000.png'}: No space left on device" in one_error(capsys)


def test_non_finite_latents_are_not_written(cli_files, tmp_path, capsys):
    # A finite but huge --cfg overflows float32: the latents become NaN, which used to be saved as
    # black images with exit 0.
    root, tok = cli_files
    out = tmp_path / "out"
    extra = ["--cfg", "1e300", "--save-latents", "--batch-size", "1"]
    assert run(sample_main, sample_args(root, tok, out) + extra) == 1
    assert "the sampled latents of prompt 0 hold NaN or inf values; nothing was written" in one_error(capsys)
    assert not out.exists() or not any(out.iterdir())


def test_save_png_refuses_non_finite_images(tmp_path):
    from pretrain.sample.decode import NonFiniteError, save_png

    images = torch.rand(2, 3, 4, 4)
    images[1, 0, 0, 0] = math.nan
    with pytest.raises(NonFiniteError, match="hold NaN or inf"):
        save_png(images, [tmp_path / "a.png", tmp_path / "b.png"])
    assert list(tmp_path.iterdir()) == []
