"""The built-in demo: the whole stack on a laptop CPU, and a check that it learns.

  python -m pretrain.demo [--out runs/demo] [--nproc 2] [--steps N]

1. ``python -m data_tools synth``: shapes of six colours on plain backgrounds, with captions
   ("a small red circle in the top left on a black background"), colour questions and a held-out
   split whose generation prompts are colour x shape x position combinations never seen in training.
2. ``python -m data_tools build``: packed Arrow shards with the recipe's row length and grids.
3. DeepSpeed training on ``--nproc`` local processes (recipes/demo_cpu.yaml; TensorBoard logs and
   checkpoints under OUT/train; re-running resumes).
4. Sampling with the EMA weights, shared out over ``--nproc`` processes: an image for each held-out
   prompt (CFG, Euler steps), an answer to each held-out colour question (greedy, key/value cache);
   captioned grids of the first images
   (OUT/samples_grid.png: the prompt under each image; OUT/qa_grid.png: question and answer beside
   each image), also in TensorBoard.
5. ``pretrain.evaluate``: colour, shape and position of each generated image against its prompt,
   border cleanliness, and QA accuracy; a table with the demo's targets.
Each stage is skipped when its output exists, so an interrupted demo continues where it stopped.
The console gets one line per stage and progress bars; each child process's full output goes to
OUT/logs/. Every run of the same options prints the same figures: one thread per process, fixed
seeds, a fixed data order.
"""

from __future__ import annotations

import argparse
import functools
import json
import multiprocessing
import os
import resource
import shlex
import subprocess
import sys
import time
from collections import deque
from pathlib import Path
from typing import Callable, Iterator, Sequence

from pretrain.cli_args import finite_number, whole_number
# The output-folder checks the Janus-Pro demo (pretrain.januspro_demo) shares; StaleOutput and
# check_resume are also this module's own (tests and callers use demo.StaleOutput).
from pretrain.demo_outputs import (StaleOutput, changed_inputs, check_out, check_resume, data_set_damage, fitting_nproc,
                                   listed, yaml_text)

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "demo_cpu.yaml"
STAGES = 5
# The demo's targets on the held-out prompts (issue 16): (report key, field, comparison, target).
TARGETS = {"generation": 0.95, "shape": 0.80, "position": 0.90, "qa": 0.95, "cleanliness": 10.0}
GRID_IMAGES = 32
QA_GRID_IMAGES = 16


def _stage_line(number: int, text: str) -> None:
    print(f"[demo {number}/{STAGES}] {text}", flush=True)


def _child_env() -> dict:
    env = dict(os.environ)
    # Children import this checkout's packages even where it is not pip-installed.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    # One thread per process: the same reduction order (so the same figures) on any machine, and
    # no oversubscription of a 2-core laptop. Also keeps torchrun from printing its advice about it.
    env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = "1"
    env["PYTHONUNBUFFERED"] = "1"  # progress lines arrive as they are printed
    return env


def _run(cmd: list[str], log: Path, progress_total: int | None = None) -> float:
    """Run ``cmd`` with its output in ``log``; a progress bar follows its ``[train] step N/M`` lines
    when ``progress_total`` is given. Returns the seconds it took; on failure exits with the child's
    own ``error: ...`` line when it printed one, else after printing the end of the log."""
    from tqdm import tqdm

    log.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    tail: deque[str] = deque(maxlen=40)
    refusal = None  # the first "error: ..." line: how pretrain.main and data_tools refuse their input
    bar = tqdm(total=progress_total, unit="step", leave=False, disable=None) if progress_total else None
    with log.open("w", buffering=1) as sink, subprocess.Popen(cmd, cwd=REPO, env=_child_env(), stdout=subprocess.PIPE,
                                                  stderr=subprocess.STDOUT, text=True) as proc:
        for line in proc.stdout:
            sink.write(line)
            tail.append(line)
            if refusal is None and line.startswith("error: "):
                refusal = line.strip()
            if bar is not None and line.startswith("[train] step "):
                done = int(line.split()[2].split("/")[0])
                bar.update(done - bar.n)
        code = proc.wait()
    if bar is not None:
        bar.close()
    if code and refusal:
        # That line says what is wrong and what to do (a damaged checkpoint, a recipe that does not
        # fit); under torchrun it used to end up above 40 lines of its launcher's traceback.
        raise SystemExit(f"[demo] {refusal} (whole output: {log})")
    if code:
        sys.stderr.write("".join(tail))
        raise SystemExit(f"[demo] failed (exit {code}): {' '.join(cmd)}\n[demo] whole output: {log}")
    return time.perf_counter() - started


