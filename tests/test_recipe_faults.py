"""Hostile recipes and overrides: each is one ``ConfigError`` line naming the file or key, never a
traceback, a silently changed value or a message that prints a whole (huge) value."""

from __future__ import annotations

from pathlib import Path

import pytest

from pretrain.model.config import ConfigError
from pretrain.recipe import MAX_RECIPE_BYTES, build_recipe, load_recipe

TINY = Path(__file__).resolve().parents[1] / "recipes" / "tiny_cpu.yaml"
TEXT = TINY.read_text()


def file_error(tmp_path: Path, text: str | bytes, *overrides: str) -> str:
    path = tmp_path / "recipe.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(ConfigError) as info:
        load_recipe(path, overrides)
    message = str(info.value)
    assert "\n" not in message, message
    return message.removeprefix(f"{path}: ")


def override_error(*overrides: str) -> str:
    with pytest.raises(ConfigError) as info:
        load_recipe(TINY, overrides)
    message = str(info.value)
    assert "\n" not in message, message
    return message


@pytest.mark.parametrize("text, says", [
    # PyYAML keeps the last of two equal keys: a pasted second optim block replaced the first.
    (TEXT + "\noptim:\n  lr: 5.0\n  warmup_steps: 0\n  steps: 3\n", "duplicate key 'optim': write each key once"),
    (TEXT.replace("  lr: 1.0e-3\n", "  lr: 1.0e-3\n  lr: 2.0e-3\n"), "duplicate key 'lr'"),
    (TEXT.replace("  lr: 1.0e-3\n", "  lr: 1.0e-3\n  'lr': 2.0e-3\n"), "duplicate key 'lr'"),
])
def test_a_key_written_twice_is_refused_with_its_line(tmp_path, text, says):
    message = file_error(tmp_path, text)
    assert message.startswith("not valid YAML: ") and says in message and " at line " in message, message


def test_a_merge_key_may_still_be_overridden_by_the_mapping(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text(TEXT + "\nloss:\n  <<: {ar_weight: 2.0, rf_weight: 3.0}\n  rf_weight: 0.5\n")
    recipe = load_recipe(path)
    assert (recipe.loss.ar_weight, recipe.loss.rf_weight) == (2.0, 0.5)


@pytest.mark.parametrize("old, new, value", [
    ("keep_last: 2", "keep_last: 010", "'010'"),  # YAML 1.1: octal 8
    ("steps: 20", "steps: 1:20", "'1:20'"),  # YAML 1.1: base 60, 80
    ("  lr: 1.0e-3", "  lr: 1:0.5", "'1:0.5'"),  # a base-60 float, 60.5
])
def test_octal_and_base_60_numbers_are_refused_not_read_as_other_values(tmp_path, old, new, value):
    message = file_error(tmp_path, TEXT.replace(old, new))
    assert message.startswith(f"not valid YAML: {value} reads as a YAML 1.1 octal or base-60 number"), message
    assert "write the number in plain decimal, or quote it for a string at line" in message


@pytest.mark.parametrize("override", ["optim.steps=010", "optim.steps=1:20"])
def test_octal_and_base_60_overrides_are_refused(override):
    assert override_error(override).startswith(
        f"optim.steps: the override value {override.split('=')[1]!r} is not valid YAML: ")
    # Plain decimal, hexadecimal and digit groups mean what they say.
    r = load_recipe(TINY, ["optim.steps=10", "train.keep_last=0x3", "train.save_interval=1_000", "optim.lr=0.5"])
    assert (r.optim.steps, r.train.keep_last, r.train.save_interval) == (10, 3, 1000)


def test_a_number_with_too_many_digits_is_one_line(tmp_path):
    # Python refuses int() of more than 4300 digits with a ValueError that escaped as a traceback.
    message = file_error(tmp_path, TEXT.replace("steps: 20", "steps: " + "9" * 5000))
    assert message == "not valid YAML: the number 99999999999999999999... has too many digits at line 21, column 10"
    message = override_error("optim.lr=" + "9" * 5000)
    assert message.startswith("optim.lr: the override value '999") and "has too many digits" in message
    assert len(message) < 300


def test_deep_nesting_is_one_line_not_a_recursion_error(tmp_path):
    deep = "[" * 5000 + "]" * 5000
    assert file_error(tmp_path, f"{TEXT}\nloss: {deep}\n") == "not valid YAML: nested too deeply"
    message = override_error(f"train.image_prompts={deep}")
    assert message.startswith("train.image_prompts: the override value '[[[") and message.endswith("nested too deeply")
    assert len(message) < 300
    deep_map = "{a: " * 3000 + "1" + "}" * 3000
    assert file_error(tmp_path, f"loss: {deep_map}\n") == "not valid YAML: nested too deeply"


def test_a_value_of_the_wrong_type_is_quoted_short(tmp_path):
    # A YAML alias bomb: 100 bytes of aliases make a list of 10**8 strings, printed whole before.
    bomb = "[" + ",".join(["&a0 [x,x,x,x,x,x,x,x,x,x]"] + [
        f"&a{i} [" + ",".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 8)]) + "]"
    message = file_error(tmp_path, TEXT.replace("stage: tiny_cpu", f"stage: {bomb}"))
    assert message.startswith("train.stage: expected a string, got [['x', 'x', 'x', 'x', ...], [[...]")
    assert message.endswith("(list)") and len(message) < 300, message
    message = override_error("optim.steps=" + "x" * 100_000)
    assert message == f"optim.steps: expected an int, got '{'x' * 27}...{'x' * 28}' (str)"


