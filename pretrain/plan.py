"""Plan a training run before renting it: parameters, FLOPs, memory per GPU and GPU-days.

``python -m pretrain.plan --recipe recipes/stage2.yaml --gpus 256 --gpu a100 [--mfu 0.4]``
prints, for the recipe's model (either family) and layout: parameters by component (counted from
``full_state_shapes``, never hard-coded), training FLOPs per packed sequence and per token, memory
per GPU for ZeRO stages 0-3, and the GPU-days of the whole three-stage schedule of the recipe's
family and size (``default_schedule``) at the given model FLOPs utilisation (MFU), with the MFU that
reproduces the paper's budget (``PAPER_BUDGETS``). ``python -m pretrain.plan --papers`` prints both
papers' budgets side by side (tokens, FLOPs, the MFU each stated budget implies) and the memory per
GPU of the 7B recipes. As a library: ``build_plan(recipe, gpus, gpu, mfu) -> Plan``,
``format_plan(plan)``; the papers' budgets, the schedules that reproduce them and the costing of a
stage recipe (``stage_plan``) are in ``pretrain.paper_budgets``.

FLOPs model: ``pretrain.flops`` (what "model FLOPs" counts, part by part). The planner adds the
work balance of the data-parallel ranks: the loader's rule for laying out each optimizer step's
rows (``pretrain.data.loader``) costed per rank and micro-step with that model.

Memory model: ``pretrain.memory_model`` (what the estimates count, and what they leave out).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional, Sequence

from .flops import (  # noqa: F401  (re-exported: the trainer and benchmarks read them from here)
    COMPONENTS, FLOP_PARTS, GPUS, DocumentModel, GPUSpec, Gradients, MatmulSizes, SequenceShape,
    causal_pairs, component_of, is_trainable, lm_training_flops, megatron_lm_flops, model_shapes, sequence_flops,
    typical_task_flops,
)
from .cli_args import whole_number
from .memory_model import MemoryEstimate, memory_estimate
from .model.config import ConfigError, ModelConfig
from .paper_budgets import (
    PAPER_A100_GPU_DAYS, PAPER_TOKENS, REPO, SECONDS_PER_DAY, PaperBudget, StagePlan, budget_for, default_schedule,
    format_paper_budgets, paper_budgets, stage_plan,
)
from .recipe import TASKS, Recipe, WorldLayout, load_recipe

SCHEDULE = tuple(REPO / "recipes" / f"stage{i}.yaml" for i in (1, 2, 3))
FAMILY_NAMES = {"janusflow": "JanusFlow", "januspro": "Janus-Pro"}


def count_parameters(cfg: ModelConfig, trainable: Optional[str] = None) -> dict[str, int]:
    """Component -> parameters (only the trainable ones under ``trainable`` when given)."""
    counts = {name: 0 for name in COMPONENTS}
    for key, shape in model_shapes(cfg).items():
        if trainable is None or is_trainable(key, trainable, cfg.family):
            counts[component_of(key)] += math.prod(shape)
    return counts


# ---------------------------------------------------------------------------------------------
# work balance over data-parallel ranks
@dataclass(frozen=True)
class BalanceFigures:
    """FLOP imbalance (max/mean over data-parallel ranks) of the loader's assignment over ``steps``
    optimizer steps from ``first_step``, per micro-step (ranks meet there under pipeline
    parallelism) and per optimizer step (a rank's micro-steps summed: where plain data parallelism
    waits, at the gradient reduction). ``fixed_order_*``: the same with the task groups in ``Task``
    order instead of the balancing order, for comparison."""

    first_step: int
    steps: int
    ratio: dict[str, float]  # of the phase, normalised
    micro_worst: float
    micro_mean: float
    step_worst: float
    step_mean: float
    fixed_order_micro_worst: float
    fixed_order_micro_mean: float


def _imbalance(loads) -> list[float]:
    """max/mean over ranks of each row of a [n, ranks] array of FLOPs."""
    return [float(row.max() / row.mean()) for row in loads]


def work_balance(recipe: Recipe, layout: WorldLayout, steps: int = 100,
                 docs: DocumentModel = DocumentModel()) -> list[BalanceFigures]:
    """The loader's per-step assignment costed per rank with the typical row of each task
    (``typical_task_flops``), for ``steps`` steps from the start of each ratio phase."""
    from datacontract.format import Task
    from .data.step_mix import MixCursor, StepLayout, StepPlan, micro_step_loads, order_costs
    from .train.sources import mix_schedule, task_costs

    schedule = mix_schedule(recipe)
    flops = typical_task_flops(recipe.model, recipe.train.trainable, recipe.data.seq_length, docs)
    costs = [flops[TASKS[int(t)]] for t in Task]
    chosen = order_costs(task_costs(recipe))  # what the loader orders by
    lay = StepLayout(layout.data_parallel, layout.grad_accum_steps, layout.micro_batch_size)
    out, start = [], 0
    for phase in recipe.data.ratio:
        cursor = MixCursor.at_step(schedule, lay.global_batch, start)
        micro, per_step, fixed = [], [], []
        for _ in range(steps):
            for ordering, sink in ((chosen, micro), (None, fixed)):  # the loader's order, then none
                plan = StepPlan.build(cursor, schedule, lay, ordering)
                loads = micro_step_loads([int(t) for t, _ in plan.rows], lay, costs)
                sink += _imbalance(loads)
                if ordering is chosen:
                    per_step += _imbalance(loads.sum(axis=0, keepdims=True))
            cursor.advance(schedule, lay.global_batch)
        out.append(BalanceFigures(start, steps, phase.fractions(), max(micro), sum(micro) / len(micro),
                                  max(per_step), sum(per_step) / len(per_step), max(fixed), sum(fixed) / len(fixed)))
        start = phase.until_step if phase.until_step is not None else start
    return out


# ---------------------------------------------------------------------------------------------
# the plan
@dataclass(frozen=True)
class Plan:
    model: ModelConfig
    stage: StagePlan
    gpu: GPUSpec
    gpus: int
    mfu: float
    layout: WorldLayout
    zero_stage: int
    docs: DocumentModel
    params: dict[str, int]
    trainable_params: dict[str, int]
    sequences: dict[str, SequenceShape]  # typical sequence per primary task
    sequence_flops: dict[str, dict[str, float]]  # per task: part -> FLOPs (typical documents)
    sequence_flops_upper: dict[str, dict[str, float]]  # per task: part -> FLOPs (attention at seq_length)
    six_n: float  # 6 x LLM block matmul parameters, FLOPs per token
    memory: list[MemoryEstimate]  # ZeRO 0-3 in the chosen layout
    schedule: list[StagePlan] = field(default_factory=list)
    other_layouts: list[list[MemoryEstimate]] = field(default_factory=list)  # ZeRO 0-3 per valid TP x PP
    balance: list[BalanceFigures] = field(default_factory=list)  # per ratio phase, in the chosen layout
    budget: Optional[PaperBudget] = None  # the paper's figure for this family and size
    # Per schedule stage: None where its recipe, in this plan's layout overrides, runs on `gpus` GPUs;
    # else why not (the wall-clock days on `gpus` GPUs of such a stage would be a figure no run reaches).
    schedule_misfits: list[Optional[str]] = field(default_factory=list)

    def gpu_days(self, flops: float, mfu: Optional[float] = None, gpu: Optional[GPUSpec] = None) -> float:
        return flops / ((gpu or self.gpu).peak_bf16_flops * (mfu or self.mfu)) / SECONDS_PER_DAY

    @property
    def total_tokens(self) -> int:
        return sum(s.tokens for s in self.schedule)

    @property
    def total_flops(self) -> float:
        return sum(s.flops for s in self.schedule)

    @property
    def total_flops_upper(self) -> float:
        return sum(s.flops_upper for s in self.schedule)

    def mfu_for_gpu_days(self, gpu_days: Optional[float] = None, gpu: GPUSpec = GPUS["a100"],
                         upper: bool = False) -> float:
        """The MFU at which the schedule takes ``gpu_days`` (default: the paper's A100-days for this
        family and size, JanusFlow's 1,600 when it states none)."""
        if gpu_days is None:
            gpu_days = (self.budget.a100_gpu_days if self.budget else None) or PAPER_A100_GPU_DAYS
        flops = self.total_flops_upper if upper else self.total_flops
        return flops / (gpu_days * SECONDS_PER_DAY * gpu.peak_bf16_flops)


def with_layout(recipe: Recipe, tp: Optional[int] = None, pp: Optional[int] = None,
                zero: Optional[int] = None, micro_batch: Optional[int] = None) -> Recipe:
    """The recipe with its parallel layout overridden (validated like a recipe file)."""
    changes = {k: v for k, v in (("tensor_parallel", tp), ("pipeline_parallel", pp), ("zero_stage", zero),
                                 ("micro_batch_size", micro_batch)) if v is not None}
    return dataclasses.replace(recipe, parallel=dataclasses.replace(recipe.parallel, **changes)) if changes else recipe


def build_plan(recipe: Recipe, gpus: int, gpu: str = "a100", mfu: float = 0.4, *,
               tp: Optional[int] = None, pp: Optional[int] = None, zero: Optional[int] = None,
               micro_batch: Optional[int] = None, schedule: Optional[Sequence[Recipe]] = None,
               docs: DocumentModel = DocumentModel(), balance_steps: int = 100) -> Plan:
    """Plan ``recipe`` on ``gpus`` GPUs of kind ``gpu`` (a key of ``GPUS``) at ``mfu``.

    ``tp``/``pp``/``zero``/``micro_batch`` override the recipe's layout; ``schedule`` is the list of
    stage recipes the GPU-days add up (default: ``default_schedule`` of the recipe's model); ``balance_steps``: steps per
    ratio phase of the work-balance figures (0: none). Raises ``ConfigError``
    for a layout the recipe rejects (e.g. a global batch the data-parallel size does not divide).
    """
    if gpu not in GPUS:
        raise ValueError(f"gpu: {gpu!r} is not one of {', '.join(GPUS)}")
    if not 0 < mfu <= 1:
        raise ValueError(f"mfu: {mfu} must be in (0, 1]")
    recipe = with_layout(recipe, tp, pp, zero, micro_batch)
    layout = recipe.validate_world(gpus)
    cfg, trainable = recipe.model, recipe.train.trainable
    sizes, grads = MatmulSizes.from_config(cfg), Gradients.for_trainable(trainable, cfg.family)
    sequences = {t: docs.sequence(t, cfg, recipe.data.seq_length) for t in TASKS}
    seqs = list(sequences.values())
    others = []
    for other_tp in (1, 2, 4, 8):
        for other_pp in (1, 2, 4):
            try:
                other = with_layout(recipe, other_tp, other_pp, zero=min(recipe.parallel.zero_stage, 1))
                other_layout = other.validate_world(gpus)
            except ConfigError:
                continue  # heads, layers or the global batch do not divide
            others.append([memory_estimate(cfg, trainable, seqs, z, other_layout) for z in range(4)])
    if schedule is None:
        schedule = [load_recipe(p) for p in default_schedule(cfg)]
    misfits = []
    for stage_recipe in schedule:
        try:
            with_layout(stage_recipe, tp, pp, zero, micro_batch).validate_world(gpus)
            misfits.append(None)
        except ConfigError as e:
            misfits.append(str(e))
    return Plan(
        model=cfg, stage=stage_plan(recipe, docs), gpu=GPUS[gpu], gpus=gpus, mfu=mfu, layout=layout,
        zero_stage=recipe.parallel.zero_stage, docs=docs,
        params=count_parameters(cfg), trainable_params=count_parameters(cfg, trainable),
        sequences=sequences,
        sequence_flops={t: sequence_flops(cfg, sizes, grads, s) for t, s in sequences.items()},
        sequence_flops_upper={t: sequence_flops(cfg, sizes, grads, docs.full_attention(s))
                              for t, s in sequences.items()},
        six_n=6.0 * sizes.llm_per_token,
        memory=[memory_estimate(cfg, trainable, seqs, z, layout) for z in range(4)],
        schedule=[stage_plan(r, docs) for r in schedule], other_layouts=others,
        balance=work_balance(recipe, layout, balance_steps, docs) if balance_steps else [],
        budget=budget_for(cfg), schedule_misfits=misfits,
    )


# ---------------------------------------------------------------------------------------------
# printing
def _row(label: str, cells: Iterable[str], width: int = 58) -> str:
    return f"  {label:<{width}}" + "".join(f"{c:>15}" for c in cells)


def _doc_summary(seq: SequenceShape) -> str:
    lengths = seq.doc_lengths
    main = max(set(lengths), key=lengths.count)
    rest = [d for d in lengths if d != main]
    return f"{lengths.count(main)}x{main}" + (f"+{'+'.join(map(str, rest))}" if rest else "")


def _memory_lines(plan: Plan) -> list[str]:
    st, lay = plan.stage, plan.layout
    lines = [
        f"Memory per GPU, GB (estimates; first pipeline stage, micro-batch {lay.micro_batch_size} x "
        f"{st.seq_length:,}, worst typical sequence)",
        f"  {'layout':<18}{'ZeRO':>5}{'weights':>9}{'grads':>8}{'master+Adam':>12}{'EMA fp32':>9}"
        f"{'activ.':>8}{'total':>8}{'activ. rc':>10}{'total rc':>9}",
    ]
    for m in plan.memory:
        name = f"TP{m.tensor_parallel} PP{m.pipeline_parallel} DP{m.data_parallel}"
        if not m.allowed:
            lines.append(f"  {name:<18}{m.zero_stage:>5}   n/a: DeepSpeed's pipeline engine takes ZeRO 0-1 only")
            continue
        over = "  > GPU memory" if m.total_recompute > plan.gpu.memory_gb * 1e9 else ""
        lines.append(f"  {name:<18}{m.zero_stage:>5}{m.weights / 1e9:>9.2f}{m.gradients / 1e9:>8.2f}"
                     f"{m.optimizer / 1e9:>12.2f}{m.ema / 1e9:>9.2f}{m.activations / 1e9:>8.2f}"
                     f"{m.total / 1e9:>8.2f}{m.activations_recompute / 1e9:>10.2f}{m.total_recompute / 1e9:>9.2f}{over}")
    lines.append("  (rc: full activation recomputation of the LLM blocks; buckets and fragmentation not modelled)")
    if plan.other_layouts:
        lines.append(f"  Layouts on {plan.gpus} GPUs, total GB per GPU without / with recomputation:")
        lines.append(f"  {'layout':<18}" + "".join(f"{'ZeRO-' + str(z):>15}" for z in range(4)))
        for row in plan.other_layouts:
            name = f"TP{row[0].tensor_parallel} PP{row[0].pipeline_parallel} DP{row[0].data_parallel}"
            cells = "".join(f"{m.total / 1e9:>7.1f} /{m.total_recompute / 1e9:>6.1f}" if m.allowed else f"{'n/a':>15}"
                            for m in row)
            lines.append(f"  {name:<18}{cells}")
    return lines


def _balance_lines(plan: Plan) -> list[str]:
    if not plan.balance:
        return []
    lay = plan.layout
    flops = {t: sum(plan.sequence_flops[t].values()) for t in TASKS}
    lines = [
        f"Work balance over the {lay.data_parallel} data-parallel ranks: FLOPs max/mean over ranks (typical rows: "
        + ", ".join(f"{t} {f / 1e12:.1f}" for t, f in flops.items()) + " TFLOP)",
        f"  loader rule: each step's {lay.data_parallel * lay.grad_accum_steps * lay.micro_batch_size} rows by task, grouped per micro-step ({lay.grad_accum_steps} x "
        f"{lay.data_parallel} ranks x {lay.micro_batch_size}), task order chosen for balance",
        f"  {'ratio phase':<34}{'steps':>12}{'micro-step worst':>18}{'mean':>8}{'step worst':>12}{'mean':>8}"
        f"{'fixed order worst':>19}{'mean':>8}",
    ]
    for b in plan.balance:
        ratio = ":".join(f"{100 * b.ratio[t]:.0f}" for t in TASKS)
        lines.append(f"  {'und:gen:text ' + ratio:<34}{f'{b.first_step}+{b.steps}':>12}{b.micro_worst:>18.4f}"
                     f"{b.micro_mean:>8.4f}{b.step_worst:>12.4f}{b.step_mean:>8.4f}{b.fixed_order_micro_worst:>19.4f}"
                     f"{b.fixed_order_micro_mean:>8.4f}")
    lines.append("  (micro-step: ranks meet there under pipeline parallelism; step: a rank's micro-steps summed, "
                 "where plain data parallelism waits)")
    return lines + [""]


def format_plan(plan: Plan, recipe_name: str = "") -> str:
    st, lay, seqs = plan.stage, plan.layout, plan.sequences
    per_pos = lambda flops: f"{flops / st.seq_length / 1e9:.2f}"  # noqa: E731
    lines = [
        f"{FAMILY_NAMES[plan.model.family]} training plan: {recipe_name or st.stage} (stage {st.stage!r}, "
        f"trainable: {st.trainable})",
        f"{plan.gpus} x {plan.gpu.name} ({plan.gpu.peak_bf16_flops / 1e12:.0f} TFLOP/s bf16 dense, "
        f"{plan.gpu.memory_gb:.0f} GB), MFU {plan.mfu:.2f}; layout TP {lay.tensor_parallel} x PP "
        f"{lay.pipeline_parallel} x DP {lay.data_parallel}, ZeRO-{plan.zero_stage}, micro-batch "
        f"{lay.micro_batch_size}, accumulation {lay.grad_accum_steps}",
        "",
        f"Parameters (from full_state_shapes)                   {'total':>15} {'trainable':>15}",
    ]
    for name, (label, _) in COMPONENTS.items():
        lines.append(f"  {label:<50} {plan.params[name]:>15,} {plan.trainable_params[name]:>15,}")
    lines.append(f"  {'total':<50} {sum(plan.params.values()):>15,} {sum(plan.trainable_params.values()):>15,}")

    lines += ["", f"Training FLOPs per packed sequence of {st.seq_length:,} tokens, GFLOP per LLM position "
              f"(stage {st.stage!r}; typical documents, estimates)",
              _row("", TASKS),
              _row("documents: lengths", (_doc_summary(seqs[t]) for t in TASKS)),
              _row("images / L_AR targets", (f"{seqs[t].und_images + seqs[t].gen_images} / {seqs[t].targets}"
                                             for t in TASKS))]
    januspro = plan.model.family == "januspro"
    if januspro:
        lines.append(_row("image-code targets", (str(seqs[t].codes) for t in TASKS)))
    for part, label in FLOP_PARTS.items():
        if part in plan.sequence_flops[TASKS[0]]:  # the parts of this family
            if januspro and part == "gen_modules":
                label = "generation aligner (image-code inputs)"
            lines.append(_row(label, (per_pos(plan.sequence_flops[t][part]) for t in TASKS)))
    lines += [
        _row(f"LLM attention at the {st.seq_length:,} upper bound (one document)",
             (per_pos(plan.sequence_flops_upper[t]["llm_attention"]) for t in TASKS)),
        _row("total, typical documents", (per_pos(sum(plan.sequence_flops[t].values())) for t in TASKS)),
        _row("total, attention at the upper bound", (per_pos(sum(plan.sequence_flops_upper[t].values()))
                                                     for t in TASKS)),
    ]
    llm_rule = ("LLM trained: 6N" if plan.trainable_params["llm_blocks"] else
                "LLM frozen in this stage: 4N, its backward still runs for the gradients of the modules before it")
    siglip_rule = "trained: 6x" if plan.trainable_params["siglip"] else "frozen: forward only, 2x"
    patches, latents = plan.model.und_encoder.num_image_tokens, plan.model.gen_vision.num_latent_tokens
    mix = ", ".join(f"{t} {f:.3f}" for t, f in st.task_fractions.items())
    w = max([8] + [len(s.stage) + 2 for s in plan.schedule])  # the stage column
    if januspro:
        codes = plan.model.image_tokens.num_codes(plan.model.und_encoder.image_size)
        image_rule = (f"  SigLIP on {patches} patches per understanding image ({siglip_rule}); generation aligner "
                      f"and image head at the {codes} codes of each generation image (VQ tokenizer offline: 0).")
    else:
        image_rule = (f"  SigLIP on {patches} patches per understanding image ({siglip_rule}) and per generation image "
                      f"(REPA target, no_grad: 2x); generation modules and REPA at {latents} latent positions per image.")
    lines += [
        f"  Rules: 6N per position for N = {plan.six_n / 6e9:.3f}B LLM block matmul parameters = "
        f"{plan.six_n / 1e9:.2f} GFLOP ({llm_rule});",
        "  attention causal within each document (packing never attends across documents); logits only at "
        "L_AR targets;",
        image_rule,
        f"FLOPs per token, stage mix ({mix} of sequences): {st.flops_per_token / 1e9:.2f} GFLOP "
        f"(typical documents), {st.flops_per_token_upper / 1e9:.2f} GFLOP (attention at {st.seq_length:,})",
        "",
        *_memory_lines(plan),
        "",
        *_balance_lines(plan),
        f"Schedule: GPU-days at MFU {plan.mfu:.2f} on {plan.gpu.name}, wall-clock days on {plan.gpus} GPUs",
        f"  {'stage':<{w}}{'trainable':<21}{'steps':>9}{'batch':>7}{'tokens':>18}{'GFLOP/tok':>10}"
        f"{'FLOPs':>10}{'GPU-days':>10}{'days':>8}",
    ]
    misfits = plan.schedule_misfits or [None] * len(plan.schedule)
    for s, misfit in zip(plan.schedule, misfits):
        days = plan.gpu_days(s.flops)
        wall = f"{'n/a':>8}" if misfit else f"{days / plan.gpus:>8.2f}"
        lines.append(f"  {s.stage:<{w}}{s.trainable:<21}{s.steps:>9,}{s.global_batch:>7}{s.tokens:>18,}"
                     f"{s.flops_per_token / 1e9:>10.2f}{s.flops:>10.2e}{days:>10,.0f}{wall}")
    days = plan.gpu_days(plan.total_flops)
    wall = f"{'n/a':>8}" if any(misfits) else f"{days / plan.gpus:>8.2f}"
    lines += [
        f"  {'total':<{w + 30}}{plan.total_tokens:>25,}{plan.total_flops / plan.total_tokens / 1e9:>10.2f}"
        f"{plan.total_flops:>10.2e}{days:>10,.0f}{wall}",
        *(f"  n/a: {s.stage} does not fit {plan.gpus} GPUs in this layout, so it has no wall-clock days there "
          f"(its GPU-days hold; a larger --tp or --pp may fit it): {misfit}"
          for s, misfit in zip(plan.schedule, misfits) if misfit),
        f"  with attention at the {st.seq_length:,} upper bound: {plan.total_flops_upper:.2e} FLOPs, "
        f"{plan.gpu_days(plan.total_flops_upper):,.0f} GPU-days",
        "",
        *_paper_check_lines(plan),
    ]
    return "\n".join(lines)


def _paper_check_lines(plan: Plan) -> list[str]:
    budget, st = plan.budget, plan.stage
    lines = []
    if budget.model == "JanusFlow-1.3B":
        paper = "equals" if plan.total_tokens == PAPER_TOKENS else "DIFFERS FROM"
        lines.append(f"Paper check: {plan.total_tokens / 1e9:,.1f}B tokens {paper} (10,000x512 + 380,000x512 + "
                     f"26,000x256) x 4,096 = {PAPER_TOKENS:,}")
    if budget.a100_gpu_days is None:
        return lines + [f"Paper check: none ({budget.source}); the schedule is {budget.model}'s recipes"]
    return lines + [
        f"Paper check: {budget.a100_gpu_days:,.0f} A100 GPU-days is reproduced at MFU "
        f"{plan.mfu_for_gpu_days():.3f} (typical documents; {plan.mfu_for_gpu_days(upper=True):.3f} with attention "
        f"at {st.seq_length:,}); {budget.source}"]


# ---------------------------------------------------------------------------------------------
def _mfu(text: str) -> float:
    """--mfu: a fraction in (0, 1] (GPU-days divide by it); NaN fails every comparison, so it is refused too."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a utilisation in (0, 1] (e.g. 0.4)")
    return value


# What --papers reads; it costs the papers' own recipes in their own layouts, so any other option
# would be silently ignored (one given at its default value changes nothing and passes).
PAPERS_OPTIONS = ("papers", "mfu", "und_text_tokens", "und_answer_tokens", "gen_text_tokens", "text_doc_tokens")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="pretrain.plan",
        description="Estimate parameters, training FLOPs, memory per GPU and GPU-days of a JanusFlow recipe "
                    "and of the three-stage schedule (all figures are model estimates).",
        epilog="Example: python -m pretrain.plan --recipe recipes/stage2.yaml --gpus 256 --gpu a100 --mfu 0.4",
    )
    p.add_argument("--recipe", default=str(SCHEDULE[1]), help="YAML recipe (default: recipes/stage2.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe key, as pretrain.main does (repeatable)")
    p.add_argument("--gpus", type=whole_number(1), default=None,
                   help="number of GPUs (the world size; required without --papers)")
    p.add_argument("--gpu", choices=sorted(GPUS), default="a100",
                   help="GPU kind: peak bf16 FLOP/s and memory (default a100)")
    p.add_argument("--mfu", type=_mfu, default=0.4,
                   help="model FLOPs utilisation for GPU-days, in (0, 1] (default 0.4)")
    p.add_argument("--tp", type=int, default=None, help="tensor parallel size (default: the recipe's)")
    p.add_argument("--pp", type=int, default=None, help="pipeline parallel size (default: the recipe's)")
    p.add_argument("--zero", type=int, choices=(0, 1, 2, 3), default=None, help="ZeRO stage (default: the recipe's)")
    p.add_argument("--micro-batch", type=int, default=None, help="sequences per micro-batch (default: the recipe's)")
    p.add_argument("--schedule", nargs="+", default=None,
                   help="stage recipes whose GPU-days add up (default: the three stage recipes of the recipe's "
                        "family and size, e.g. recipes/stage1.yaml stage2.yaml stage3.yaml for JanusFlow-1.3B)")
    p.add_argument("--papers", action="store_true",
                   help="print both papers' budgets (tokens, FLOPs, the MFU each stated budget implies) and the "
                        "memory per GPU of the 7B recipes, then exit (no --gpus needed)")
    d = DocumentModel()
    p.add_argument("--und-text-tokens", type=whole_number(0), default=d.und_text_tokens,
                   help=f"text tokens per understanding document (default {d.und_text_tokens})")
    p.add_argument("--und-answer-tokens", type=whole_number(0), default=d.und_answer_tokens,
                   help=f"answer (target) tokens per understanding document (default {d.und_answer_tokens})")
    p.add_argument("--gen-text-tokens", type=whole_number(0), default=d.gen_text_tokens,
                   help=f"text tokens per generation document (default {d.gen_text_tokens})")
    p.add_argument("--balance-steps", type=whole_number(0), default=100,
                   help="optimizer steps per ratio phase for the work-balance figures (default 100, 0: skip)")
    p.add_argument("--text-doc-tokens", type=whole_number(1), default=d.text_doc_tokens,
                   help=f"length of a text document (default {d.text_doc_tokens})")
    args = p.parse_args(argv)
    if args.und_answer_tokens > args.und_text_tokens:  # the answer is part of the document's text
        p.error(f"argument --und-answer-tokens: {args.und_answer_tokens} must be at most --und-text-tokens "
                f"({args.und_text_tokens})")
    if args.papers:
        ignored = [("--set" if name == "overrides" else "--" + name.replace("_", "-"))
                   for name, value in vars(args).items() if name not in PAPERS_OPTIONS and value != p.get_default(name)]
        if ignored:
            p.error(f"argument --papers: it costs the papers' own recipes and layouts, so {', '.join(ignored)} "
                    "would be ignored; drop them, or leave out --papers to plan a recipe")
    return args


def _load(option: str, path: str, overrides: Sequence[str] = ()) -> Recipe:
    try:
        return load_recipe(path, overrides)
    except OSError as err:  # missing, unreadable, a name too long (load_recipe reports the rest)
        raise ConfigError(f"{option}: cannot read {path} ({err.strerror or err}); give a recipe YAML such as "
                          "recipes/stage2.yaml") from None


def main(argv=None) -> int:
    from .runtime.quiet import silence_known_warnings

    silence_known_warnings()  # Janus-Pro's shapes import megatron-core: its start-up warnings are noise here
    args = parse_args(argv)
    docs = DocumentModel(args.und_text_tokens, args.und_answer_tokens, args.gen_text_tokens, args.text_doc_tokens)
    if args.papers:
        print(format_paper_budgets(paper_budgets(docs, args.mfu)))
        return 0
    if args.gpus is None:
        print("error: --gpus: the number of GPUs is required (or use --papers)", file=sys.stderr)
        return 2
    try:
        recipe = _load("--recipe", args.recipe, args.overrides)
        schedule = None if args.schedule is None else [_load("--schedule", p) for p in args.schedule]
        plan = build_plan(recipe, args.gpus, args.gpu, args.mfu, tp=args.tp, pp=args.pp, zero=args.zero,
                          micro_batch=args.micro_batch, schedule=schedule, docs=docs,
                          balance_steps=args.balance_steps)
    except (ConfigError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    path = Path(args.recipe).resolve()
    print(format_plan(plan, str(path.relative_to(REPO)) if path.is_relative_to(REPO) else args.recipe))
    return 0


if __name__ == "__main__":
    sys.exit(main())
