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
from typing import Optional, Sequence

from .sample.loading import add_model_arguments


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pretrain.chat", description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_arguments(parser)
    parser.add_argument("--image", required=True, help="image file (any format PIL reads)")
    parser.add_argument("--question", required=True, help="the question about the image")
    parser.add_argument("--system-prompt", default="", help="text before the user turn (default: none)")
    parser.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass (default: greedy)")
    parser.add_argument("--temperature", type=float, default=1.0, help="softmax temperature with --top-p")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampling draws (default 0)")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="answer length limit (default 256)")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.top_p is not None and not 0 < args.top_p <= 1:
        parser.error("--top-p must be in (0, 1]")
    if args.max_new_tokens < 1:
        parser.error("--max-new-tokens must be at least 1")
    import torch

    from datacontract.tokenizer import load_tokenizer, resolve_token_spec

    from .sample.loading import load_model_from_args
    from .sample.understanding import generate_answer, load_understanding_image, understanding_prompt

    try:
        model, cfg, tokenizer_path = load_model_from_args(args)
        tokenizer = load_tokenizer(tokenizer_path)
        spec = resolve_token_spec(tokenizer)
        pixels = load_understanding_image(args.image, cfg.und_encoder.image_size)
    except (ValueError, FileNotFoundError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    if cfg.family == "januspro":
        from .sample.januspro import understanding_prompt
    ids, kinds = understanding_prompt(
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