def build_layout(recipe) -> dict[str, int]:
    """The ``data_tools build`` settings whose shards ``recipe`` trains on (keys of the shards'
    manifest ``config.layout``): read from the recipe, so an edited recipe gets matching shards."""
    model, data = recipe.model, recipe.data
    return {"resolution": data.resolution, "und_patch": model.und_encoder.patch_size,
            "gen_downsample": data.resolution // model.gen_vision.latent_size,
            "gen_patch": model.gen_vision.patch_size, "seq_length": data.seq_length}


def make_data(out: Path, train: int, heldout: int, workers: int, layout: dict[str, int]) -> None:
    """Stages 1 and 2; ``layout``: ``build_layout`` of the demo's recipe. Raises ``StaleOutput`` when
    OUT's data set or shards were made with other settings (their checkpoints would not fit the
    model, or the figures would be of another data set) or are damaged."""
    raw, shards = out / "raw", out / "shards"
    start_afresh = f"remove it (rm -rf {shlex.quote(str(out))}) and run the demo again"  # OUT may hold spaces
    made = raw / "synth.json"  # synth writes it last: without it, stage 1 stopped part way and is redone
    if made.exists():
        check_data_set(raw, train, heldout, start_afresh)
        _stage_line(1, f"shapes data set: already in {raw}")
    else:
        took = _run([sys.executable, "-m", "data_tools", "synth", "--out", str(raw), "--train", str(train),
                     "--heldout", str(heldout), "--overwrite"], out / "logs" / "synth.log")
        _stage_line(1, f"synthesised the shapes data set ({train} training samples per task, {heldout} held-out) "
                       f"in {took:.0f}s -> {raw}")
    manifest = shards / "manifest.json"
    if manifest.exists():
        from datacontract.shards import read_manifest

        try:
            done = read_manifest(str(shards))
            built = done["config"]["layout"]
            differ = [f"{key} {built.get(key)} (recipe: {value})" for key, value in layout.items()
                      if built.get(key) != value]
            if differ:
                raise StaleOutput(f"{shards} was built for another recipe: {', '.join(differ)}; {out} comes from "
                                  f"an older demo or an edited recipe: {start_afresh}")
            changed = changed_inputs(done["input_fingerprints"], raw / "train")
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            raise StaleOutput(f"{manifest} cannot be read ({type(err).__name__}: {err}); {out} is damaged: "
                              f"{start_afresh}") from None
        if changed:  # e.g. raw/ removed by hand and synthesised again, perhaps with other counts
            raise StaleOutput(f"{shards} was packed from other files than those now in {raw / 'train'} "
                              f"({listed(changed)}): remove the shards "
                              f"(rm -rf {shlex.quote(str(shards))}) to pack this data set, or {start_afresh}")
        _stage_line(2, f"training shards: already in {shards}")
        return
    t = raw / "train"
    settings = [arg for key, value in layout.items() for arg in (f"--{key.replace('_', '-')}", str(value))]
    took = _run([sys.executable, "-m", "data_tools", "build", "--tokenizer", str(raw / "tokenizer"), "--out", str(shards),
                 "--gen-wds", str(t / "gen-*.tar"), "--und-wds", str(t / "und-*.tar"), "--llava", str(t / "qa.json"),
                 "--text-jsonl", str(t / "text.jsonl"), *settings, "--image-format", "png",
                 "--workers", str(workers), "--quiet"], out / "logs" / "build.log")
    _stage_line(2, f"packed the training shards in {took:.0f}s -> {shards}")


