"""Training throughput of our stack next to a plain transformers Llama + AdamW loop, in one run.

Ours: the recipe trained through ``pretrain.train.trainer.Trainer`` (DeepSpeed engine, EMA, the
mixed step) on synthetic packed micro-batches, single process. Each micro-batch has one primary
task drawn by the recipe's ratio (credit scheduling, as the loader), holds whole documents of that
task up to ``data.seq_length`` and text fillers; a text micro-batch holds two half-length documents.
Baseline: ``LlamaForCausalLM`` of the same LLM size (SDPA attention) with ``torch.optim.AdamW`` and
gradient clipping, trained on micro-batches of exactly the same token counts, with the same
accumulation.

Printed per run: tokens/s, achieved FLOP/s and MFU per GPU in two FLOP conventions side by side,
and peak memory:
- ours (``pretrain.flops.sequence_flops``): counted per micro-batch from its documents (attention
  per document), images and L_AR targets, vision modules and REPA included; the baseline as a plain
  causal LM with logits at every position (``lm_training_flops``);
- Megatron-LM's (``pretrain.flops.megatron_lm_flops``): the LLM alone, each micro-batch one sequence
  of its length with dense attention and logits everywhere. It is the same count for both runs on
  the same tokens, so its ratio is the throughput ratio.
The peak is ``--peak-tflops``; by default a large fp32 matmul measured at start on CPU, the bf16
dense peak of the GPU's table entry on CUDA (or a measured bf16 matmul for an unknown GPU). Peak
memory: ``torch.cuda.max_memory_allocated`` per run on CUDA; on CPU the process's peak resident
memory so far (the baseline's figure includes ours).

CPU (default ``recipes/tiny_cpu.yaml``): seconds, dominated by per-op overheads at this size.
GPU (default ``recipes/stage2.yaml``, the 1.3B ``ModelConfig`` defaults): 4,096 tokens per packed
sequence, bf16 (DeepSpeed), micro-batch 1. If the Trainer's step cannot run on the device, the same
engine, EMA and step functions are driven here with the inputs moved to the device (``--mode direct``).
``--toy``: the tiny recipe, 2 timed steps of 2 micro-batches after 1 warm-up (a check that the script
runs, for the CPU tests; its figures mean nothing). ``--json PATH``: the figures as JSON, rewritten
after each run (a run stopped by a time limit still leaves the finished ones).

Usage: python benchmarks/train_throughput.py [--recipe R] [--steps 10] [--warmup 2] [--global-batch 4]
       [--peak-tflops X] [--threads N] [--no-baseline] [--mode auto|trainer|direct] [--toy] [--json PATH]

On a shared machine the figures move with the load: the table also gives the median step.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import torch  # noqa: E402

from datacontract.format import Task  # noqa: E402
from pretrain.cli_args import finite_number, output_file, whole_number  # noqa: E402
from pretrain.flops import (  # noqa: E402
    GPUS, Gradients, MatmulSizes, SequenceShape, lm_training_flops, megatron_lm_flops, sequence_flops,
)
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
                return spec.peak_bf16_flops, f"bf16 dense peak of {spec.name} (pretrain.flops.GPUS)"
        return measure_peak(device, torch.bfloat16, 8192), f"measured bf16 8192^3 matmul on {name}"
    return measure_peak(device, torch.float32, 2048), f"measured fp32 2048^3 matmul, {torch.get_num_threads()} threads"


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device: torch.device) -> float:
    """GiB: the peak allocated by torch on ``device`` since the last reset, or on CPU the process's
    peak resident memory so far (it includes everything the process held before)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def megatron_flops(llm, token_counts) -> float:
    """Megatron-LM's count of micro-batches of these lengths: each one sequence of its own length."""
    return sum(megatron_lm_flops(llm, n) for n in token_counts)


