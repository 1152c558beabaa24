"""Training throughput of our stack next to a plain transformers Llama + AdamW loop, in one run.

Ours: the recipe trained through ``pretrain.train.trainer.Trainer`` (DeepSpeed engine, EMA, the
mixed step) on synthetic packed micro-batches, single process. Each micro-batch has one primary
task drawn by the recipe's ratio (credit scheduling, as the loader), holds whole documents of that
task up to ``data.seq_length`` and text fillers; a text micro-batch holds two half-length documents.
Baseline: ``LlamaForCausalLM`` of the same LLM size with ``torch.optim.AdamW`` and gradient
clipping, trained on micro-batches of exactly the same token counts, with the same accumulation.

Printed per run: tokens/s, achieved FLOP/s and MFU. FLOPs come from ``pretrain.plan`` (counted per
micro-batch from its documents, images and targets; the baseline as a plain causal LM with logits at
every position). The peak is ``--peak-tflops``; by default a large fp32 matmul measured at start on
CPU, the bf16 dense peak of the GPU's table entry on CUDA (or a measured bf16 matmul for an unknown GPU).

CPU (default ``recipes/tiny_cpu.yaml``): seconds, dominated by per-op overheads at this size.
GPU (default ``recipes/stage2.yaml``, the 1.3B ``ModelConfig`` defaults): 4,096 tokens per packed
sequence, bf16 (DeepSpeed), micro-batch 1. If the Trainer's step cannot run on the device, the same
engine, EMA and step functions are driven here with the inputs moved to the device (``--mode direct``).

Usage: python benchmarks/train_throughput.py [--recipe R] [--steps 10] [--warmup 2] [--global-batch 4]
       [--peak-tflops X] [--threads N] [--no-baseline] [--mode auto|trainer|direct]

On a shared machine the figures move with the load: the table also gives the median step.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import torch  # noqa: E402

from pretrain.data.format import Task  # noqa: E402
from pretrain.plan import GPUS, Gradients, MatmulSizes, SequenceShape, lm_training_flops, sequence_flops  # noqa: E402
from pretrain.recipe import TASKS, load_recipe  # noqa: E402
from pretrain.synthetic import make_synthetic_batch  # noqa: E402


# ---------------------------------------------------------------------------------------------
def measure_peak(device: torch.device, dtype: torch.dtype, n: int, seconds: float = 1.0) -> float:
    """FLOP/s of repeated n x n matmuls (a rough ceiling for this process)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(3):
        a @ b
    sync()
    reps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        reps += 1
        if device.type == "cuda" and reps % 10:
            continue
        sync()
    sync()
    return 2 * n**3 * reps / (time.perf_counter() - start)


def device_peak(device: torch.device, override_tflops: float | None) -> tuple[float, str]:
    if override_tflops:
        return override_tflops * 1e12, "given by --peak-tflops"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device).lower()
        for key, spec in GPUS.items():
            if key in name:
                return spec.peak_bf16_flops, f"bf16 dense peak of {spec.name} (pretrain.plan.GPUS)"
        return measure_peak(device, torch.bfloat16, 8192), f"measured bf16 8192^3 matmul on {name}"
    return measure_peak(device, torch.float32, 2048), f"measured fp32 2048^3 matmul, {torch.get_num_threads()} threads"


