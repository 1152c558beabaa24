"""The recipe loader: every shipped YAML loads, Table 1 is carried exactly, errors name their key."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from pretrain.model.config import ConfigError, ModelConfig
from pretrain.recipe import Recipe, WorldLayout, build_recipe, dump_recipe, load_recipe

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
ALL_YAMLS = sorted(RECIPES.glob("*.yaml"))


def tiny() -> dict:
    """The tiny CPU recipe as plain data, a valid base for the error cases."""
    return load_recipe(RECIPES / "tiny_cpu.yaml").to_dict()


def raises(data: dict, *overrides: str) -> str:
    with pytest.raises(ConfigError) as info:
        build_recipe(data, overrides)
    return str(info.value)


def test_recipes_exist():
    assert {p.name for p in ALL_YAMLS} >= {"stage1.yaml", "stage2.yaml", "stage3.yaml", "tiny_cpu.yaml"}


@pytest.mark.parametrize("path", ALL_YAMLS, ids=lambda p: p.name)
def test_every_recipe_loads_and_round_trips(path, tmp_path):
    recipe = load_recipe(path)
    assert isinstance(recipe, Recipe)
    assert load_recipe(path, ["optim.lr=0.5"]).optim.lr == 0.5
    out = tmp_path / "dumped.yaml"
    dump_recipe(recipe, out)
    assert load_recipe(out) == recipe
    assert build_recipe(recipe.to_dict()) == recipe


# Table 1: (lr, warm-up, steps, batch, ratio phases as (until_step, und, gen, text), trainable, init_from)
TABLE_1 = {
    "stage1": (1e-4, 2000, 10000, 512, [(None, 50, 50, 0)], "new_modules", None),
    "stage2": (
        1e-4, 0, 380000, 512, [(10000, 30, 50, 20), (None, 14, 80, 6)], "all_but_und_encoder", "runs/stage1"
    ),
    "stage3": (2e-5, 1000, 26000, 256, [(None, 21, 70, 9)], "all", "runs/stage2"),
}


@pytest.mark.parametrize("stage", sorted(TABLE_1))
def test_stage_recipes_carry_table_1(stage):
    lr, warmup, steps, batch, phases, trainable, init_from = TABLE_1[stage]
    r = load_recipe(RECIPES / f"{stage}.yaml")
    assert (r.optim.lr, r.optim.warmup_steps, r.optim.steps) == (lr, warmup, steps)
    assert r.parallel.global_batch_size == batch
    assert [(p.until_step, p.understanding, p.generation, p.text) for p in r.data.ratio] == phases
    assert r.optim.schedule == "constant"
    assert r.optim.betas == (0.9, 0.95)
    assert (r.optim.weight_decay, r.optim.grad_clip) == (0.0, 1.0)
    assert (r.train.ema_decay, r.train.precision, r.train.trainable) == (0.99, "bf16", trainable)
    assert (r.data.seq_length, r.data.resolution, r.data.prompt_drop_prob) == (4096, 384, 0.1)
    assert r.model == ModelConfig()
    assert r.train.init_from == init_from
    assert r.train.stage == stage
    if stage == "stage1":
        assert r.init.llm and r.init.siglip and r.init.vae


def test_stage2_ratio_schedule_switches_at_10000():
    data = load_recipe(RECIPES / "stage2.yaml").data
    assert data.ratio_at(0) == pytest.approx({"understanding": 0.3, "generation": 0.5, "text": 0.2})
    assert data.ratio_at(9999) == data.ratio_at(0)
    assert data.ratio_at(10000) == pytest.approx({"understanding": 0.14, "generation": 0.8, "text": 0.06})
    assert data.ratio_at(379999) == data.ratio_at(10000)


def test_overrides_scalars_nested_lists_and_indices():
    r = load_recipe(
        RECIPES / "stage3.yaml",
        [
            "optim.lr=3e-5",  # exponent without a dot still reads as a float
            "parallel.tensor_parallel=2",
            "model.llm.num_layers=12",
            "optim.betas=[0.9, 0.99]",
            "data.root=builds/mix",
            "data.ratio[0].text=0",
            "train.init_from=null",
            "init.janusflow=weights/janusflow-1.3b",
            "loss.repa_weight=0.5",
        ],
    )
    assert r.optim.lr == 3e-5 and isinstance(r.optim.lr, float)
    assert r.parallel.tensor_parallel == 2
    assert r.model.llm.num_layers == 12
    assert r.optim.betas == (0.9, 0.99)
    assert r.data.root == "builds/mix"
    assert r.data.ratio[0].text == 0.0
    assert r.train.init_from is None and r.init.janusflow == "weights/janusflow-1.3b"
    assert r.loss.repa_weight == 0.5
    whole = (
        "data.ratio=[{until_step: 5, understanding: 1, generation: 1, text: 0},"
        " {until_step: null, understanding: 0, generation: 1, text: 0}]"
    )
    r = build_recipe(tiny(), [whole, "data.ratio.1.text=1"])
    assert r.data.ratio_at(4) == {"understanding": 0.5, "generation": 0.5, "text": 0.0}
    assert r.data.ratio_at(5) == {"understanding": 0.0, "generation": 0.5, "text": 0.5}
    # A later override wins; ints are accepted for floats.
    assert build_recipe(tiny(), ["optim.lr=1", "optim.lr=2"]).optim.lr == 2.0


@pytest.mark.parametrize(
    "override, key, words",
    [
        ("optim.lr=abc", "optim.lr", "expected a float, got 'abc'"),
        ("parallel.tensor_paralel=2", "parallel.tensor_paralel", "did you mean tensor_parallel?"),
        ("optm.lr=1", "optm", "did you mean optim?"),
        ("parallel.micro_batch_size=true", "parallel.micro_batch_size", "expected an int"),
        ("parallel.global_batch_size=4.0", "parallel.global_batch_size", "expected an int"),
        ("model.repa.enabled=1", "model.repa.enabled", "expected a bool"),
        ("train.stage=7", "train.stage", "expected a string"),
        ("train.precision=fp16", "train.precision", "'bf16'"),
        ("train.trainable=everything", "train.trainable", "'new_modules'"),
        ("optim.schedule=cosine", "optim.schedule", "'constant'"),
        ("optim.betas=[0.9]", "optim.betas", "list of 2"),
        ("data.root=[a, b]", "data.root", "expected a string"),
        ("data.loader_workers=-1", "data.loader_workers", "between 0 and 64"),
        ("data.loader_workers=200", "data.loader_workers", "between 0 and 64 (processes per rank; 2-8 keep a GPU fed), got 200"),
        ("data.ratio[0].understanding=x", "data.ratio[0].understanding", "expected a float"),
        ("data.ratio[0].speech=1", "data.ratio[0].speech", "unknown key"),
        ("data.ratio[3].text=1", "data.ratio[3]", "list of 1"),
        ("optim.lr.x=1", "optim.lr.x", "cannot index optim.lr (float)"),
        ("optim[0]=1", "optim[0]", "cannot index optim (dict)"),
        ("optim.lr", "optim.lr", "key=value"),
        ("model.llm.num_attention_heads=3", "model.llm.num_attention_heads", "must divide hidden_size"),
    ],
)
def test_type_and_key_errors_name_the_dotted_key(override, key, words):
    message = raises(tiny(), override)
    assert message.startswith(key) and words in message


def test_unknown_and_missing_keys_in_the_file(tmp_path):
    data = tiny()
    data["loss"]["rf_wieght"] = 1.0
    assert "loss.rf_wieght: unknown key; did you mean rf_weight?" in raises(data)
    data = tiny()
    del data["optim"]["lr"]
    assert raises(data).startswith("optim.lr: missing")
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**tiny(), "optim": 3}))
    with pytest.raises(ConfigError, match="^optim: expected a mapping"):
        load_recipe(bad)


@pytest.mark.parametrize(
    "overrides, key, words",
    [
        (["parallel.tensor_parallel=3"], "parallel.tensor_parallel", "model.llm.num_attention_heads=4"),
        (
            ["model.llm.num_query_groups=2", "parallel.tensor_parallel=4"],
            "parallel.tensor_parallel",
            "model.llm.num_query_groups=2",
        ),
        (["parallel.pipeline_parallel=3"], "parallel.pipeline_parallel", "model.llm.num_layers=4"),
        (["parallel.pipeline_parallel=2", "parallel.zero_stage=2"], "parallel.zero_stage", "use zero_stage 1"),
        (["parallel.zero_stage=4"], "parallel.zero_stage", "0, 1, 2 or 3"),
        (["parallel.micro_batch_size=3"], "parallel.global_batch_size", "micro_batch_size=3"),
        (["data.ratio[0].text=-1"], "data.ratio[0].text", "finite number >= 0"),
        (["data.ratio[0].text=.inf"], "data.ratio[0].text", "finite number >= 0, got inf"),
        (["data.ratio[0].generation=.nan"], "data.ratio[0].generation", "finite number >= 0, got nan"),
        (
            ["data.ratio=[{until_step: null, understanding: 0, generation: 0, text: 0}]"],
            "data.ratio[0]",
            "all be 0",
        ),
        (["data.ratio=[]"], "data.ratio", "at least one phase"),
        (["data.ratio[0].until_step=10"], "data.ratio[0].until_step", "last phase"),
        (
            [
                "data.ratio=[{until_step: 10, understanding: 1, generation: 1, text: 1},"
                " {until_step: 10, understanding: 1, generation: 1, text: 1},"
                " {until_step: null, understanding: 1, generation: 1, text: 1}]"
            ],
            "data.ratio[1].until_step",
            "greater than 10",
        ),
        (
            [
                "data.ratio=[{until_step: null, understanding: 1, generation: 1, text: 1},"
                " {until_step: null, understanding: 1, generation: 1, text: 1}]"
            ],
            "data.ratio[0].until_step",
            "only the last phase is null",
        ),
        (["data.resolution=64"], "data.resolution", "model.und_encoder.image_size=32"),
        (["data.seq_length=16"], "data.seq_length", "must exceed"),
        (["data.prompt_drop_prob=1"], "data.prompt_drop_prob", "[0, 1)"),
        (["optim.warmup_steps=21"], "optim.warmup_steps", "optim.steps=20"),
        (["optim.decay_steps=19"], "optim.decay_steps", "optim.steps - optim.warmup_steps = 18"),
        (["optim.decay_steps=-1"], "optim.decay_steps", "between 0 and"),
        (["optim.lr=0"], "optim.lr", "finite number > 0"),
        (["optim.lr=.inf"], "optim.lr", "finite number > 0, got inf"),
        (["optim.lr=.nan"], "optim.lr", "finite number > 0, got nan"),
        (["optim.grad_clip=.inf"], "optim.grad_clip", "finite number > 0"),
        (["optim.weight_decay=.nan"], "optim.weight_decay", "finite number >= 0"),
        (["train.ema_decay=1"], "train.ema_decay", "[0, 1)"),
        (["loss.rf_weight=-1"], "loss.rf_weight", "finite number >= 0"),
        (["loss.repa_weight=.inf"], "loss.repa_weight", "finite number >= 0, got inf"),
        (["loss.rf_time_std=0"], "loss.rf_time_std", "finite number > 0, got 0"),
        (["loss.rf_time_mean=.nan"], "loss.rf_time_mean", "must be finite, got nan"),
        (["train.init_from=runs/stage1/latest", "init.llm=weights/llm"], "train.init_from", "set only one"),
    ],
)
def test_invariants_fail_at_load_with_the_dotted_key(overrides, key, words):
    message = raises(tiny(), *overrides)
    assert message.startswith(key) and words in message


def test_validate_world_derives_data_parallel_and_accumulation():
    r = load_recipe(RECIPES / "stage2.yaml", ["parallel.tensor_parallel=2", "parallel.pipeline_parallel=2"])
    assert r.validate_world(64) == WorldLayout(
        world_size=64,
        tensor_parallel=2,
        pipeline_parallel=2,
        data_parallel=16,
        micro_batch_size=1,
        grad_accum_steps=32,
    )
    r = load_recipe(RECIPES / "stage3.yaml", ["parallel.micro_batch_size=4"])
    layout = r.validate_world(64)
    assert (layout.data_parallel, layout.grad_accum_steps) == (64, 1)
    assert layout.micro_batch_size * layout.data_parallel * layout.grad_accum_steps == 256
    with pytest.raises(ConfigError, match=r"^parallel.tensor_parallel: .* = 4 must divide the world size 6"):
        load_recipe(RECIPES / "stage2.yaml", ["parallel.tensor_parallel=4"]).validate_world(6)
    with pytest.raises(ConfigError, match=r"^parallel.global_batch_size: 256 must be a multiple of .* = 24"):
        load_recipe(RECIPES / "stage3.yaml").validate_world(24)


def test_check_init_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = load_recipe(RECIPES / "stage1.yaml", ["init.siglip=null", "init.vae=null"])
    with pytest.raises(ConfigError, match=r"^init.llm: .*local paths only.*hub id"):
        r.check_init_paths()
    (tmp_path / "weights" / "deepseek-llm-1.3b").mkdir(parents=True)
    r.check_init_paths()
    r = load_recipe(RECIPES / "stage2.yaml", ["init.vae=null"])
    with pytest.raises(ConfigError, match=r"^train.init_from: 'runs/stage1' does not exist"):
        r.check_init_paths()


def test_recipe_is_frozen_and_replace_revalidates():
    r = load_recipe(RECIPES / "tiny_cpu.yaml")
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.optim = None  # type: ignore[misc]
    with pytest.raises(ConfigError, match="^parallel.tensor_parallel"):
        dataclasses.replace(r, parallel=dataclasses.replace(r.parallel, tensor_parallel=3))


# Janus-Pro, Table 2 (the same for 1B and 7B except stage 3's steps): (lr, warm-up, steps, batch,
# ratio in the paper's order und:text:gen, trainable, init_from of the next stages)
TABLE_2 = {
    1: (1e-3, 600, {"1b": 20000, "7b": 20000}, 256, (1, 0, 3), "new_modules"),
    2: (1e-4, 5000, {"1b": 360000, "7b": 360000}, 512, (2, 3, 5), "all_but_und_encoder"),
    3: (4e-5, 0, {"1b": 80000, "7b": 40000}, 128, (5, 1, 4), "all"),
}
# Sec. 2 / 3.1 and the released configs: DeepSeek-LLM shapes, vocabulary 102,400.
JANUSPRO_LLM = {"1b": (2048, 5632, 24, 16), "7b": (4096, 11008, 30, 32)}
# "16/32 nodes ... each equipped with 8 Nvidia A100 (40GB) GPUs" (Sec. 3.1).
PAPER_GPUS = {"1b": 16 * 8, "7b": 32 * 8}


@pytest.mark.parametrize("size", ["1b", "7b"])
@pytest.mark.parametrize("stage", sorted(TABLE_2))
def test_januspro_recipes_carry_table_2(size, stage):
    lr, warmup, steps, batch, (und, text, gen), trainable = TABLE_2[stage]
    r = load_recipe(RECIPES / f"januspro_{size}_stage{stage}.yaml")
    assert (r.optim.lr, r.optim.warmup_steps, r.optim.steps, r.optim.schedule) == (lr, warmup, steps[size], "constant")
    assert (r.optim.betas, r.optim.weight_decay, r.optim.grad_clip) == ((0.9, 0.95), 0.0, 1.0)
    assert r.parallel.global_batch_size == batch
    assert [(p.until_step, p.understanding, p.text, p.generation) for p in r.data.ratio] == [(None, und, text, gen)]
    assert (r.data.seq_length, r.data.resolution) == (4096, 384)
    assert r.train.trainable == trainable
    assert r.train.init_from == (None if stage == 1 else f"runs/januspro_{size}_stage{stage - 1}")
    assert r.train.output_dir == f"runs/januspro_{size}_stage{stage}"
    if stage == 1:
        assert r.init.llm and r.init.siglip and not r.init.januspro
    m = r.model
    assert m.family == "januspro"
    hidden, ffn, layers, heads = JANUSPRO_LLM[size]
    assert (m.llm.vocab_size, m.llm.hidden_size, m.llm.ffn_hidden_size, m.llm.num_layers,
            m.llm.num_attention_heads, m.llm.query_groups) == (102400, hidden, ffn, layers, heads, heads)
    # SigLIP-L/16 at 384 (576 patches); VQ-16: codebook 16,384, 8-d, downsample 16 -> 24 x 24 = 576 codes.
    assert (m.und_encoder.image_size, m.und_encoder.patch_size, m.und_encoder.num_image_tokens) == (384, 16, 576)
    assert (m.image_tokens.codebook_size, m.image_tokens.embed_dim, m.image_tokens.num_codes(384)) == (16384, 8, 576)
    world = r.validate_world(PAPER_GPUS[size])
    if size == "7b":
        assert (r.parallel.tensor_parallel, world.data_parallel) == (2, 128) and r.parallel.zero_stage >= 1
    else:
        assert world.data_parallel == 128
    assert world.grad_accum_steps == batch // 128


def test_januspro_7b_pipeline_variant_validates():
    r = load_recipe(RECIPES / "januspro_7b_stage2.yaml", ["parallel.pipeline_parallel=2", "parallel.zero_stage=1"])
    world = r.validate_world(256)
    assert (world.tensor_parallel, world.pipeline_parallel, world.data_parallel, world.grad_accum_steps) == (2, 2, 64, 8)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_janusflow_7b_recipes_are_table_1_on_the_7b_llm(stage):
    small = load_recipe(RECIPES / f"stage{stage}.yaml")
    big = load_recipe(RECIPES / f"janusflow_7b_stage{stage}.yaml")
    llm = big.model.llm
    assert big.model.family == "janusflow"
    assert (llm.hidden_size, llm.num_layers, llm.num_attention_heads, llm.ffn_hidden_size, llm.vocab_size) == (
        4096, 30, 32, 11008, 102400)
    assert (big.model.und_encoder, big.model.gen_vision) == (small.model.und_encoder, small.model.gen_vision)
    assert (big.optim, big.data, big.loss) == (small.optim, small.data, small.loss)
    assert big.train.trainable == small.train.trainable
    assert big.parallel.tensor_parallel == 2
    assert big.train.init_from == (None if stage == 1 else f"runs/janusflow_7b_stage{stage - 1}")
    world = big.validate_world(256)
    assert (world.data_parallel, world.grad_accum_steps) == (128, big.parallel.global_batch_size // 128)


@pytest.mark.parametrize("content, says", [
    (b"\xff\xfemodel:", "not UTF-8 text (byte 0)"),
    (b"model: {llm: {num_layers: 2}\n", "not valid YAML: expected ',' or '}', but got '<stream end>' at line 2"),
    (b"model:\n  llm: [1, 2\n  x: 3\n", "not valid YAML"),
    (b"model:\n\tllm: 1\n", "not valid YAML: found character '\\t' that cannot start any token at line 2"),
])
def test_an_unreadable_recipe_file_is_one_line_naming_it(tmp_path, content, says):
    path = tmp_path / "recipe.yaml"
    path.write_bytes(content)
    with pytest.raises(ConfigError) as err:
        load_recipe(path)
    message = str(err.value)
    assert message.startswith(f"{path}: ") and says in message and "\n" not in message, message


def test_a_folder_named_as_the_recipe_is_a_config_error(tmp_path):
    (tmp_path / "recipe.yaml").mkdir()
    with pytest.raises(ConfigError, match="a folder, not a recipe file"):
        load_recipe(tmp_path / "recipe.yaml")
