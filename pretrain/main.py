"""Entry point: ``deepspeed pretrain/main.py --recipe recipes/stage2.yaml [--set key=value ...]``.

Builds the runtime (torch.distributed, megatron-core parallel state, DeepSpeed), the model in the
recipe's parallel layout, and trains it with DeepSpeed; it resumes from the newest complete
checkpoint in ``train.output_dir`` when there is one. Launch it with ``launch.sh`` (local or SLURM),
``deepspeed`` or ``torchrun``; a plain ``python -m pretrain.main`` is a world of one.

Before anything is built, ``pretrain.train.preflight`` checks the recipe against the launch and the
disk. A bad recipe, launch or checkpoint ends with one ``error: ...`` line (rank 0) and exit code 2,
not a traceback from every rank; a failed start never replaces the run's recorded ``recipe.yaml``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="pretrain.main",
        description="Train JanusFlow from a recipe (YAML in recipes/).",
        epilog="Example: python -m pretrain.main --recipe recipes/tiny_cpu.yaml --set optim.lr=5e-4",
    )
    parser.add_argument("--recipe", required=True, help="path of the YAML recipe")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override any recipe key, e.g. --set parallel.tensor_parallel=2 (repeatable)",
    )
    parser.add_argument("--steps", type=int, default=None, help="stop after this many steps (default: optim.steps)")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by deepspeed
    return parser.parse_args(argv)


def _report(err: Exception, rank: int) -> int:
    # Collective verdicts (preflight, checkpoint verification) are the same on every rank: rank 0
    # says it. A rank-local one is said by the rank that found it.
    if rank == 0 or not getattr(err, "all_ranks", True):
        print(f"error: {err}", file=sys.stderr, flush=True)
    return 2


def main(argv=None) -> int:
    args = parse_args(argv)
    from pretrain.model.config import ConfigError
    from pretrain.recipe import load_recipe

    try:
        recipe = load_recipe(args.recipe, args.overrides)
    except ConfigError as err:
        # A key's error gets the file it is in; one about the file itself (or its empty path) names it.
        named = str(err).startswith(f"{args.recipe}: ") or not args.recipe.strip()
        print(f"error: {err if named else f'{args.recipe}: {err}'}", file=sys.stderr)
        return 2
    except OSError as err:  # missing, no permission, a name too long, a file in the path
        print(f"error: --recipe: cannot read {args.recipe} ({err.strerror or err}); give a recipe YAML such as "
              "recipes/tiny_cpu.yaml", file=sys.stderr)
        return 2
    # Before DeepSpeed is imported (it reads DS_ACCELERATOR then) and before the launch's variables are
    # read: a bad one is one line from the process that has it, not a traceback or a rendezvous hang.
    from pretrain.runtime.distributed import LaunchError, check_launch_environment

    try:
        rank, world_size = check_launch_environment()
    except LaunchError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from pretrain.train.preflight import RUN_RECIPE_FILE, preflight
    from pretrain.train.safe_load import CheckpointError

    try:
        preflight(recipe, args.steps, world_size, rank)
    except (ConfigError, CheckpointError) as err:
        return _report(err, rank)
    import torch

    from pretrain.runtime.distributed import shutdown_runtime
    from pretrain.train.trainer import Trainer

    # The trainer records the recipe before it resumes; a resume that fails must leave the run's
    # record (what export and train.init_from read) as it was.
    record = Path(recipe.train.output_dir) / RUN_RECIPE_FILE
    recorded = record.read_bytes() if rank == 0 and record.exists() else None
    trainer = None
    # Called inside a process that already runs the distributed runtime (tests, notebooks), a failed
    # start must leave that runtime running, as a closed trainer does.
    owns_runtime = not torch.distributed.is_initialized()
    try:
        trainer = Trainer(recipe, max_steps=args.steps)
        trainer.train()
    except BaseException as err:
        if trainer is None and recorded is not None:
            record.write_bytes(recorded)
        if isinstance(err, (CheckpointError, ConfigError)):
            return _report(err, rank)
        raise
    finally:
        if trainer is not None:
            trainer.close()
        elif owns_runtime:
            shutdown_runtime()
    return 0


if __name__ == "__main__":
    sys.exit(main())