def check_data_set(raw: Path, train: int, heldout: int, start_afresh: str) -> None:
    """``raw``, a finished synth output, is the data set of these options (an earlier demo's, with
    other counts, was reused without a word: its figures were printed as this run's) and its
    held-out file and tokenizer read (a damaged or removed one stopped the demo at stage 4, after
    the training); ``StaleOutput`` otherwise."""
    made = raw / "synth.json"
    try:
        meta = json.loads(made.read_text())
        had = {"--train-samples": meta["train"], "--heldout": meta["heldout"]}
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise StaleOutput(f"{made} cannot be read ({type(err).__name__}: {err}); {raw.parent} is damaged: "
                          f"{start_afresh}") from None
    wanted = {"--train-samples": train, "--heldout": heldout}
    if had != wanted:
        given = " ".join(f"{key} {value}" for key, value in had.items())
        raise StaleOutput(f"{raw} was synthesised with {given}, not {' '.join(f'{k} {v}' for k, v in wanted.items())}: "
                          f"give those options to continue that demo, or {start_afresh}")
    damage = data_set_damage(raw)
    if damage:
        raise StaleOutput(f"{damage}; {raw.parent} is damaged: {start_afresh}")


def train(out: Path, nproc: int, steps: int | None, optim) -> None:
    """``optim``: the demo recipe's ``OptimConfig`` (the run's length and schedule)."""
    total = steps or optim.steps
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(REPO / "pretrain" / "main.py"), "--recipe", str(RECIPE),
           "--set", f"data.root={yaml_text(out / 'shards')}", "--set", f"train.output_dir={yaml_text(out / 'train')}"]
    if steps:  # the run's length (shorter or longer than the recipe's), not a stop inside it
        warmup = min(optim.warmup_steps, steps)
        cmd += ["--set", f"optim.steps={steps}", "--set", f"optim.warmup_steps={warmup}",
                "--set", f"optim.decay_steps={min(optim.decay_steps, steps - warmup)}"]
    took = _run(cmd, out / "logs" / "train.log", progress_total=total)
    _stage_line(3, f"trained {total} steps with DeepSpeed on {nproc} processes in {took:.0f}s "
                   f"(log: {out / 'logs' / 'train.log'})")


GEN_BATCH = 16  # prompts sampled together (one CFG batch of 2 x 16 rows)
QA_CHUNK = 25  # questions per task of the sampling pool

# The sampling worker's state (model, tokenizer, ...), set once per process by ``_start_sampler``.
_SAMPLER: dict = {}


def _start_sampler(out: Path, sampler: dict) -> None:
    """A worker's first task: one thread, a world of one, the EMA weights, the tokenizer, the
    decoder. (Not a pool initializer: a pool replaces a worker whose initializer fails, forever,
    so missing or damaged weights would hang the demo instead of stopping it with their error.)"""
    from pretrain.runtime.distributed import init_runtime  # first: it silences start-up noise

    import torch

    from datacontract.tokenizer import load_tokenizer, resolve_token_spec
    from pretrain.export import run_weights
    from pretrain.sample.decode import build_decoder
    from pretrain.sample.loading import build_inference_model

    torch.set_num_threads(1)  # the same figures on any machine (see _child_env)
    # Each worker is a world of one on a port of its own. Rendezvous variables inherited from the
    # parent (a launcher's, or those a runtime started in the parent sets) would make every worker
    # bind the same port: all but one would fail with EADDRINUSE.
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        os.environ.pop(key, None)
    init_runtime()
    state, cfg, tag = run_weights(out / "train", weights="ema")
    tokenizer = load_tokenizer(str(out / "raw" / "tokenizer"))
    _SAMPLER.update(sampler=sampler, cfg=cfg, tag=tag, model=build_inference_model(cfg, state),
                    tokenizer=tokenizer, tokens=resolve_token_spec(tokenizer), decode=build_decoder(cfg),
                    spec=json.loads((out / "raw" / "heldout" / "eval.json").read_text()))


