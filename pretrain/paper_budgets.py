"""The papers' stated training budgets, and how our FLOP model reads them.

What each paper states about the compute of its three-stage schedule (``PAPER_BUDGETS``: JanusFlow's
~1,600 A100 GPU-days, Janus-Pro's "about 7/14 days on 16/32 nodes of 8 A100s"), which of our recipes
reproduce each schedule (``budget_for``, ``default_schedule``), a stage recipe costed in FLOPs per
token (``stage_plan -> StagePlan``), and every schedule against its stated GPU-days with the MFU that
figure implies (``paper_budgets() -> PaperBudgets``, ``format_paper_budgets``: what
``python -m pretrain.plan --papers`` prints). The planner (``pretrain.plan``) builds on this module.

FLOPs model: ``pretrain.flops``; memory model: ``pretrain.memory_model``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .flops import GPUS, DocumentModel, Gradients, MatmulSizes, sequence_flops
from .memory_model import MemoryEstimate, memory_estimate
from .model.config import ModelConfig
from .recipe import TASKS, Recipe, load_recipe

REPO = Path(__file__).resolve().parents[1]
SECONDS_PER_DAY = 86_400.0

# Sec. 4.1 and Table 1 of the paper: "each model requiring ~1,600 A100 GPU days"; the token count is
# steps x batch (packed sequences) x 4,096 summed over the three stages.
PAPER_A100_GPU_DAYS = 1_600.0
PAPER_TOKENS = (10_000 * 512 + 380_000 * 512 + 26_000 * 256) * 4_096


@dataclass(frozen=True)
class PaperBudget:
    """What a paper states about the compute of its three-stage schedule (``stages``: our recipes of it)."""

    model: str
    stages: tuple[str, ...]
    source: str
    a100_gpu_days: Optional[float] = None  # stated, or None when the paper states none
    nodes: Optional[int] = None
    days: Optional[float] = None


def _stages(prefix: str) -> tuple[str, ...]:
    return tuple(f"recipes/{prefix}{i}.yaml" for i in (1, 2, 3))


# JanusFlow Sec. 4.1; Janus-Pro Sec. 3.1: "about 7/14 days on a cluster of 16/32 nodes for 1.5B/7B
# model, each equipped with 8 Nvidia A100 (40GB) GPUs". JanusFlow-7B is ours: no paper figure.
PAPER_BUDGETS = (
    PaperBudget("JanusFlow-1.3B", _stages("stage"), "JanusFlow Sec. 4.1: ~1,600 A100 GPU-days", PAPER_A100_GPU_DAYS),
    PaperBudget("Janus-Pro-1B", _stages("januspro_1b_stage"),
                "Janus-Pro Sec. 3.1: ~7 days on 16 nodes x 8 A100-40GB", 7 * 16 * 8, 16, 7),
    PaperBudget("Janus-Pro-7B", _stages("januspro_7b_stage"),
                "Janus-Pro Sec. 3.1: ~14 days on 32 nodes x 8 A100-40GB", 14 * 32 * 8, 32, 14),
    PaperBudget("JanusFlow-7B", _stages("janusflow_7b_stage"), "ours (the JanusFlow paper trains 1.3B only)"),
)
SEVEN_B_RECIPES = ("recipes/janusflow_7b_stage2.yaml", *_stages("januspro_7b_stage"))


def budget_for(cfg: ModelConfig) -> PaperBudget:
    """The paper budget (and schedule) of ``cfg``'s family at its LLM width (4,096: the 7B)."""
    big = cfg.llm.hidden_size >= 4096
    name = {("janusflow", False): "JanusFlow-1.3B", ("janusflow", True): "JanusFlow-7B",
            ("januspro", False): "Janus-Pro-1B", ("januspro", True): "Janus-Pro-7B"}[(cfg.family, big)]
    return next(b for b in PAPER_BUDGETS if b.model == name)


def default_schedule(cfg: ModelConfig) -> tuple[Path, ...]:
    return tuple(REPO / p for p in budget_for(cfg).stages)


# ---------------------------------------------------------------------------------------------
# one stage recipe under our FLOP model
@dataclass(frozen=True)
class StagePlan:
    """One training stage of the schedule."""

    stage: str
    trainable: str
    steps: int
    global_batch: int
    seq_length: int
    task_fractions: dict[str, float]  # share of packed sequences per primary task, over all steps
    flops_per_token: float  # typical documents
    flops_per_token_upper: float  # attention over the whole sequence

    @property
    def tokens(self) -> int:
        return self.steps * self.global_batch * self.seq_length

    @property
    def flops(self) -> float:
        return self.tokens * self.flops_per_token

    @property
    def flops_upper(self) -> float:
        return self.tokens * self.flops_per_token_upper


def stage_plan(recipe: Recipe, docs: DocumentModel) -> StagePlan:
    """FLOPs per token of a stage recipe, its task mix averaged over the steps of each ratio phase."""
    cfg, data, steps = recipe.model, recipe.data, recipe.optim.steps
    fractions, start = dict.fromkeys(TASKS, 0.0), 0
    for phase in data.ratio:
        end = steps if phase.until_step is None else min(phase.until_step, steps)
        for task, share in phase.fractions().items():
            fractions[task] += share * max(end - start, 0) / steps
        start = end
    sizes, grads = MatmulSizes.from_config(cfg), Gradients.for_trainable(recipe.train.trainable, cfg.family)
    typical = upper = 0.0
    for task, share in fractions.items():
        if share:
            seq = docs.sequence(task, cfg, data.seq_length)
            typical += share * sum(sequence_flops(cfg, sizes, grads, seq).values())
            upper += share * sum(sequence_flops(cfg, sizes, grads, docs.full_attention(seq)).values())
    return StagePlan(recipe.train.stage, recipe.train.trainable, steps, recipe.parallel.global_batch_size,
                     data.seq_length, fractions, typical / data.seq_length, upper / data.seq_length)


