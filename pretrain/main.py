"""Entry point: ``deepspeed pretrain/main.py --recipe recipes/stage2.yaml [--set key=value ...]``.

Builds the runtime (torch.distributed, megatron-core parallel state, DeepSpeed), the model in the
recipe's parallel layout, and trains it with DeepSpeed; it resumes from the newest complete
checkpoint in ``train.output_dir`` when there is one. Launch it with ``launch.sh`` (local or SLURM),
``deepspeed`` or ``torchrun``; a plain ``python -m pretrain.main`` is a world of one.
"""

from __future__ import annotations

import argparse
import sys


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


def main(argv=None) -> int:
    args = parse_args(argv)
    from pretrain.recipe import load_recipe
    from pretrain.model.config import ConfigError

    try:
        recipe = load_recipe(args.recipe, args.overrides)
    except (ConfigError, FileNotFoundError) as err:
        print(f"error: {args.recipe}: {err}", file=sys.stderr)
        return 2
    from pretrain.train.trainer import Trainer

    trainer = Trainer(recipe, max_steps=args.steps)
    try:
        trainer.train()
    finally:
        trainer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