def _sampling_task(task: tuple[str, int], out: Path, sampler: dict):
    """("gen", start): the images of prompts start.. start+GEN_BATCH, saved as PNGs, returned as
    pixels; ("qa", start): the answers to questions start.. start+QA_CHUNK. Each batch's noise comes
    from its own seed, so the figures do not depend on how the tasks are shared out."""
    if not _SAMPLER:
        _start_sampler(out, sampler)
    import torch

    from pretrain.sample.decode import save_png
    from pretrain.sample.text_to_image import generation_prompt_ids, sample_latents
    from pretrain.sample.understanding import generate_answer, load_understanding_image, understanding_prompt

    kind, start = task
    w = _SAMPLER
    spec, tokenizer, tokens = w["spec"], w["tokenizer"], w["tokens"]
    if kind == "gen":
        batch = spec["generation"][start:start + GEN_BATCH]
        prompts = [generation_prompt_ids(tokenizer, it["prompt"], tokens.bos_id) for it in batch]
        generator = torch.Generator().manual_seed(start)
        pixels = w["decode"](sample_latents(w["model"], prompts, generator=generator, **w["sampler"]))
        save_png(pixels, [out / "eval" / "generated" / f"{it['index']}.png" for it in batch])
        return kind, start, pixels, w["tag"]
    answers = []
    for item in spec["qa"][start:start + QA_CHUNK]:
        pixels = load_understanding_image(str(out / "raw" / "heldout" / item["image"]), w["cfg"].und_encoder.image_size)
        ids, kinds = understanding_prompt(tokenizer, tokens, item["question"], w["cfg"].und_encoder.num_image_tokens)
        answer = generate_answer(w["model"], ids, kinds, pixels, tokens.eos_id, max_new_tokens=4)
        answers.append(tokenizer.decode(answer).strip())
    return kind, start, answers, w["tag"]


def share_out(work: Callable, tasks: Sequence, processes: int) -> Iterator:
    """``work(task)`` for each task on ``processes`` fresh interpreters (spawn: no forked copy of
    this process's threads or open files), results in the order they finish. The first failure
    ends it: a task's exception is raised here, and a worker that dies (killed, out of memory)
    raises ``BrokenProcessPool`` instead of leaving its task waited for; the tasks not started are
    dropped."""
    from concurrent.futures import ProcessPoolExecutor, as_completed

    pool = ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn"))
    try:
        for future in as_completed([pool.submit(work, task) for task in tasks]):
            yield future.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def sampler_settings(args: argparse.Namespace, loss) -> dict:
    """``sample_latents``' keyword arguments from the demo's options; ``loss``: the recipe's
    ``LossConfig`` (the logit_normal schedule follows the training's time distribution)."""
    return dict(cfg_weight=args.cfg, steps=args.euler_steps, schedule=args.schedule,
                guidance_until=args.guidance_until, time_mean=loss.rf_time_mean, time_std=loss.rf_time_std)


def sample_and_answer(out: Path, sampler: dict, processes: int = 2) -> tuple[Path, Path, dict]:
    """Images for the held-out prompts and answers to the held-out questions, from the EMA weights,
    shared out over ``processes`` worker processes of one thread each (the figures do not depend on
    their number). ``sampler``: keyword arguments of ``sample_latents`` (cfg_weight, steps,
    schedule, guidance_until, time_mean, time_std). Returns the images' folder, the answers file and
    the grids {TensorBoard tag: [3, H, W]}."""
    from pretrain.runtime.quiet import silence_known_warnings

    silence_known_warnings()  # before the imports below reach megatron-core
    import torch
    from tqdm import tqdm

    from pretrain.sample.decode import save_png

    started = time.perf_counter()
    heldout = out / "raw" / "heldout"
    spec = json.loads((heldout / "eval.json").read_text())
    generated, answers = out / "eval" / "generated", out / "eval" / "answers.jsonl"
    generated.mkdir(parents=True, exist_ok=True)
    # Every <index>.png here is scored: those of an earlier run go, so none is scored unseen (and a
    # padded name such as 007.png beside this run's 7.png no longer stops the evaluation).
    for name in os.listdir(generated):
        stem, ext = os.path.splitext(name)
        if ext.lower() == ".png" and stem.isascii() and stem.isdigit():
            (generated / name).unlink()
    items, questions = spec["generation"], spec["qa"]
    tasks = [("gen", s) for s in range(0, len(items), GEN_BATCH)] + [("qa", s) for s in range(0, len(questions), QA_CHUNK)]
    images, replies, tags = {}, {}, set()
    work = functools.partial(_sampling_task, out=out, sampler=sampler)
    for kind, start, result, tag in tqdm(share_out(work, tasks, processes), total=len(tasks),
                                         desc="images and answers", unit="task", leave=False, disable=None):
        (images if kind == "gen" else replies)[start] = result
        tags.add(tag)
    qa_rows = [(item, answer) for start in sorted(replies)
               for item, answer in zip(questions[start:start + QA_CHUNK], replies[start])]
    with answers.open("w") as f:
        f.writelines(json.dumps({"index": item["index"], "answer": answer}) + "\n" for item, answer in qa_rows)
    pictures = torch.cat([images[s] for s in sorted(images)])
    grids = {"demo/heldout_samples": _samples_grid(pictures[:GRID_IMAGES], items[:GRID_IMAGES]),
             "demo/heldout_qa": _qa_grid(heldout, qa_rows[:QA_GRID_IMAGES])}
    save_png(grids["demo/heldout_samples"][None], [out / "samples_grid.png"])
    save_png(grids["demo/heldout_qa"][None], [out / "qa_grid.png"])
    until = sampler["guidance_until"]
    guidance = f"CFG w={sampler['cfg_weight']:g} " + ("to the data" if until >= 1 else f"until t={until:g}")
    _stage_line(4, f"sampled {len(items)} held-out images (EMA weights of {', '.join(sorted(tags))}, "
                   f"{guidance}, {sampler['steps']} "
                   f"{sampler['schedule']} Euler steps) and answered {len(questions)} questions on {processes} "
                   f"processes in {time.perf_counter() - started:.0f}s")
    return generated, answers, grids