# ---------------------------------------------------------------------------------------------
class FilledSource:
    """Synthetic micro-batches filled towards ``seq_length`` (see the module docstring); records the
    ``SequenceShape`` of every micro-batch it hands out so FLOPs are counted on what really ran."""

    def __init__(self, recipe, seed: int = 0, grad_accum_steps: int = 1) -> None:
        self.cfg, self.seq_length = recipe.model, recipe.data.seq_length
        self.grad_accum_steps = grad_accum_steps
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

    def next_step(self) -> list:
        """The micro-batches of one optimizer step (the trainer's source interface)."""
        return [self.next() for _ in range(self.grad_accum_steps)]

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

    reset_peak_memory(device)
    trainer = Trainer(recipe, max_steps=recipe.optim.steps)
    trainer.monitor.close()
    source = trainer.source = FilledSource(recipe, seed=recipe.data.seed, grad_accum_steps=trainer.world.grad_accum_steps)
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
        peak_gib = peak_memory_gib(device)
    finally:
        trainer.close()  # shuts the runtime down; the baseline needs none
    shapes = source.shapes[first_timed:]
    primary = [("understanding" if s.und_images else "generation" if s.gen_images else "text") for s in shapes]
    print(f"our micro-batches (timed): {len(shapes)}, mean {sum(s.tokens for s in shapes) / len(shapes):.0f} tokens, "
          f"mean {sum(len(s.doc_lengths) for s in shapes) / len(shapes):.1f} documents; primary task "
          + ", ".join(f"{t} {primary.count(t)}" for t in TASKS))
    cfg = recipe.model
    sizes, grads = MatmulSizes.from_config(cfg), Gradients.for_trainable(recipe.train.trainable, cfg.family)
    return {
        "name": f"janusflow, our Trainer ({'direct step' if mode == 'direct' else 'trainer step'})",
        "tokens": sum(s.tokens for s in shapes),
        "flops": sum(sum(sequence_flops(cfg, sizes, grads, s).values()) for s in shapes),
        "megatron_flops": megatron_flops(cfg.llm, [s.tokens for s in shapes]),
        "timed_token_counts": [s.tokens for s in shapes],
        "times": times, "micro": len(shapes), "params": params, "peak_memory_gib": peak_gib,
        "token_counts": [s.tokens for s in source.shapes],
    }


def run_baseline(recipe, args, device: torch.device, token_counts: list[int]) -> dict:
    """The same LLM as ``LlamaForCausalLM`` + AdamW, on micro-batches of the same token counts."""
    from transformers import LlamaConfig, LlamaForCausalLM

    llm, accum = recipe.model.llm, len(token_counts) // (args.warmup + args.steps)
    reset_peak_memory(device)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=llm.vocab_size, hidden_size=llm.hidden_size, intermediate_size=llm.ffn_hidden_size,
        num_hidden_layers=llm.num_layers, num_attention_heads=llm.num_attention_heads,
        num_key_value_heads=llm.query_groups, rope_theta=llm.rope_theta, rms_norm_eps=llm.norm_eps,
        max_position_embeddings=max(token_counts), tie_word_embeddings=False, attn_implementation="sdpa",
    )
    with torch.device(device):  # random weights drawn where they train: a 1.3B init on the CPU takes a while
        model = LlamaForCausalLM(config)
    model.train()
    o = recipe.optim
    optimizer = torch.optim.AdamW(model.parameters(), lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay)
    bf16 = device.type == "cuda" and recipe.train.precision == "bf16"
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    gen = torch.Generator().manual_seed(1)
    flops = tokens = 0
    times, timed_counts = [], []
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
                timed_counts.append(micro)
                flops += lm_training_flops(llm, micro, (micro,), micro)  # HF computes logits everywhere
        torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()
        if i >= args.warmup:
            times.append(time.perf_counter() - started)
    params = sum(p.numel() for p in model.parameters())
    peak_gib = peak_memory_gib(device)
    del model, optimizer
    gc.collect()
    return {"name": "LlamaForCausalLM + AdamW (same LLM, same tokens)", "tokens": tokens, "flops": flops,
            "megatron_flops": megatron_flops(llm, timed_counts), "timed_token_counts": timed_counts,
            "times": times, "micro": args.steps * accum, "params": params, "peak_memory_gib": peak_gib}


