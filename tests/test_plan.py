"""The planner: counts come from the shapes, FLOPs follow the stated rules, memory and GPU-days
behave as they must, the schedule matches the paper's token count, and the CLI prints its headlines.
Run with ``-s`` to see the stage-2 plan."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
from torch import nn

from pretrain.convert.state import full_state_shapes
from pretrain.model.config import ModelConfig
from pretrain.paper_budgets import PAPER_TOKENS
from pretrain.plan import (
    GPUS, SCHEDULE, TASKS, DocumentModel, Gradients, MatmulSizes, SequenceShape, build_plan, count_parameters,
    lm_training_flops, main, sequence_flops,
)
from pretrain.recipe import load_recipe
from tests.conftest import one_error
from tests.launch_helpers import REPO, child_env


@pytest.fixture(scope="module")
def stage2():
    return load_recipe(SCHEDULE[1])


@pytest.fixture(scope="module")
def plan(stage2):
    return build_plan(stage2, gpus=256, gpu="a100", mfu=0.4)


def test_tokens_equal_the_paper_formula(plan):
    assert plan.total_tokens == (10_000 * 512 + 380_000 * 512 + 26_000 * 256) * 4_096 == PAPER_TOKENS
    assert plan.total_tokens == 845_152_256_000
    assert [s.tokens for s in plan.schedule] == [10_000 * 512 * 4096, 380_000 * 512 * 4096, 26_000 * 256 * 4096]


def test_parameter_counts_come_from_the_shapes(plan):
    shapes = full_state_shapes(ModelConfig())
    assert sum(plan.params.values()) == sum(math.prod(s) for s in shapes.values())
    p = plan.params
    assert p["llm_blocks"] + p["llm_embed_output"] == 1_652_656_128  # tests/model/test_param_counts.py
    assert p["llm_embed_output"] == 2 * 102_400 * 2_048
    assert p["siglip"] == 303_688_704
    assert p["gen_encoder"] + p["gen_decoder"] == 75_326_224
    assert p["repa"] == 10_490_880
    # Stage 2 trains everything but SigLIP.
    assert plan.trainable_params["siglip"] == 0
    assert sum(plan.trainable_params.values()) == sum(p.values()) - p["siglip"]


@pytest.mark.parametrize("family", ["janusflow", "januspro"])
def test_trainable_sets_match_the_model(runtime, family):
    """The planner's parameter counts per trainable set agree with what the model trains."""
    from pretrain.model.janusflow import JanusFlowModel
    from pretrain.model.januspro import JanusProModel

    cfg = ModelConfig(family=family)
    with torch.device("meta"):
        model = (JanusProModel if family == "januspro" else JanusFlowModel)(cfg)
    for trainable in ("new_modules", "all_but_und_encoder", "all"):
        model.set_trainable(trainable)
        expected = sum(p.numel() for p in model.parameters() if p.requires_grad)
        assert sum(count_parameters(cfg, trainable).values()) == expected, trainable


def _module_macs(*modules: nn.Module) -> int:
    return sum(m.weight.numel() for mod in modules for m in mod.modules() if isinstance(m, (nn.Linear, nn.Conv2d)))


