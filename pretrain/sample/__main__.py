"""Text-to-image: prompts -> PNG images, with a JanusFlow checkpoint (released or ours).

Example:
  python -m pretrain.sample --checkpoint JanusFlow-1.3B --vae sdxl-vae \\
      --prompt "a red cat on a wooden table" --prompt "a lighthouse at dusk" --out samples/

Each prompt is sampled from its own noise (one generator seeded by --seed, drawn for all prompts at
once, so an image does not depend on --batch-size) with --steps Euler steps from t=0 (noise) to t=1
(data) and classifier-free guidance v = w*v_cond - (w-1)*v_uncond, w = --cfg. The prompt is run
once and its keys/values cached; each step only recomputes the time and latent tokens. Images are
written as OUT/000.png, 001.png, ... in prompt order. Only local paths are read (never a hub).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

from .loading import add_model_arguments


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pretrain.sample", description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_arguments(parser)
    parser.add_argument("--prompt", action="append", required=True, help="a prompt (repeat for several)")
    parser.add_argument("--out", required=True, help="output folder for the PNG images")
    parser.add_argument("--steps", type=int, default=30, help="Euler steps (default 30)")
    parser.add_argument("--cfg", type=float, default=2.0, help="guidance weight w (default 2; 1 = no guidance)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the initial noise (default 0)")
    parser.add_argument("--batch-size", type=int, default=8, help="prompts sampled together (default 8)")
    parser.add_argument("--vae", help="local folder of the SDXL VAE (diffusers AutoencoderKL); needed unless "
                                      "the model's latents are pixels (latent_codec space_to_depth)")
    parser.add_argument("--save-latents", action="store_true", help="also write OUT/latents.safetensors")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.steps < 1 or args.batch_size < 1:
        parser.error("--steps and --batch-size must be at least 1")
    import torch

    from datacontract.tokenizer import load_tokenizer

    from .decode import build_decoder, save_png
    from .loading import describe, load_model_from_args
    from .text_to_image import generation_prompt_ids, initial_noise, sample_latents

    try:
        model, cfg, tokenizer_path = load_model_from_args(args)
        decoder = build_decoder(cfg, args.vae, next(model.parameters()).device)
        tokenizer = load_tokenizer(tokenizer_path)
    except (ValueError, FileNotFoundError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    if tokenizer.bos_token_id is None:
        print("error: the tokenizer defines no BOS token", file=sys.stderr)
        return 1
    print(describe(cfg))
    prompts = [generation_prompt_ids(tokenizer, p, tokenizer.bos_token_id) for p in args.prompt]
    noise = initial_noise(model, len(prompts), torch.Generator().manual_seed(args.seed))
    out = Path(args.out)
    latents = []
    for start in range(0, len(prompts), args.batch_size):
        batch = slice(start, start + args.batch_size)
        z = sample_latents(model, prompts[batch], args.steps, args.cfg, z0=noise[batch],
                           use_cache=not args.no_cache)
        latents.append(z.cpu())
        names = [out / f"{i:03d}.png" for i in range(start, start + len(z))]
        for path, prompt in zip(save_png(decoder(z), names), args.prompt[batch]):
            print(f"{path}\t{prompt}")
    if args.save_latents:
        from safetensors.torch import save_file

        save_file({"latents": torch.cat(latents).contiguous()}, str(out / "latents.safetensors"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