def _samples_grid(images, items):
    from pretrain.train.image_grid import tile_images

    return tile_images(images, columns=8, captions=[it["prompt"] for it in items], caption_lines=4)


def _qa_grid(heldout: Path, rows):
    import numpy as np
    import torch
    from PIL import Image

    from pretrain.evaluate import answer_is_right
    from pretrain.train.image_grid import tile_images

    pictures = torch.stack([torch.from_numpy(np.asarray(Image.open(heldout / item["image"]).convert("RGB"),
                                                        dtype=np.float32) / 255.0).permute(2, 0, 1)
                            for item, _ in rows])
    captions = [f"{item['question']} model: {answer!r} ({'right' if answer_is_right(answer, item['answer']) else 'WRONG'}; "
                f"expected {item['answer']})" for item, answer in rows]
    return tile_images(pictures, columns=4, captions=captions, caption_width=150)


def format_targets(report: dict) -> str:
    """The evaluation's figures against the demo's targets, one line each."""
    lines = [f"{'held-out measure':<30}{'value':>8}  {'target':<8}  count"]
    for key, label in (("generation", "generation colour accuracy"), ("shape", "generation shape accuracy"),
                       ("position", "generation position accuracy"), ("qa", "colour QA accuracy")):
        if key in report:
            r = report[key]
            mark = "ok" if r["accuracy"] >= TARGETS[key] else "BELOW"
            lines.append(f"{label:<30}{r['accuracy']:>8.3f}  >= {TARGETS[key]:<5.2f}  {r['right']}/{r['total']} {mark}")
    if "cleanliness" in report:
        c = report["cleanliness"]
        mark = "ok" if c["mean"] <= TARGETS["cleanliness"] else "ABOVE"
        lines.append(f"{'border error, 0-255 (mean)':<30}{c['mean']:>8.1f}  <= {TARGETS['cleanliness']:<5g}  "
                     f"median {c['median']:.1f} {mark}")
    lines.append(f"{'chance (colour)':<30}{report['chance']:>8.3f}")
    return "\n".join(lines)


def _log_to_tensorboard(out: Path, grids: dict, table: str) -> Path:
    from torch.utils.tensorboard import SummaryWriter

    folder = out / "train" / "tensorboard"
    writer = SummaryWriter(log_dir=str(folder))
    for tag, image in grids.items():
        writer.add_image(tag, image, 0, dataformats="CHW")
    writer.add_text("demo/heldout_figures", "    " + table.replace("\n", "\n    "), 0)  # markdown code block
    writer.close()
    return folder


def _cpu_seconds() -> float:
    """CPU time of this process and of its finished children (all training ranks included)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """--help keeps the docstring's layout and shows every default."""