def test_matmul_sizes_agree_with_the_modules():
    """Reading matmuls off the shapes finds exactly the Linear/Conv2d weights of the modules."""
    from pretrain.model.gen_vision import GenerationDecoder, GenerationEncoder
    from pretrain.model.und_vision import RepaProjector, UnderstandingEncoder

    cfg = ModelConfig()
    sizes = MatmulSizes.from_config(cfg)
    h, f, llm = cfg.llm.hidden_size, cfg.llm.ffn_hidden_size, cfg.llm
    assert sizes.llm_per_token == llm.num_layers * (h * 3 * h + h * h + 3 * h * f)  # MHA, SwiGLU
    with torch.device("meta"):
        assert sizes.siglip_per_patch == _module_macs(UnderstandingEncoder(cfg.und_encoder))
        gen = _module_macs(GenerationEncoder(cfg.gen_vision, h), GenerationDecoder(cfg.gen_vision, h),
                           nn.Linear(cfg.gen_vision.channels, h), nn.Linear(h, cfg.gen_vision.channels))
        assert sizes.gen_per_position + sizes.gen_per_image == gen
        assert sizes.repa_per_position == _module_macs(RepaProjector(h, cfg.repa.projector_hidden_size, 1024))
    # Per image, not per position: the time embedding MLP and each block's time modulation.
    assert sizes.gen_per_image == 768 * h + h * h + 2 * (h * 2 * 768) + 2 * (h * 2 * 1536)
    # The first layers, reading data: SigLIP's 16x16 RGB patches -> 1,024; the encoder's 2x2 patches of
    # the 4-channel latent -> 768; the 768 sinusoidal features of t -> H. The aligner reads SigLIP (1,024).
    assert (sizes.siglip_first_per_patch, sizes.gen_first_per_position, sizes.gen_first_per_image) == (
        1024 * 3 * 16 * 16, 768 * 4 * 2 * 2, 768 * h)
    assert sizes.und_aligner_first_per_patch == sizes.und_aligner_per_patch == 1024 * h