# ---------------------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default=os.path.join(ROOT, "recipes", "stage2.yaml" if cuda else "tiny_cpu.yaml"),
                   help="recipe to train (default: stage2.yaml on CUDA, tiny_cpu.yaml on CPU)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="extra recipe override (repeatable; default: none)")
    # Counts, the peak and the JSON path are checked while parsing (one error line naming the option):
    # --peak-tflops 0 was silently replaced by a measured peak and a negative or NaN one printed a
    # negative or NaN MFU; --threads 0 was silently ignored and a negative one a traceback; a JSON
    # path that cannot be written was a traceback after the whole run.
    p.add_argument("--steps", type=whole_number(1), default=10, help="timed optimizer steps (default 10)")
    p.add_argument("--warmup", type=whole_number(0), default=2, help="untimed optimizer steps first (default 2)")
    p.add_argument("--global-batch", type=whole_number(1), default=4,
                   help="sequences per optimizer step = micro-batches of 1 (default 4)")
    p.add_argument("--peak-tflops", type=finite_number(1e-3), default=None,
                   help="peak TFLOP/s for MFU, at least 0.001 (default: measured or the GPU's table entry, see above)")
    p.add_argument("--threads", type=whole_number(1), default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no-baseline", action="store_true", help="skip the transformers Llama baseline")
    p.add_argument("--mode", choices=("auto", "trainer", "direct"), default="auto",
                   help="auto: the Trainer's step, falling back to driving its engine directly if it fails "
                        "(default auto)")
    p.add_argument("--toy", action="store_true",
                   help="tiny recipe, 2 timed steps of 2 micro-batches after 1 warm-up: checks that the script runs "
                        "(replaces --recipe, --steps, --warmup and --global-batch)")
    p.add_argument("--json", dest="json_path", type=output_file, default=None, metavar="PATH",
                   help="also write the figures as JSON to PATH (rewritten after each run; default: none)")
    args = p.parse_args(argv)
    if args.toy:
        args.recipe = os.path.join(ROOT, "recipes", "tiny_cpu.yaml")
        args.steps, args.warmup, args.global_batch = 2, 1, 2
    return args


def main(argv=None) -> int:
    from pretrain.model.config import ConfigError

    args = parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)  # progress reaches a log file as it is printed
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    out_dir = tempfile.mkdtemp(prefix="train_throughput_")
    total = args.warmup + args.steps
    try:
        recipe = load_recipe(args.recipe, [
            "data.root=null", "train.init_from=null", "init.llm=null", "init.siglip=null", "init.vae=null",
            "init.janusflow=null", f"train.output_dir={out_dir}", "parallel.micro_batch_size=1",
            f"parallel.global_batch_size={args.global_batch}", "parallel.tensor_parallel=1",
            "parallel.pipeline_parallel=1", f"optim.steps={total}", "optim.warmup_steps=0",
            f"train.save_interval={total + 1}", *args.overrides,
        ])
    except (ConfigError, OSError) as err:  # a missing recipe or a bad --set: one line, not a traceback
        os.rmdir(out_dir)
        if isinstance(err, OSError):
            what = f"argument --recipe: {args.recipe}: {err.strerror or err}; give a recipe file, e.g. recipes/tiny_cpu.yaml"
        else:
            what = f"recipe {args.recipe} (with --set): {err}"
        print(f"train_throughput.py: error: {what}", file=sys.stderr)
        return 2
    peak, peak_how = device_peak(device, args.peak_tflops)
    llm = recipe.model.llm
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    print(f"device: {where}; peak {peak / 1e12:.3f} TFLOP/s ({peak_how})")
    print(f"recipe {os.path.relpath(args.recipe, ROOT)}: LLM {llm.num_layers} layers x {llm.hidden_size} "
          f"(vocab {llm.vocab_size}), sequences of up to {recipe.data.seq_length} tokens, micro-batch 1, "
          f"{args.global_batch} micro-batches per step, precision "
          f"{recipe.train.precision if device.type == 'cuda' else 'fp32 (CPU)'}, trainable {recipe.train.trainable}; "
          f"{args.steps} timed steps after {args.warmup} warm-up")

    header = {
        "device": where, "peak_flops": peak, "peak_how": peak_how, "recipe": os.path.relpath(args.recipe, ROOT),
        "seq_length": recipe.data.seq_length, "precision": recipe.train.precision if device.type == "cuda" else "fp32",
        "global_batch": args.global_batch, "steps": args.steps, "warmup": args.warmup, "toy": args.toy,
    }
    results = [run_ours(recipe, args, device)]
    write_json(args.json_path, header, results, peak)
    gc.collect()  # the trainer's model, optimizer and EMA go before the baseline's arrive
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if not args.no_baseline:
        results.append(run_baseline(recipe, args, device, results[0]["token_counts"]))
        write_json(args.json_path, header, results, peak)
    print_table(results, peak, device)
    return 0