# Counts of at least 1: zero or less failed in a child process after the earlier stages' work, and
# --steps 0 trained the recipe's whole run. NaN guidance was sampled and its figures reported.
_WHOLE = whole_number(1)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pretrain.demo", description=__doc__.split("\n\n")[0],
                                     formatter_class=_HelpFormatter, epilog=__doc__)
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "demo", help="where everything is written")
    parser.add_argument("--nproc", type=_WHOLE, default=2,
                        help="processes for training (DeepSpeed data parallel) and for sampling")
    parser.add_argument("--steps", type=_WHOLE, default=None,
                        help="optimizer steps of the run (None: the recipe's optim.steps)")
    parser.add_argument("--train-samples", type=_WHOLE, default=3000, help="synthetic samples per training file")
    parser.add_argument("--heldout", type=_WHOLE, default=200, help="held-out prompts and questions")
    # Step times at the quantiles of the training's (shifted) logit-normal (issue 16). Guidance w = 5 all
    # the way to the data drew more small shapes than w = 4 until t = 0.5 in each of four runs (training
    # seeds 0 and 1, 1800 and 3600 steps; shape +0.004 to +0.042 averaged over four noise seeds each),
    # for border error 2-4 points higher: docs/demo_research.md.
    parser.add_argument("--cfg", type=finite_number(), default=5.0, help="classifier-free guidance weight")
    parser.add_argument("--guidance-until", type=finite_number(0.0, 1.0), default=1.0,
                        help="time (0 noise .. 1 data) from which guidance stops (1: guided all the way)")
    parser.add_argument("--euler-steps", type=_WHOLE, default=30, help="Euler steps per image")
    parser.add_argument("--schedule", choices=("uniform", "logit_normal"), default="logit_normal",
                        help="the Euler steps' times: uniform, or the quantiles of the training's times")
    return parser


def main(argv=None) -> int:
    try:
        return _demo(argv)
    except KeyboardInterrupt:  # Ctrl-C (the children stop with it): a line, not a traceback
        print("[demo] interrupted: run the same command again to continue where it stopped", file=sys.stderr)
        return 130


def _demo(argv) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # The children run in the repository: a relative OUT was theirs, not the caller's (the data set
    # went to REPO/OUT, the logs to ./OUT, and stage 4 did not find the data set).
    args.out = args.out.absolute()
    started = time.perf_counter()
    from pretrain.model.config import ConfigError
    from pretrain.recipe import load_recipe

    try:  # checked before any work: an edited recipe that does not hold together costs one line
        recipe = load_recipe(RECIPE)
    except ConfigError as err:
        print(f"[demo] {RECIPE}: {err}", file=sys.stderr)
        return 2
    fits = fitting_nproc(recipe)
    if args.nproc not in fits:  # else found by every training process, after stages 1 and 2
        parser.error(f"argument --nproc: the demo recipe's batch (parallel.global_batch_size "
                     f"{recipe.parallel.global_batch_size}, micro_batch_size {recipe.parallel.micro_batch_size}) "
                     f"trains on {' or '.join(map(str, fits)) or 'no number of'} processes, not {args.nproc}")
    unusable = check_out(args.out, f"--out {args.out}")
    if unusable:
        print(f"[demo] {unusable}", file=sys.stderr)
        return 2
    try:
        check_resume(args.out, args.nproc, args.steps or recipe.optim.steps)
        make_data(args.out, args.train_samples, args.heldout, args.nproc, build_layout(recipe))
    except StaleOutput as err:
        print(f"[demo] {err}", file=sys.stderr)
        return 2
    train(args.out, args.nproc, args.steps, recipe.optim)
    generated, answers, grids = sample_and_answer(args.out, sampler_settings(args, recipe.loss), args.nproc)
    from pretrain.evaluate import evaluate

    report, details = evaluate(str(args.out / "raw" / "heldout"), str(generated), str(answers))
    (args.out / "eval" / "details.jsonl").write_text("".join(json.dumps(d) + "\n" for d in details))
    (args.out / "eval" / "report.json").write_text(json.dumps(report, indent=2))
    table = format_targets(report)
    tensorboard = _log_to_tensorboard(args.out, grids, table)
    _stage_line(5, f"evaluated against the held-out prompts and questions -> {args.out / 'eval' / 'report.json'}")
    print(table)
    print(f"[demo] finished in {time.perf_counter() - started:.0f}s ({_cpu_seconds():.0f} CPU-seconds); "
          f"images: {args.out / 'samples_grid.png'}, {args.out / 'qa_grid.png'}; "
          f"TensorBoard: tensorboard --logdir {tensorboard}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