# ---------------------------------------------------------------------------------------------
# both papers' budgets
@dataclass(frozen=True)
class BudgetRow:
    """One model's three-stage schedule (our recipes of the paper's table) against its stated budget."""

    budget: PaperBudget
    stages: tuple[StagePlan, ...]

    @property
    def tokens(self) -> int:
        return sum(s.tokens for s in self.stages)

    @property
    def flops(self) -> float:
        return sum(s.flops for s in self.stages)

    @property
    def flops_upper(self) -> float:
        return sum(s.flops_upper for s in self.stages)

    def implied_mfu(self, upper: bool = False) -> Optional[float]:
        """MFU on A100s (312 TFLOP/s bf16) at which the schedule takes the stated GPU-days."""
        if self.budget.a100_gpu_days is None:
            return None
        peak = GPUS["a100"].peak_bf16_flops
        return (self.flops_upper if upper else self.flops) / (self.budget.a100_gpu_days * SECONDS_PER_DAY * peak)

    def a100_gpu_days(self, mfu: float) -> float:
        return self.flops / (GPUS["a100"].peak_bf16_flops * mfu) / SECONDS_PER_DAY


@dataclass(frozen=True)
class PaperBudgets:
    rows: tuple[BudgetRow, ...]
    memory: tuple[tuple[str, MemoryEstimate], ...]  # (recipe, its estimate at its ZeRO stage on `gpus`)
    gpus: int
    mfu: float


def paper_budgets(docs: DocumentModel = DocumentModel(), mfu: float = 0.4, gpus: int = 256) -> PaperBudgets:
    """Every ``PAPER_BUDGETS`` schedule costed with our FLOP model, and the memory per GPU of the 7B
    recipes in their own layout on ``gpus`` GPUs (the Janus-Pro-7B run's 32 x 8)."""
    if not 0 < mfu <= 1:  # as build_plan: GPU-days divide by it
        raise ValueError(f"mfu: {mfu} must be in (0, 1]")
    rows = tuple(BudgetRow(b, tuple(stage_plan(load_recipe(REPO / p), docs) for p in b.stages)) for b in PAPER_BUDGETS)
    memory = []
    for path in SEVEN_B_RECIPES:
        recipe = load_recipe(REPO / path)
        seqs = [docs.sequence(t, recipe.model, recipe.data.seq_length) for t in TASKS]
        memory.append((path, memory_estimate(recipe.model, recipe.train.trainable, seqs, recipe.parallel.zero_stage,
                                             recipe.validate_world(gpus))))
    return PaperBudgets(rows, tuple(memory), gpus, mfu)


def format_paper_budgets(budgets: PaperBudgets) -> str:
    lines = [
        "Both papers' training budgets under our FLOP model (pretrain.flops; typical documents, estimates)",
        f"  {'model':<16}{'tokens':>18}{'FLOPs':>10}{'stated A100-days':>18}{'implied MFU':>13}{'(upper)':>9}"
        f"{f'A100-days @ MFU {budgets.mfu:.2f}':>24}  source",
    ]
    for row in budgets.rows:
        stated = row.budget.a100_gpu_days
        mfu, upper = row.implied_mfu(), row.implied_mfu(upper=True)
        lines.append(f"  {row.budget.model:<16}{row.tokens:>18,}{row.flops:>10.2e}"
                     f"{'-' if stated is None else f'{stated:,.0f}':>18}{'-' if mfu is None else f'{mfu:.3f}':>13}"
                     f"{'-' if upper is None else f'{upper:.3f}':>9}{row.a100_gpu_days(budgets.mfu):>24,.0f}  "
                     f"{row.budget.source}")
    lines += [
        "  (implied MFU: the schedule's FLOPs over the stated GPU-days at 312 TFLOP/s; upper: attention over whole "
        "4,096-token sequences)",
        "",
        f"Memory per GPU of the 7B recipes in their own layout on {budgets.gpus} GPUs, GB (estimates; A100: 40 GB in "
        "the Janus-Pro paper, 80 GB SXM)",
        f"  {'recipe':<40}{'layout':>16}{'ZeRO':>6}{'states':>8}{'activ.':>8}{'total':>8}{'total rc':>10}",
    ]
    for path, m in budgets.memory:
        layout = f"TP{m.tensor_parallel} PP{m.pipeline_parallel} DP{m.data_parallel}"
        lines.append(f"  {path:<40}{layout:>16}{m.zero_stage:>6}{m.states / 1e9:>8.1f}{m.activations / 1e9:>8.1f}"
                     f"{m.total / 1e9:>8.1f}{m.total_recompute / 1e9:>10.1f}")
    lines.append("  (rc: full activation recomputation of the LLM blocks; buckets and fragmentation not modelled)")
    return "\n".join(lines)