def test_flops_follow_the_stated_rules():
    cfg = ModelConfig()
    sizes = MatmulSizes.from_config(cfg)
    n, width, layers = sizes.llm_per_token, 2048, 24
    text = SequenceShape(4096, (4096,), 0, 0, 4095)
    stage2 = sequence_flops(cfg, sizes, Gradients.for_trainable("all_but_und_encoder"), text)
    assert stage2["llm_blocks"] == 6 * n * 4096
    assert stage2["llm_attention"] == 3 * 4 * (4096 * 4097 // 2) * width * layers  # causal pairs
    assert stage2["output_layer"] == 6 * 102_400 * 2048 * 4095  # at the targets only
    # Stage 1: LLM frozen, but the gradient still flows back through it (4N, no weight gradients).
    gen = SequenceShape(4096, (650,) * 6 + (196,), 0, 6, 195)
    stage1 = sequence_flops(cfg, sizes, Gradients.for_trainable("new_modules"), gen)
    assert stage1["llm_blocks"] == 4 * n * 4096
    assert stage1["output_layer"] == 4 * 102_400 * 2048 * 195
    # SigLIP for REPA targets is forward only in every stage; on understanding images it trains in stage 3 only.
    fwd = 2 * sizes.siglip_per_patch * 576 + 4 * 576**2 * 1024 * 24
    assert stage1["siglip_repa"] == 6 * fwd
    und = SequenceShape(4096, (700,) * 5 + (596,), 5, 0, 895)
    s2 = sequence_flops(cfg, sizes, Gradients.for_trainable("all_but_und_encoder"), und)
    s3 = sequence_flops(cfg, sizes, Gradients.for_trainable("all"), und)
    assert s2["siglip_und"] == 5 * fwd
    # Trained, SigLIP costs 3x its forward, less the input gradient of its patch embedding (pixels).
    assert s3["siglip_und"] == 5 * (3 * fwd - 2 * (1024 * 3 * 16 * 16) * 576)
    # The aligner (one layer) back-propagates into SigLIP only where SigLIP trains.
    assert (s2["und_aligner"], s3["und_aligner"]) == (5 * 4 * 1024 * 2048 * 576, 5 * 6 * 1024 * 2048 * 576)
    # Generation modules train in every stage (6x), but in_conv reads z_t (576 positions) and the time
    # embedding's first layer the sinusoidal features of t (once per image): no input gradient (4x).
    assert stage1["gen_modules"] == 6 * (6 * (sizes.gen_per_position * 576 + sizes.gen_per_image)
                                         - 2 * (768 * 4 * 2 * 2 * 576 + 768 * 2048))
    # A plain LM of the same size (the benchmark's baseline) costs the LLM parts alone.
    assert lm_training_flops(cfg.llm, 4096, (4096,), 4095) == (
        stage2["llm_blocks"] + stage2["llm_attention"] + stage2["output_layer"])


def test_typical_documents_cost_less_attention_than_the_upper_bound(plan):
    for task in plan.sequences:
        assert plan.sequence_flops[task]["llm_attention"] < plan.sequence_flops_upper[task]["llm_attention"]
    assert plan.stage.flops_per_token < plan.stage.flops_per_token_upper
    seq = plan.sequences["generation"]
    assert seq.tokens == sum(seq.doc_lengths) == 4096 and seq.gen_images == 6  # 650-token documents


def test_memory_shrinks_with_zero_stage_and_data_parallelism(stage2):
    totals = [m.total for m in build_plan(stage2, 256).memory]
    assert totals[0] > totals[1] > totals[2] > totals[3]
    for zero in (0, 1, 2, 3):
        by_dp = [build_plan(stage2, gpus, zero=zero).memory[zero] for gpus in (16, 64, 256)]
        assert [m.data_parallel for m in by_dp] == [16, 64, 256]
        t = [m.total for m in by_dp]
        if zero == 0:  # nothing is partitioned: data parallelism only replicates
            assert t[0] == t[1] == t[2]
        else:
            assert t[0] > t[1] > t[2]
    m = build_plan(stage2, 256).memory[1]
    assert m.total_recompute < m.total
    assert build_plan(stage2, 256, tp=2).memory[1].total < m.total
    assert not build_plan(stage2, 256, pp=2).memory[2].allowed  # DeepSpeed's pipeline engine: ZeRO <= 1


def test_gpu_days_scale_as_one_over_mfu(stage2):
    a, b = build_plan(stage2, 256, mfu=0.2), build_plan(stage2, 256, mfu=0.4)
    assert a.gpu_days(a.total_flops) == pytest.approx(2 * b.gpu_days(b.total_flops), rel=1e-12)
    h100 = build_plan(stage2, 256, gpu="h100", mfu=0.4)
    assert h100.gpu_days(h100.total_flops) == pytest.approx(b.gpu_days(b.total_flops) * 312 / 989, rel=1e-12)


def test_paper_gpu_days_correspond_to_a_low_mfu(plan):
    """The three stages cost ~7.2e21 model FLOPs (~8.5 GFLOP per token: 6N = 7.4 for the LLM
    blocks, plus SigLIP on ~6 images per sequence, attention, the output layer at the targets and
    the generation modules). 1,600 A100-days at 312 TFLOP/s are 4.3e22 FLOPs, so the paper's figure
    implies an MFU of about 0.17 (0.19 if every document's attention spanned 4,096): below the
    0.2-0.6 one might guess. Either the HAI-LLM runs used the A100s at ~17% (plausible for a model
    of width 2,048 with two vision towers and image decoding in the step), or the figure covers
    more than the forward/backward of the three stages."""
    mfu = plan.mfu_for_gpu_days()
    assert 0.14 < mfu < 0.20
    assert 0.14 < plan.mfu_for_gpu_days(upper=True) < 0.22
    assert plan.gpu_days(plan.total_flops, mfu=mfu, gpu=GPUS["a100"]) == pytest.approx(1600, rel=1e-9)
    assert 6.5e21 < plan.total_flops < 8e21
    per_token = [s.flops_per_token / 1e9 for s in plan.schedule]
    assert per_token[0] < per_token[1]  # stage 1 skips the LLM's weight gradients
    assert 8.0 < per_token[1] < 9.5


def _schedule_rows(out: str) -> dict[str, list[str]]:
    table = out.split("Schedule: GPU-days")[1].split("with attention at")[0].splitlines()[2:]
    return {row.split()[0]: row.split() for row in table if row.startswith("  stage") or row.startswith("  total")}


def test_wall_clock_days_only_where_the_stage_fits_the_gpus(capsys, stage2):
    """Stage 3's 256 sequences per step cannot be split over 512 data-parallel ranks: it has GPU-days but
    no wall-clock days on 512 GPUs in TP1 PP1 (before, 22 GPU-days / 512 = 0.04 days, a run that cannot
    start), and neither has the total. With --tp 2 it runs on 256 data-parallel ranks and has them."""
    assert main(["--recipe", str(SCHEDULE[1]), "--gpus", "512"]) == 0
    out = capsys.readouterr().out
    rows = _schedule_rows(out)
    assert [rows[s][-1] for s in ("stage1", "stage2", "stage3", "total")] == ["0.02", "1.23", "n/a", "n/a"]
    assert rows["stage3"][-2] == "22"  # its GPU-days still stand
    assert ("n/a: stage3 does not fit 512 GPUs in this layout, so it has no wall-clock days there (its GPU-days "
            "hold; a larger --tp or --pp may fit it): parallel.global_batch_size: 256 must be a multiple of "
            "micro_batch_size x data_parallel = 1 x 512 = 512") in out
    plan = build_plan(stage2, 512)
    assert plan.schedule_misfits[:2] == [None, None] and "256 must be a multiple" in plan.schedule_misfits[2]
    assert main(["--recipe", str(SCHEDULE[1]), "--gpus", "512", "--tp", "2"]) == 0
    out = capsys.readouterr().out
    rows = _schedule_rows(out)
    days = [float(rows[s][-1]) for s in ("stage1", "stage2", "stage3", "total")]
    gpu_days = [float(rows[s][-2].replace(",", "")) for s in ("stage1", "stage2", "stage3", "total")]
    assert days == pytest.approx([d / 512 for d in gpu_days], abs=0.03)  # cells rounded to whole GPU-days
    assert "n/a" not in out.split("Schedule: GPU-days")[1]


def test_tiny_recipe_plans():
    """The benchmark plans the tiny recipe (sequences of 256 tokens, images of 16 tokens)."""
    tiny = load_recipe(REPO / "recipes" / "tiny_cpu.yaml")
    p = build_plan(tiny, 1, schedule=[tiny], docs=DocumentModel())
    assert p.stage.seq_length == 256 and p.stage.flops_per_token > 0
    assert p.sequences["understanding"].und_images == 256 // (16 + 2 + 122)


def test_cli_prints_the_headlines(capsys):
    assert main(["--recipe", str(SCHEDULE[1]), "--gpus", "256", "--gpu", "a100", "--mfu", "0.4",
                 "--tp", "1", "--pp", "1", "--zero", "1"]) == 0
    out = capsys.readouterr().out
    print(out)
    for headline in ("Parameters (from full_state_shapes)", "Training FLOPs per packed sequence",
                     "FLOPs per token, stage mix", "Memory per GPU", "Schedule: GPU-days",
                     "845,152,256,000", "1,600 A100 GPU-days is reproduced at MFU"):
        assert headline in out, headline
    assert "equals (10,000x512 + 380,000x512 + 26,000x256) x 4,096" in out


def test_cli_rejects_a_layout_the_recipe_cannot_use(capsys):
    assert main(["--gpus", "3"]) == 2  # 512 sequences cannot be split over 3 data-parallel ranks
    assert "parallel.global_batch_size" in capsys.readouterr().err


def test_cli_help_is_a_real_argparse_help():
    proc = subprocess.run([sys.executable, "-m", "pretrain.plan", "--help"], cwd=REPO, env=child_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0
    assert "--gpus" in proc.stdout and "--mfu" in proc.stdout and "--zero" in proc.stdout
    assert "GPU kind: peak bf16 FLOP/s and memory (default a100)" in " ".join(proc.stdout.split())


# Refused while parsing, before any recipe is read: a plan from these would divide by zero, or print
# NaN, negative or inf GPU-days with exit 0.
@pytest.mark.parametrize("argv, says", [
    (["--gpus", "0"], "argument --gpus: 0 must be at least 1"),
    (["--gpus", "-8"], "argument --gpus: -8 must be at least 1"),
    (["--gpus", "1e12"], "argument --gpus: '1e12' is not a whole number"),
    (["--gpus", "8", "--mfu", "0"], "argument --mfu: '0' is not a utilisation in (0, 1] (e.g. 0.4)"),
    (["--gpus", "8", "--mfu", "-0.3"], "argument --mfu: '-0.3' is not a utilisation in (0, 1] (e.g. 0.4)"),
    (["--gpus", "8", "--mfu", "1.5"], "argument --mfu: '1.5' is not a utilisation in (0, 1] (e.g. 0.4)"),
    (["--gpus", "8", "--mfu", "nan"], "argument --mfu: 'nan' is not a utilisation in (0, 1] (e.g. 0.4)"),
    (["--gpus", "8", "--mfu", "inf"], "argument --mfu: 'inf' is not a utilisation in (0, 1] (e.g. 0.4)"),
    (["--gpus", "8", "--mfu", "abc"], "argument --mfu: 'abc' is not a utilisation in (0, 1] (e.g. 0.4)"),
    (["--papers", "--mfu", "0"], "argument --mfu: '0' is not a utilisation in (0, 1] (e.g. 0.4)"),  # was a traceback
    (["--papers", "--mfu", "nan"], "argument --mfu: 'nan' is not a utilisation in (0, 1] (e.g. 0.4)"),  # was nan days
    (["--papers", "--mfu", "-1"], "argument --mfu: '-1' is not a utilisation in (0, 1] (e.g. 0.4)"),  # was -266 days
    (["--gpus", "8", "--balance-steps", "-3"], "argument --balance-steps: -3 must be at least 0"),
    (["--gpus", "8", "--text-doc-tokens", "0"], "argument --text-doc-tokens: 0 must be at least 1"),
    (["--gpus", "8", "--text-doc-tokens", "-1"], "argument --text-doc-tokens: -1 must be at least 1"),
    (["--gpus", "8", "--und-text-tokens", "-5"], "argument --und-text-tokens: -5 must be at least 0"),
    (["--gpus", "8", "--und-text-tokens", "-578"], "argument --und-text-tokens: -578 must be at least 0"),
    (["--gpus", "8", "--gen-text-tokens", "-72"], "argument --gen-text-tokens: -72 must be at least 0"),
    (["--gpus", "8", "--und-answer-tokens", "500"], "argument --und-answer-tokens: 500 must be at most "
                                                    "--und-text-tokens (122)"),
    (["--papers", "--gpus", "64", "--recipe", "x.yaml", "--set", "optim.lr=1", "--tp", "2"],
     "argument --papers: it costs the papers' own recipes and layouts, so --recipe, --set, --gpus, --tp would be "
     "ignored; drop them, or leave out --papers to plan a recipe"),
])
def test_cli_refuses_bad_options_with_one_error_line(capsys, argv, says):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert one_error(capsys) == f"pretrain.plan: error: {says}"
    assert capsys.readouterr().out == ""


def test_cli_papers_takes_its_own_options(capsys):
    from pretrain.paper_budgets import paper_budgets

    assert main(["--papers", "--mfu", "0.2", "--und-text-tokens", "100"]) == 0
    assert "A100-days @ MFU 0.20" in capsys.readouterr().out
    with pytest.raises(ValueError, match=r"^mfu: 0 must be in \(0, 1\]$"):  # the library, as build_plan
        paper_budgets(mfu=0)


@pytest.mark.parametrize("option", ["--recipe", "--schedule"])
@pytest.mark.parametrize("name, why", [("missing.yaml", "No such file or directory"),
                                       ("a" * 300 + ".yaml", "File name too long")])
def test_cli_names_the_option_of_a_recipe_it_cannot_read(capsys, tmp_path, option, name, why):
    path = tmp_path / name
    assert main(["--gpus", "8", "--balance-steps", "0", option, str(path)]) == 2
    assert one_error(capsys) == (f"error: {option}: cannot read {path} ({why}); give a recipe YAML such as "
                                 "recipes/stage2.yaml")


def test_cli_papers_keeps_stderr_quiet():
    """The Janus-Pro shapes import megatron-core, whose start-up warnings say nothing a planner's user
    can act on (pretrain.runtime.quiet): stderr stays empty."""
    proc = subprocess.run([sys.executable, "-m", "pretrain.plan", "--papers"], cwd=REPO, env=child_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    assert "Janus-Pro-7B" in proc.stdout


def test_work_balance_equals_a_brute_force_count_over_ranks():
    """The planner's imbalance figures, recomputed by asking each (micro-step, rank) slot for its rows
    as the rank's loader does and costing them with the typical row of each task."""
    from pretrain.data.step_mix import MixCursor, StepLayout, StepPlan, order_costs
    from pretrain.flops import typical_task_flops
    from pretrain.plan import work_balance
    from pretrain.train.sources import mix_schedule, task_costs

    recipe = load_recipe(SCHEDULE[1], ["parallel.global_batch_size=24", "parallel.micro_batch_size=2",
                                       "data.ratio[0].until_step=7"])
    layout = recipe.validate_world(4)  # DP 4 x accumulation 3 x micro-batch 2
    figures = work_balance(recipe, layout, steps=6)
    flops = typical_task_flops(recipe.model, recipe.train.trainable, 4096)
    schedule, order_costs = mix_schedule(recipe), order_costs(task_costs(recipe))
    assert [f.first_step for f in figures] == [0, 7]
    for fig in figures:
        cursor, micro, step = MixCursor.at_step(schedule, 24, fig.first_step), [], []
        for _ in range(6):
            plan = StepPlan.build(cursor, schedule, StepLayout(4, 3, 2), order_costs)
            loads = [[sum(flops[TASKS[t]] for t, _ in plan.micro_batch(m, r)) for r in range(4)] for m in range(3)]
            micro += [max(x) / (sum(x) / 4) for x in loads]
            sums = [sum(col) for col in zip(*loads)]
            step.append(max(sums) / (sum(sums) / 4))
            cursor.advance(schedule, 24)
        assert fig.micro_worst == pytest.approx(max(micro), rel=1e-12)
        assert fig.micro_mean == pytest.approx(sum(micro) / len(micro), rel=1e-12)
        assert fig.step_worst == pytest.approx(max(step), rel=1e-12)
        assert fig.step_mean == pytest.approx(sum(step) / len(step), rel=1e-12)
        assert fig.micro_worst <= fig.fixed_order_micro_worst


def test_cli_prints_the_work_balance(capsys):
    assert main(["--recipe", str(SCHEDULE[2]), "--gpus", "64", "--balance-steps", "10"]) == 0
    out = capsys.readouterr().out
    assert "Work balance over the 64 data-parallel ranks" in out and "und:gen:text 21:70:9" in out


# ---------------------------------------------------------------------------------------------
# Janus-Pro and the papers' budgets
def test_januspro_7b_weights_per_gpu_by_hand():
    """TP 2: the LLM's blocks, embedding and output layer split in two; SigLIP, both aligners, the
    code table and the image head whole on every rank; bf16 (2 bytes)."""
    recipe = load_recipe(REPO / "recipes" / "januspro_7b_stage2.yaml")
    h, f, layers, vocab, k = 4096, 11008, 30, 102400, 16384
    llm_blocks = layers * (4 * h * h + 3 * h * f + 2 * h) + h
    whole = 303_688_704 + (1024 * h + h + h * h + h) + (k * 8 + 8 * h + h + h * h + h) + (h * h + h + h * k + k)
    expected = 2 * (llm_blocks / 2 + 2 * vocab * h / 2 + whole)
    m = build_plan(recipe, 256, balance_steps=0).memory[2]
    assert (m.tensor_parallel, m.data_parallel) == (2, 128)
    assert m.weights == pytest.approx(expected, rel=1e-12)


def test_cli_prints_both_papers_budgets(capsys):
    assert main(["--papers"]) == 0
    out = capsys.readouterr().out
    for needle in ("JanusFlow-1.3B", "Janus-Pro-1B", "Janus-Pro-7B", "JanusFlow-7B", "1,600", "896", "3,584",
                   "recipes/januspro_7b_stage2.yaml", "recipes/janusflow_7b_stage2.yaml"):
        assert needle in out, needle


def test_januspro_recipe_plans_with_its_own_schedule(capsys):
    assert main(["--recipe", str(REPO / "recipes" / "januspro_1b_stage2.yaml"), "--gpus", "128",
                 "--balance-steps", "0"]) == 0
    out = capsys.readouterr().out
    assert "Janus-Pro training plan" in out and "januspro_1b_stage3" in out and "817,889,280,000" in out
    assert "896 A100 GPU-days is reproduced at MFU 0.28" in out
    assert "image head, at image-code targets" in out
