"""The papers' stated budgets under our FLOP model: each schedule's tokens are the paper's table, the
stated GPU-days are the paper's, and the MFU they imply agrees with a by-hand 6N estimate."""

from __future__ import annotations

from pretrain.flops import MatmulSizes
from pretrain.paper_budgets import PAPER_TOKENS, paper_budgets
from pretrain.recipe import load_recipe
from tests.launch_helpers import REPO


def test_januspro_schedule_tokens_are_table_2():
    rows = {r.budget.model: r for r in paper_budgets().rows}
    assert rows["Janus-Pro-1B"].tokens == (20_000 * 256 + 360_000 * 512 + 80_000 * 128) * 4096
    assert rows["Janus-Pro-7B"].tokens == (20_000 * 256 + 360_000 * 512 + 40_000 * 128) * 4096
    assert rows["JanusFlow-1.3B"].tokens == rows["JanusFlow-7B"].tokens == PAPER_TOKENS
    # "about 7/14 days on a cluster of 16/32 nodes ... each equipped with 8 Nvidia A100" (Sec. 3.1).
    assert rows["Janus-Pro-1B"].budget.a100_gpu_days == 7 * 16 * 8
    assert rows["Janus-Pro-7B"].budget.a100_gpu_days == 14 * 32 * 8


def test_januspro_implied_mfu_agrees_with_the_6n_rule():
    """Re-derivation of the dominant term: LLM blocks at 6N per token (4N in stage 1, LLM frozen)
    over the stated GPU-days at 312 TFLOP/s. The planner adds attention, the output layer, SigLIP,
    the aligners and the image head: a few percent more, never less."""
    for row in paper_budgets().rows:
        if row.budget.a100_gpu_days is None:
            continue
        recipes = [load_recipe(REPO / p) for p in row.budget.stages]
        n = MatmulSizes.from_config(recipes[0].model).llm_per_token
        six_n = sum((4 if r.train.trainable == "new_modules" else 6) * n * r.optim.steps
                    * r.parallel.global_batch_size * 4096 for r in recipes)
        rough = six_n / (row.budget.a100_gpu_days * 86_400 * 312e12)
        assert rough < row.implied_mfu() < 1.25 * rough, (row.budget.model, rough, row.implied_mfu())
    mfus = {r.budget.model: r.implied_mfu() for r in paper_budgets().rows}
    assert 0.25 < mfus["Janus-Pro-1B"] < 0.32 and 0.28 < mfus["Janus-Pro-7B"] < 0.35  # printed: 0.282, 0.315
