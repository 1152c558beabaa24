"""Text-to-image: prompts -> PNG images, with a JanusFlow or Janus-Pro checkpoint (released or ours).

Examples:
  python -m pretrain.sample --checkpoint JanusFlow-1.3B --vae sdxl-vae \\
      --prompt "a red cat on a wooden table" --prompt "a lighthouse at dusk" --out samples/
  python -m pretrain.sample --checkpoint januspro-1b/model.safetensors --tokenizer Janus-Pro-1B \\
      --prompt-template "<|User|>: {prompt}\\n\\n<|Assistant|>:" --prompt "a red cat" --out samples/

The checkpoint's model config says which family. JanusFlow: each prompt is sampled from its own
noise (one generator seeded by --seed, drawn for all prompts at once, so an image does not depend on
--batch-size) with --steps Euler steps from t=0 (noise) to t=1 (data) and classifier-free guidance
v = w*v_cond - (w-1)*v_uncond, w = --cfg; the prompt is run once and its keys/values cached.
Janus-Pro: the image's codes are drawn one at a time from softmax((l_u + w*(l_c - l_u)) / T) (guidance
on the logits of the conditional and unconditional rows, then --temperature; --top-k/--top-p
optional), each prompt from its own generator seeded by (--seed, prompt index); the prompts and the
codes drawn so far are cached; the codes decode through the image codec (--codec) and become uint8
by truncation, as released. Images are written as OUT/000.png, 001.png, ... in prompt order. Only
local paths are read (never a hub).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

from .loading import add_model_arguments, finite_float

LATENTS_FILE = "latents.safetensors"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pretrain.sample", description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_arguments(parser)
    parser.add_argument("--prompt", action="append", required=True, help="a prompt (repeat for several)")
    parser.add_argument("--out", required=True, help="output folder for the PNG images")
    parser.add_argument("--cfg", type=finite_float, default=None,
                        help="guidance weight w (default: 2 for JanusFlow, 5 for Janus-Pro as released; 1 = none)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the noise / code draws, 0 to 2**32 - 1 (default 0)")
    parser.add_argument("--batch-size", type=int, default=8, help="prompts sampled together (default 8)")
    parser.add_argument("--save-latents", action="store_true",
                        help="also write OUT/latents.safetensors (JanusFlow: the latents; Janus-Pro: the codes)")
    flow = parser.add_argument_group("JanusFlow")
    flow.add_argument("--steps", type=int, default=30, help="Euler steps (default 30)")
    flow.add_argument("--vae", help="local folder of the SDXL VAE (diffusers AutoencoderKL); needed unless "
                                    "the model's latents are pixels (latent_codec space_to_depth)")
    pro = parser.add_argument_group("Janus-Pro")
    pro.add_argument("--temperature", type=finite_float, default=1.0,
                     help="softmax temperature (default 1; 0 = argmax)")
    pro.add_argument("--top-k", type=int, default=None, help="draw among the k most likely codes (default: all)")
    pro.add_argument("--top-p", type=finite_float, default=None, help="nucleus mass after the temperature (default: 1)")
    pro.add_argument("--codec", help="the image codec's weights: VQ-16 (.safetensors, or a released Janus-Pro "
                                     "checkpoint) or a k-means codec folder (default: vq16.safetensors next to the "
                                     "checkpoint, else the released checkpoint itself)")
    pro.add_argument("--prompt-template", default=None,
                     help="text around {prompt} before <begin_of_image>, \\n for a newline (default: our data "
                          "tools' 'User: {prompt}\\n\\nAssistant:'; the released models were trained on "
                          "'<|User|>: {prompt}\\n\\n<|Assistant|>:')")
    return parser


def _codec_path(args) -> str:
    if args.codec:
        return args.codec
    from ..convert.januspro import VQ_FILE

    checkpoint = Path(args.checkpoint)
    folder = checkpoint if checkpoint.is_dir() else checkpoint.parent
    return str(folder / VQ_FILE) if (folder / VQ_FILE).exists() else str(checkpoint)


def _sample_januspro(args, model, cfg, tokenizer) -> int:
    """Codes -> PNG images for a Janus-Pro model (see the module docstring)."""
    import torch

    from datacontract.tokenizer import resolve_token_spec
    from image_codecs import load_image_codec
    from safetensors import SafetensorError

    from .januspro import codes_to_uint8, generation_prompt, sample_codes, save_uint8_png
    from .loading import error_line
    from .text_to_image import GENERATION_TEMPLATE

    try:
        spec = resolve_token_spec(tokenizer)
        codec = load_image_codec(cfg.image_tokens.codec, _codec_path(args), next(model.parameters()).device)
    except SafetensorError as err:  # a damaged codec file
        print(f"error: {_codec_path(args)}: unreadable (truncated or damaged: {err}): re-export or re-download it",
              file=sys.stderr)
        return 1
    except (ValueError, OSError) as err:
        print(f"error: {error_line(err)}", file=sys.stderr)
        return 1
    tokens = cfg.image_tokens
    if (codec.codebook_size, codec.downsample) != (tokens.codebook_size, tokens.downsample):
        print(f"error: the codec has {codec.codebook_size} codes of {codec.downsample} px but the model "
              f"{tokens.codebook_size} of {tokens.downsample} px (model.image_tokens): pass the matching --codec",
              file=sys.stderr)
        return 1
    side = tokens.grid_side(cfg.und_encoder.image_size)
    template = GENERATION_TEMPLATE if args.prompt_template is None else args.prompt_template.replace("\\n", "\n")
    if "{prompt}" not in template:
        print("error: --prompt-template must contain {prompt}", file=sys.stderr)
        return 1
    prompts = [generation_prompt(tokenizer, p, spec.bos_id, spec.begin_of_image_id, template) for p in args.prompt]
    generators = [torch.Generator().manual_seed(args.seed * 1_000_003 + i) for i in range(len(prompts))]
    out, all_codes = Path(args.out), []
    finite_codec = _FiniteDecode(codec)
    for start in range(0, len(prompts), args.batch_size):
        batch = slice(start, start + args.batch_size)
        codes = sample_codes(model, prompts[batch], side * side, 5.0 if args.cfg is None else args.cfg,
                             args.temperature, args.top_k, args.top_p, spec.pad_id, generators[batch],
                             use_cache=not args.no_cache)
        all_codes.append(codes)
        names = [out / f"{i:03d}.png" for i in range(start, start + len(codes))]
        images = codes_to_uint8(finite_codec, codes, (side, side))
        for path, prompt in zip(save_uint8_png(images, names), args.prompt[batch]):
            print(f"{path}\t{prompt}")
    if args.save_latents:
        from safetensors.torch import save_file

        save_file({"codes": torch.cat(all_codes).contiguous()}, str(out / LATENTS_FILE))
    return 0


class _FiniteDecode:
    """The image codec, refusing decoded pixels that hold NaN or inf (damaged codec weights):
    ``codes_to_uint8`` would turn them into black pixels without a word."""

    def __init__(self, codec) -> None:
        self.codec = codec

    def decode(self, codes, grid):
        from .decode import require_finite

        pixels = self.codec.decode(codes, grid)
        require_finite(pixels, "the images decoded by the image codec", "its weights (--codec) may be damaged")
        return pixels


def _check_options(parser, args) -> None:
    """Option values no run can use: ``parser.error`` (exit 2) before anything is loaded."""
    from .loading import check_model_options, check_seed

    if args.steps < 1 or args.batch_size < 1:
        parser.error("--steps and --batch-size must be at least 1")
    if args.top_k is not None and args.top_k < 1 or args.top_p is not None and not 0 < args.top_p <= 1:
        parser.error("--top-k must be at least 1 and --top-p in (0, 1]")
    if args.temperature < 0:
        parser.error("--temperature must be >= 0")
    check_seed(parser, args.seed)
    check_model_options(parser, args)


def _sample_janusflow(args, model, cfg, tokenizer, decoder) -> None:
    """Latents -> PNG images for a JanusFlow model (see the module docstring)."""
    import torch

    from .decode import require_finite, save_png
    from .text_to_image import generation_prompt_ids, initial_noise, sample_latents

    prompts = [generation_prompt_ids(tokenizer, p, tokenizer.bos_token_id) for p in args.prompt]
    noise = initial_noise(model, len(prompts), torch.Generator().manual_seed(args.seed))
    out = Path(args.out)
    latents = []
    for start in range(0, len(prompts), args.batch_size):
        batch = slice(start, start + args.batch_size)
        z = sample_latents(model, prompts[batch], args.steps, 2.0 if args.cfg is None else args.cfg, z0=noise[batch],
                           use_cache=not args.no_cache)
        # An overflow (bf16, a huge --cfg) gives NaN latents, which decode to black images.
        which = f"prompt {start}" if len(z) == 1 else f"prompts {start} to {start + len(z) - 1}"
        require_finite(z, f"the sampled latents of {which}",
                       "an overflow; try --dtype fp32 or a smaller --cfg")
        latents.append(z.cpu())
        names = [out / f"{i:03d}.png" for i in range(start, start + len(z))]
        for path, prompt in zip(save_png(decoder(z), names), args.prompt[batch]):
            print(f"{path}\t{prompt}")
    if args.save_latents:
        from safetensors.torch import save_file

        save_file({"latents": torch.cat(latents).contiguous()}, str(out / LATENTS_FILE))


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_options(parser, args)
    from .decode import NonFiniteError, build_decoder, check_output_folder
    from .loading import describe, error_line, load_model_from_args

    out = Path(args.out)
    outputs = [out / f"{i:03d}.png" for i in range(len(args.prompt))]
    outputs += [out / LATENTS_FILE] if args.save_latents else []
    try:
        check_output_folder(out, outputs)  # before minutes of loading and sampling
        model, cfg, tokenizer = load_model_from_args(args)
        if cfg.family != "januspro":
            decoder = build_decoder(cfg, args.vae, next(model.parameters()).device)
    except (ValueError, OSError) as err:
        print(f"error: {error_line(err)}", file=sys.stderr)
        return 1
    if cfg.family != "januspro" and tokenizer.bos_token_id is None:
        print(f"error: tokenizer {tokenizer.name_or_path} defines no BOS token", file=sys.stderr)
        return 1
    print(describe(cfg))
    try:
        if cfg.family == "januspro":
            return _sample_januspro(args, model, cfg, tokenizer)
        _sample_janusflow(args, model, cfg, tokenizer, decoder)
    except NonFiniteError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except OSError as err:  # an image or the latents could not be written (a full disk, permissions)
        print(f"error: {error_line(err)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