def figures(r: dict, peak: float) -> dict:
    """Rates of one run over its timed steps (per GPU: these runs are a world of one)."""
    seconds, median = sum(r["times"]), statistics.median(r["times"])
    return {
        "name": r["name"], "params": r["params"], "tokens": r["tokens"], "micro_batches": r["micro"],
        "seconds": seconds, "median_step_s": median,
        "tokens_per_s": r["tokens"] / seconds,
        "tflops": r["flops"] / seconds / 1e12, "mfu": r["flops"] / seconds / peak,
        "megatron_tflops": r["megatron_flops"] / seconds / 1e12, "megatron_mfu": r["megatron_flops"] / seconds / peak,
        "flops_per_token": r["flops"] / r["tokens"], "megatron_flops_per_token": r["megatron_flops"] / r["tokens"],
        "peak_memory_gib": r["peak_memory_gib"], "micro_batch_tokens": r["timed_token_counts"],
    }


def write_json(path: str | None, header: dict, results: list[dict], peak: float) -> None:
    if not path:
        return
    runs = dict(zip(("ours", "baseline"), (figures(r, peak) for r in results)))
    with open(path, "w") as f:
        json.dump({**header, "runs": runs}, f, indent=1)


def print_table(results: list[dict], peak: float, device: torch.device) -> None:
    unit, scale = ("TFLOP/s", 1e12) if device.type == "cuda" else ("GFLOP/s", 1e9)
    memory = "peak GiB" if device.type == "cuda" else "RSS GiB"
    print(f"\n{'':50}{'':23}{'our FLOP count':^16}{'Megatron-LM count':^18}")
    print(f"{'run':<50}{'params':>13}{'tokens/s':>10}{unit:>9}{'MFU':>7}{unit:>10}{'MFU':>8}{memory:>10}"
          f"{'s/step':>8}{'median':>8}")
    for r in results:
        f = figures(r, peak)
        print(f"{r['name']:<50}{r['params']:>13,}{f['tokens_per_s']:>10,.0f}{f['tflops'] * 1e12 / scale:>9.2f}"
              f"{f['mfu']:>7.1%}{f['megatron_tflops'] * 1e12 / scale:>10.2f}{f['megatron_mfu']:>8.1%}"
              f"{f['peak_memory_gib']:>10.2f}{f['seconds'] / len(r['times']):>8.3f}{f['median_step_s']:>8.3f}")
    print("our count: LLM blocks, attention per document, logits at L_AR targets, SigLIP, generation modules, REPA; "
          "Megatron-LM's: the LLM only, dense attention over each micro-batch, logits everywhere")
    if len(results) == 2:
        ours, base = results
        ratio = sum(base["times"]) / sum(ours["times"])  # same tokens, so the time ratio is the throughput ratio
        print(f"\nours / baseline: tokens/s x{ratio * ours['tokens'] / base['tokens']:.2f}, "
              f"FLOP/s x{ratio * ours['flops'] / base['flops']:.2f} "
              f"(same {ours['tokens']:,} timed tokens; ours also runs SigLIP, the generation modules and REPA, "
              "attention per document, logits at targets only)")

if __name__ == "__main__":
    sys.exit(main())