# ---------------------------------------------------------------------------------------------
class FilledSource:
    """Synthetic micro-batches filled towards ``seq_length`` (see the module docstring); records the
    ``SequenceShape`` of every micro-batch it hands out so FLOPs are counted on what really ran."""

    def __init__(self, recipe, seed: int = 0) -> None:
        self.cfg, self.seq_length = recipe.model, recipe.data.seq_length
        self.fractions = recipe.data.ratio_at(0)
        self.credit = {t: 0.0 for t in TASKS}
        self.gen = torch.Generator().manual_seed(seed)
        n_image = max(self.cfg.und_encoder.num_image_tokens, self.cfg.gen_vision.num_latent_tokens)
        self.text_len = max(6, n_image // 5)  # ~115 text tokens per image document at 576 tokens per image
        self.doc_len = {t: len(make_synthetic_batch(self.cfg, [t], torch.Generator(), self.text_len).input_ids)
                        for t in (Task.UNDERSTANDING, Task.GENERATION, Task.TEXT)}
        self.shapes: list[SequenceShape] = []

    def _tasks(self) -> tuple[list[Task], int]:
        for t, share in self.fractions.items():
            self.credit[t] += share
        primary = max(self.credit, key=self.credit.get)
        self.credit[primary] -= 1.0
        if primary == "text":  # two long documents, as the planner's typical text sequence
            return [Task.TEXT, Task.TEXT], self.seq_length // 2
        task = Task.UNDERSTANDING if primary == "understanding" else Task.GENERATION
        tasks, used = [], 0
        while used + self.doc_len[task] <= self.seq_length:
            tasks.append(task)
            used += self.doc_len[task]
        while used + self.doc_len[Task.TEXT] <= self.seq_length:  # text fillers
            tasks.append(Task.TEXT)
            used += self.doc_len[Task.TEXT]
        return tasks or [Task.TEXT], self.text_len

    def next(self):
        tasks, text_len = self._tasks()
        batch = make_synthetic_batch(self.cfg, tasks, self.gen, text_len)
        self.shapes.append(SequenceShape.from_batch(batch))
        return batch

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def _to(obj, device: torch.device):
    """A dataclass of tensors (or a tensor, or None) on ``device``."""
    if obj is None or isinstance(obj, torch.Tensor):
        return None if obj is None else obj.to(device)
    return dataclasses.replace(obj, **{f.name: _to(getattr(obj, f.name), device) for f in dataclasses.fields(obj)
                                       if isinstance(getattr(obj, f.name), torch.Tensor)})


def direct_step(trainer, device: torch.device) -> None:
    """One optimizer step with the Trainer's engine, EMA and loss weights, inputs moved to ``device``.

    The same calls as ``Trainer.train_step`` minus its logging; for devices where the trainer's own
    step cannot run (its random draws and batches stay on the CPU)."""
    from pretrain.losses import combine_losses
    from pretrain.step import batch_unit_counts, prepare_model_inputs, stage_loss_terms

    world, recipe = trainer.world, trainer.recipe
    batches = [trainer.source.next() for _ in range(world.grad_accum_steps)]
    counts = {k: float(sum(batch_unit_counts(b)[k] for b in batches)) for k in ("ar", "rf", "repa")}
    scale = float(world.data_parallel * world.grad_accum_steps)
    for micro, batch in enumerate(batches):
        gen = torch.Generator().manual_seed(trainer.step * 1009 + micro)
        latents = None if batch.gen_latents is None else batch.gen_latents * recipe.model.gen_vision.latent_scale
        inputs, target = prepare_model_inputs(batch, latents, recipe.data.prompt_drop_prob, gen)
        _, outputs = trainer.engine(_to(inputs, device))
        terms = stage_loss_terms(outputs, _to(target, device))
        loss, _ = combine_losses(terms, trainer.weights, counts, grad_scale=scale)
        trainer.engine.backward(loss)
        trainer.engine.step()
    if trainer.engine.was_step_applied():
        trainer.ema.update()
    trainer.step += 1


# ---------------------------------------------------------------------------------------------
def run_ours(recipe, args, device: torch.device) -> dict:
    from pretrain.train.trainer import Trainer

    trainer = Trainer(recipe, max_steps=recipe.optim.steps)
    trainer.monitor.close()
    source = trainer.source = FilledSource(recipe, seed=recipe.data.seed)
    params = sum(p.numel() for p in trainer.model.parameters())
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    mode, times, first_timed = args.mode, [], 0
    try:
        for i in range(args.warmup + args.steps):
            if i == args.warmup:
                first_timed = len(source.shapes)
            sync()
            started = time.perf_counter()
            try:
                if mode == "direct":
                    direct_step(trainer, device)
                else:
                    trainer.train_step()
            except RuntimeError as err:
                if mode != "auto" or i > 0:
                    raise
                print(f"note: the Trainer's own step failed on {device.type} ({str(err).splitlines()[0][:160]}); "
                      "driving its engine directly (--mode direct)")
                mode = "direct"
                if i == args.warmup:  # the failed step's micro-batches are not timed
                    first_timed = len(source.shapes)
                started = time.perf_counter()
                direct_step(trainer, device)
            sync()
            if i >= args.warmup:
                times.append(time.perf_counter() - started)
    finally:
        trainer.close()  # shuts the runtime down; the baseline needs none
    shapes = source.shapes[first_timed:]
    primary = [("understanding" if s.und_images else "generation" if s.gen_images else "text") for s in shapes]
    print(f"our micro-batches (timed): {len(shapes)}, mean {sum(s.tokens for s in shapes) / len(shapes):.0f} tokens, "
          f"mean {sum(len(s.doc_lengths) for s in shapes) / len(shapes):.1f} documents; primary task "
          + ", ".join(f"{t} {primary.count(t)}" for t in TASKS))
    cfg = recipe.model
    sizes, grads = MatmulSizes.from_config(cfg), Gradients.for_trainable(recipe.train.trainable)
    return {
        "name": f"janusflow, our Trainer ({'direct step' if mode == 'direct' else 'trainer step'})",
        "tokens": sum(s.tokens for s in shapes),
        "flops": sum(sum(sequence_flops(cfg, sizes, grads, s).values()) for s in shapes),
        "times": times, "micro": len(shapes), "params": params,
        "token_counts": [s.tokens for s in source.shapes],
    }


def run_baseline(recipe, args, device: torch.device, token_counts: list[int]) -> dict:
    """The same LLM as ``LlamaForCausalLM`` + AdamW, on micro-batches of the same token counts."""
    from transformers import LlamaConfig, LlamaForCausalLM

    llm, accum = recipe.model.llm, len(token_counts) // (args.warmup + args.steps)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=llm.vocab_size, hidden_size=llm.hidden_size, intermediate_size=llm.ffn_hidden_size,
        num_hidden_layers=llm.num_layers, num_attention_heads=llm.num_attention_heads,
        num_key_value_heads=llm.query_groups, rope_theta=llm.rope_theta, rms_norm_eps=llm.norm_eps,
        max_position_embeddings=max(token_counts), tie_word_embeddings=False, attn_implementation="sdpa",
    )).to(device)
    model.train()
    o = recipe.optim
    optimizer = torch.optim.AdamW(model.parameters(), lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay)
    bf16 = device.type == "cuda" and recipe.train.precision == "bf16"
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    gen = torch.Generator().manual_seed(1)
    flops = tokens = 0
    times = []
    for i in range(args.warmup + args.steps):
        sync()
        started = time.perf_counter()
        for micro in token_counts[i * accum:(i + 1) * accum]:
            ids = torch.randint(0, llm.vocab_size, (1, micro), generator=gen).to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                loss = model(input_ids=ids, labels=ids).loss / accum
            loss.backward()
            if i >= args.warmup:
                tokens += micro
                flops += lm_training_flops(llm, micro, (micro,), micro)  # HF computes logits everywhere
        torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()
        if i >= args.warmup:
            times.append(time.perf_counter() - started)
    params = sum(p.numel() for p in model.parameters())
    del model, optimizer
    gc.collect()
    return {"name": "LlamaForCausalLM + AdamW (same LLM, same tokens)", "tokens": tokens, "flops": flops,
            "times": times, "micro": args.steps * accum, "params": params}