@pytest.mark.parametrize("text", ["", "\n\n", "# all commented out\n# optim: {lr: 1}\n", "---\n...\n"])
def test_an_empty_recipe_says_so(tmp_path, text):
    assert file_error(tmp_path, text) == "empty; a recipe sets at least parallel, optim, data and train"


def test_an_empty_recipe_path_is_not_the_current_folder():
    # Path("") is "."; an unset shell variable said "a folder, not a recipe file".
    for empty in ("", " "):
        with pytest.raises(ConfigError, match="^recipe: the path is empty; give a recipe file, e.g. recipes/tiny_cpu"):
            load_recipe(empty)


def test_a_huge_file_is_refused_before_it_is_parsed(tmp_path):
    big = TEXT + "#" * MAX_RECIPE_BYTES
    assert file_error(tmp_path, big) == "larger than 1 MiB; a recipe is a short YAML text file"
    assert MAX_RECIPE_BYTES == 1 << 20
    # The limit is on bytes read: /dev/zero, endless, is refused without filling the memory.
    with pytest.raises(ConfigError, match="^/dev/zero: larger than 1 MiB"):
        load_recipe("/dev/zero")


@pytest.mark.parametrize("override, says", [
    ("optim.steps={a: 1", "optim.steps: the override value '{a: 1' is not valid YAML: expected ',' or '}', but got "
                          "'<stream end>' at line 1, column 6"),
    ("optim.steps=a: b: c", "optim.steps: the override value 'a: b: c' is not valid YAML: mapping values are not "
                            "allowed here at line 1, column 5"),
    ("optim.steps=*a",
     "optim.steps: the override value '*a' is not valid YAML: found undefined alias 'a' at line 1, column 1"),
    ("optim.steps=3\n---\n4", "optim.steps: the override value '3\\n---\\n4' is not valid YAML: expected a single "
                              "document in the stream, but found another document at line 2, column 1"),
])
def test_an_override_that_is_not_yaml_is_one_line(override, says):
    assert override_error(override) == says


@pytest.mark.parametrize("override, says", [
    # Each of these was a ZeroDivisionError traceback.
    ("model.llm.num_query_groups=0", "model.llm.num_query_groups: must be positive, got 0"),
    ("model.und_encoder.patch_size=0", "model.und_encoder.patch_size: must be positive, got 0"),
    ("model.und_encoder.num_attention_heads=0", "model.und_encoder.num_attention_heads: must be positive, got 0"),
    ("model.gen_vision.patch_size=0", "model.gen_vision.patch_size: must be positive, got 0"),
    # Each of these was accepted and broke (or silently spoilt) the model later.
    ("model.llm.num_query_groups=-1", "model.llm.num_query_groups: must be positive, got -1"),
    ("model.llm.rope_theta=.nan", "model.llm.rope_theta: must be positive, got nan"),
    ("model.llm.norm_eps=-1e-6", "model.llm.norm_eps: must be positive, got -1e-06"),
    ("model.und_encoder.layer_norm_eps=0", "model.und_encoder.layer_norm_eps: must be positive, got 0.0"),
    ("model.und_encoder.hidden_size=-32", "model.und_encoder.hidden_size: must be positive, got -32"),
    ("model.gen_vision.latent_scale=.nan", "model.gen_vision.latent_scale: must be positive, got nan"),
    ("model.gen_vision.latent_scale=0", "model.gen_vision.latent_scale: must be positive, got 0.0"),
    ("model.gen_vision.channels=0", "model.gen_vision.channels: must be positive, got 0"),
    ("model.gen_vision.norm_eps=.inf", "model.gen_vision.norm_eps: must be positive, got inf"),
    ("model.repa.projector_hidden_size=0", "model.repa.projector_hidden_size: must be positive, got 0"),
    # "" is Path("."): it exists, so check_init_paths passed it and loading failed later.
    ("init.llm=''", "init.llm: must be a non-empty path, or null for none"),
    ("init.vae=' '", "init.vae: must be a non-empty path, or null for none"),
    ("train.init_from=''", "train.init_from: must be a non-empty path, or null for none"),
    ("data.root=''", "data.root: must be a non-empty path, or null for none"),
    # numpy's SeedSequence refuses negatives and torch 64-bit overflows: both at the first step.
    ("train.seed=-1", "train.seed: must be between 0 and 4294967295, got -1"),
    ("data.seed=-1", "data.seed: must be between 0 and 4294967295, got -1"),
    ("data.seed=4294967296", "data.seed: must be between 0 and 4294967295, got 4294967296"),
    # timedelta overflows past ~1.4e12 minutes, in the trainer's start.
    ("train.collective_timeout_minutes=10000000000000", "train.collective_timeout_minutes: must be from 1 to "
                                                        "10080 (a week)"),
    # 1e308 + 1e308 is inf, so every fraction was 0.
    ("data.ratio[0]={until_step: null, understanding: 1e308, generation: 1e308, text: 0}",
     "data.ratio[0]: weights sum to inf; write smaller ones (only their ratios count)"),
])
def test_values_that_would_break_the_run_later_fail_at_load(override, says):
    assert override_error(override) == says


def test_the_limits_themselves_are_accepted():
    r = load_recipe(TINY, ["train.seed=4294967295", "data.seed=0", "train.collective_timeout_minutes=10080",
                           "model.llm.num_query_groups=4", "data.ratio[0].text=1e300"])
    assert (r.train.seed, r.train.collective_timeout_minutes, r.model.llm.query_groups) == (4294967295, 10080, 4)
    assert build_recipe(r.to_dict()) == r
