"""Image understanding: an image and a question -> the model's answer, printed.

Example:
  python -m pretrain.chat --checkpoint JanusFlow-1.3B --image cat.jpg --question "What is on the table?"

Either family (the checkpoint's model config says which): JanusFlow's image begins with its learned
begin-of-image embedding, Janus-Pro's with the plain <begin_of_image> token.

The image is resized (long side to the model's resolution, bicubic) and padded to a square with
grey (127, 127, 127), as in the training shards; the prompt is
"[system\\n\\n]User: <image>\\n{question}\\n\\nAssistant:". Decoding is greedy unless --top-p is
given (nucleus sampling at --temperature, seeded by --seed); it stops at the end-of-sentence token
or after --max-new-tokens. The prompt is run once into a key/value cache, then one token per step.
Only local paths are read (never a hub).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

from .sample.loading import add_model_arguments, finite_float


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pretrain.chat", description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_arguments(parser)
    parser.add_argument("--image", required=True, help="image file (any format PIL reads)")
    parser.add_argument("--question", required=True, help="the question about the image")
    parser.add_argument("--system-prompt", default="", help="text before the user turn (default: none)")
    parser.add_argument("--top-p", type=finite_float, default=None,
                        help="nucleus sampling mass in (0, 1] (default: greedy)")
    parser.add_argument("--temperature", type=finite_float, default=None,
                        help="softmax temperature with --top-p, >= 0 (default 1; 0 = greedy)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the sampling draws, 0 to 2**32 - 1 (default 0)")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="answer length limit (default 256)")
    return parser


def _check_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Option values no run can use: ``parser.error`` (exit 2) before anything is loaded."""
    from .sample.loading import check_model_options, check_seed

    if args.top_p is not None and not 0 < args.top_p <= 1:
        parser.error(f"--top-p: {args.top_p} must be in (0, 1]")
    if args.temperature is not None and args.top_p is None:  # greedy decoding would ignore it unsaid
        parser.error("--temperature applies to nucleus sampling: give --top-p too (1 samples from the whole "
                     "distribution)")
    args.temperature = 1.0 if args.temperature is None else args.temperature
    if args.temperature < 0:  # a negative temperature turns the distribution upside down
        parser.error(f"--temperature: {args.temperature} must be >= 0")
    if args.max_new_tokens < 1:
        parser.error("--max-new-tokens must be at least 1")
    check_seed(parser, args.seed)
    check_model_options(parser, args)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_options(parser, args)
    import torch

    from datacontract.tokenizer import resolve_token_spec

    from .sample.loading import error_line, load_model_from_args
    from .sample.understanding import generate_answer, load_understanding_image, understanding_prompt

    try:
        if not Path(args.image).is_file():  # before the model is loaded
            raise FileNotFoundError(f"--image {args.image}: no such file")
        model, cfg, tokenizer = load_model_from_args(args)
        spec = resolve_token_spec(tokenizer)
        pixels = load_understanding_image(args.image, cfg.und_encoder.image_size)
    except (ValueError, OSError) as err:
        print(f"error: {error_line(err)}", file=sys.stderr)
        return 1
    if cfg.family == "januspro":
        from .sample.januspro import understanding_prompt as prompt_for
    else:
        prompt_for = understanding_prompt
    ids, kinds = prompt_for(
        tokenizer, spec, args.question, cfg.und_encoder.num_image_tokens, args.system_prompt
    )
    answer = generate_answer(
        model, ids, kinds, pixels, spec.eos_id, args.max_new_tokens, args.top_p, args.temperature,
        torch.Generator().manual_seed(args.seed), use_cache=not args.no_cache,
    )
    print(tokenizer.decode(answer, skip_special_tokens=True).strip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