# ---------------------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default=os.path.join(ROOT, "recipes", "stage2.yaml" if cuda else "tiny_cpu.yaml"),
                   help="recipe to train (default: stage2.yaml on CUDA, tiny_cpu.yaml on CPU)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="extra recipe override (repeatable)")
    p.add_argument("--steps", type=int, default=10, help="timed optimizer steps (default 10)")
    p.add_argument("--warmup", type=int, default=2, help="untimed optimizer steps first (default 2)")
    p.add_argument("--global-batch", type=int, default=4,
                   help="sequences per optimizer step = micro-batches of 1 (default 4)")
    p.add_argument("--peak-tflops", type=float, default=None, help="peak for MFU (default: see the docstring)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no-baseline", action="store_true", help="skip the transformers Llama baseline")
    p.add_argument("--mode", choices=("auto", "trainer", "direct"), default="auto",
                   help="auto: the Trainer's step, falling back to driving its engine directly if it fails")
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.global_batch < 1:
        p.error("--steps must be >= 1, --warmup >= 0, --global-batch >= 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    out_dir = tempfile.mkdtemp(prefix="train_throughput_")
    total = args.warmup + args.steps
    recipe = load_recipe(args.recipe, [
        "data.root=null", "train.init_from=null", "init.llm=null", "init.siglip=null", "init.vae=null",
        "init.janusflow=null", f"train.output_dir={out_dir}", "parallel.micro_batch_size=1",
        f"parallel.global_batch_size={args.global_batch}", "parallel.tensor_parallel=1",
        "parallel.pipeline_parallel=1", f"optim.steps={total}", "optim.warmup_steps=0",
        f"train.save_interval={total + 1}", *args.overrides,
    ])
    peak, peak_how = device_peak(device, args.peak_tflops)
    llm = recipe.model.llm
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    print(f"device: {where}; peak {peak / 1e12:.3f} TFLOP/s ({peak_how})")
    print(f"recipe {os.path.relpath(args.recipe, ROOT)}: LLM {llm.num_layers} layers x {llm.hidden_size} "
          f"(vocab {llm.vocab_size}), sequences of up to {recipe.data.seq_length} tokens, micro-batch 1, "
          f"{args.global_batch} micro-batches per step, precision "
          f"{recipe.train.precision if device.type == 'cuda' else 'fp32 (CPU)'}, trainable {recipe.train.trainable}; "
          f"{args.steps} timed steps after {args.warmup} warm-up")

    results = [run_ours(recipe, args, device)]
    gc.collect()  # the trainer's model, optimizer and EMA go before the baseline's arrive
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if not args.no_baseline:
        results.append(run_baseline(recipe, args, device, results[0]["token_counts"]))

    unit, scale = ("TFLOP/s", 1e12) if device.type == "cuda" else ("GFLOP/s", 1e9)
    print(f"\n{'run':<50}{'params':>13}{'tokens/s':>10}{unit:>9}{'MFU':>7}{'GFLOP/tok':>11}"
          f"{'s/step':>8}{'median':>8}{'tok/s@med':>11}")
    for r in results:
        seconds, median = sum(r["times"]), statistics.median(r["times"])
        rate = r["flops"] / seconds
        print(f"{r['name']:<50}{r['params']:>13,}{r['tokens'] / seconds:>10,.0f}{rate / scale:>9.2f}{rate / peak:>7.1%}"
              f"{r['flops'] / r['tokens'] / 1e9:>11.4f}{seconds / len(r['times']):>8.3f}{median:>8.3f}"
              f"{r['tokens'] / len(r['times']) / median:>11,.0f}")
    if len(results) == 2:
        ours, base = results
        ratio = sum(base["times"]) / sum(ours["times"])  # same tokens, so the time ratio is the throughput ratio
        print(f"\nours / baseline: tokens/s x{ratio * ours['tokens'] / base['tokens']:.2f}, "
              f"FLOP/s x{ratio * ours['flops'] / base['flops']:.2f} "
              f"(same {ours['tokens']:,} timed tokens; ours also runs SigLIP, the generation modules and REPA, "
              "attention per document, logits at targets only)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
