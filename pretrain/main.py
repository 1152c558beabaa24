"""Entry point: ``deepspeed pretrain/main.py --recipe recipes/stage2.yaml [--set key=value ...]``.

Until the DeepSpeed trainer lands this runs the smoke job: the recipe's model, built on megatron-core
in the recipe's parallel layout, trained for a few steps on synthetic packed batches with all three
objectives, printing one line per step.
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
    from .recipe import load_recipe
    from .model.config import ConfigError

    try:
        recipe = load_recipe(args.recipe, args.overrides)
    except (ConfigError, FileNotFoundError) as err:
        print(f"error: {args.recipe}: {err}", file=sys.stderr)
        return 2
    from .smoke import run_smoke

    run_smoke(recipe, steps=args.steps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
