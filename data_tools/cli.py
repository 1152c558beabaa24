"""``python -m data_tools``: build packed multimodal shards and look at them.

Subcommands: ``build``, ``stats``, ``inspect``, ``verify``, ``make-tokenizer``, ``synth``, ``fit-codec``. Run any of them with
``--help`` for its options.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import List, Optional

from datacontract.format import Task
from datacontract.tokenizer import DEFAULT_BEGIN_OF_IMAGE, DEFAULT_END_OF_IMAGE, DEFAULT_IMAGE_PLACEHOLDER

from .arg_types import share, whole_number
from .documents import LayoutOptions
from .sources import InputSpec, ReaderOptions

_INPUT_FLAGS = (
    ("und_wds", "wds", Task.UNDERSTANDING, "webdataset tars (key.jpg|png|webp + key.txt|json) as captioning"),
    ("gen_wds", "wds", Task.GENERATION, "webdataset tars as text-to-image pairs"),
    ("und_parquet", "parquet", Task.UNDERSTANDING, "parquet with image bytes + caption column, as captioning"),
    ("gen_parquet", "parquet", Task.GENERATION, "parquet with image bytes + caption column, as text-to-image"),
    ("llava", "llava", Task.UNDERSTANDING, "LLaVA/ShareGPT4V conversations (.json list or .jsonl)"),
    ("text_jsonl", "jsonl", Task.TEXT, "text-only jsonl, one document per line"),
    ("gen_class_folder", "classdir", Task.GENERATION,
     "folder tree ROOT/class_name/*.jpg: text-to-image with the class name as prompt (ImageNet style)"),
    ("gen_class_wds", "classwds", Task.GENERATION,
     "webdataset tars (key.jpg + key.cls or a json class field): text-to-image with class-name prompts"),
)


class _ShowDefaults(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's default in --help, also for options without a help text."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.help == argparse.SUPPRESS or action.required or "%(default)" in text or \
                action.default in (None, False, argparse.SUPPRESS) or action.option_strings == ["-h", "--help"]:
            return text
        return f"{text} (default: %(default)s)".strip()


_positive = whole_number(1)
_index = whole_number(0, " (the first sequence is 0)")


def _add_build(sub) -> None:
    p = sub.add_parser(
        "build",
        help="raw image-text data -> packed shards + manifest",
        description="Read raw inputs, apply the per-task image rules, tokenize, pack into sequences of at "
        "most --seq-length tokens and write Arrow IPC shards plus manifest.json and rejects.jsonl under "
        "--out. Resumable: re-run the same command after an interruption.",
        formatter_class=_ShowDefaults,
    )
    g = p.add_argument_group("inputs (each flag repeatable; a glob or a path)")
    for dest, _, _, text in _INPUT_FLAGS:
        g.add_argument("--" + dest.replace("_", "-"), dest=dest, action="append", default=[], metavar="GLOB", help=text)
    g.add_argument("--llava-image-root", help="folder the LLaVA 'image' paths are relative to "
                   "(default: the JSON file's folder)")
    g = p.add_argument_group("field and column names")
    g.add_argument("--wds-caption-ext", default="txt", help="tar member extension holding the caption")
    g.add_argument("--json-caption-field", default="caption", help="caption field of a tar's .json member")
    g.add_argument("--parquet-image-column", default="image", help="binary, or struct with 'bytes'")
    g.add_argument("--parquet-caption-column", default="caption")
    g.add_argument("--parquet-key-column", default=None, help="default: the row number")
    g.add_argument("--text-field", default="text")
    g.add_argument("--llava-image-field", default="image")
    g.add_argument("--llava-conversations-field", default="conversations")
    g.add_argument("--image-marker", default="<image>", help="image marker in LLaVA questions")
    g.add_argument("--class-names", default=None, metavar="JSON",
                   help="class names of --gen-class-folder/--gen-class-wds: {folder or id: name} or a list "
                   "(default: the folder name, underscores as spaces)")
    g.add_argument("--wds-class-ext", default="cls", help="tar member extension holding the class")
    g.add_argument("--json-class-field", default="label", help="class field of a tar's .json member")
    g = p.add_argument_group("model contract")
    g.add_argument("--family", choices=("janusflow", "januspro"), default="janusflow",
                   help="document layouts of this model family (datacontract/format.py); januspro stores "
                   "generation images as codes of --codec")
    g.add_argument("--tokenizer", required=True, help="local directory for transformers.AutoTokenizer")
    g.add_argument("--begin-of-image", default=DEFAULT_BEGIN_OF_IMAGE)
    g.add_argument("--end-of-image", default=DEFAULT_END_OF_IMAGE)
    g.add_argument("--image-placeholder", default=DEFAULT_IMAGE_PLACEHOLDER)
    g.add_argument("--pad-token", default=None, help="default: the tokenizer's pad token")
    g.add_argument("--seq-length", type=_positive, default=4096)
    g.add_argument("--resolution", type=_positive, default=384)
    g.add_argument("--und-patch", type=_positive, default=16, help="understanding tokens = (resolution/und_patch)^2")
    g.add_argument("--gen-downsample", type=_positive, default=8,
                   help="VAE downsampling factor (januspro: the codec's, this option is ignored)")
    g.add_argument("--gen-patch", type=_positive, default=2,
                   help="generation tokens = (resolution/gen_downsample/gen_patch)^2")
    g.add_argument("--system-prompt", default="", help="understanding system prompt (empty: none)")
    g.add_argument("--und-question", default="Generate the caption of this picture.",
                   help="question of captioning samples")
    g = p.add_argument_group("images")
    g.add_argument("--image-format", choices=("jpeg", "png"), default="jpeg")
    g.add_argument("--jpeg-quality", type=_positive, default=95)
    g.add_argument("--max-pixels", type=_positive, default=64_000_000, help="reject larger images (bombs)")
    g.add_argument("--min-image-side", type=_positive, default=1, help="reject images with a smaller side")
    g.add_argument("--max-decoded-mb", type=_positive, default=256,
                   help="reject images whose decoded pixel buffer is larger (MiB; 16-bit and alpha count)")
    g.add_argument("--max-member-mb", type=_positive, default=64,
                   help="reject tar members and LLaVA image files larger than this unread (MiB)")
    g.add_argument("--max-text-chars", type=_positive, default=4_000_000,
                   help="cut a text document here before tokenizing (marked truncated)")
    g.add_argument("--seed", type=int, default=0, help="seeds the generation crops")
    g = p.add_argument_group("latents (optional)")
    g.add_argument("--vae", default=None, help="local diffusers AutoencoderKL directory: store latents")
    g.add_argument("--vae-device", default="auto", help="auto = cuda when available")
    g.add_argument("--vae-compute-dtype", choices=("float32", "bfloat16"), default="float32")
    g.add_argument("--latent-dtype", choices=("float16", "bfloat16"), default="float16")
    g.add_argument("--vae-batch-size", type=_positive, default=16)
    g = p.add_argument_group("image codes (--family januspro)")
    g.add_argument("--codec", choices=("vq16", "kmeans_patches"), default=None,
                   help="image tokenizer whose codes the shards store (kmeans_patches: `fit-codec`)")
    g.add_argument("--codec-path", default=None, help="local weights of --codec (file or folder)")
    g.add_argument("--codec-device", default="auto", help="auto = cuda when available")
    g.add_argument("--codec-batch-size", type=_positive, default=64, help="images per codec call")
    g = p.add_argument_group("packing and output")
    g.add_argument("--out", required=True, help="output root")
    g.add_argument("--shard-rows", type=_positive, default=256, help="packed sequences per shard")
    g.add_argument("--chunk-records", type=_positive, default=10000, help="records per unit of work")
    g.add_argument("--pack-window", type=_positive, default=5000, help="documents considered at once by the packer")
    g.add_argument("--no-text-fillers", dest="text_fillers", action="store_false",
                   help="do not fill the gaps of image sequences with text pieces")
    g.add_argument("--min-filler", type=_positive, default=16, help="smallest gap filled with text")
    g.add_argument("--text-reserve", type=share, default=0.2,
                   help="share of the text tokens that fillers leave for text-only sequences (0: fillers may "
                        "take them all, and a text-poor mix then has no text sequence)")
    g = p.add_argument_group("run")
    g.add_argument("--workers", type=_positive, default=os.cpu_count() or 1,
                   help="worker processes (default: every core, here %(default)s)")
    g.add_argument("--quiet", action="store_true", help="no progress bars or messages")
    g.add_argument("--log-every", type=float, default=30.0,
                   help="seconds between progress lines when stderr is not a terminal (logs)")
    g.add_argument("--keep-work", action="store_true", help="keep the intermediate .work folder")
    g.add_argument("--overwrite", action="store_true", help="discard a previous build in --out")
    g.add_argument("--debug-kill-after", type=int, default=None, help=argparse.SUPPRESS)
    g.add_argument("--debug-kill-worker", default=None, help=argparse.SUPPRESS)
    for action in p._actions:
        if action.help is None:
            action.help = "(default: %(default)s)"  # argparse prints nothing for a None help


def _build_config(args, argv: List[str]):
    from .build_config import BuildConfig

    from .remote import is_remote

    def absolute(path):  # the manifest must work from any folder
        return path if path is None or is_remote(path) else os.path.abspath(path)

    inputs = []
    for dest, fmt, task, _ in _INPUT_FLAGS:
        for pattern in getattr(args, dest):
            inputs.append(InputSpec(fmt, task, absolute(pattern),
                                    absolute(args.llava_image_root) if fmt == "llava" else None))
    if not inputs:
        raise SystemExit("no inputs: give at least one of " + ", ".join("--" + d.replace("_", "-") for d, *_ in _INPUT_FLAGS))
    # Janus-Pro: one code per codec downsample x downsample pixels; the build sets it from the codec.
    gen_downsample, gen_patch = (1, 1) if args.family == "januspro" else (args.gen_downsample, args.gen_patch)
    layout = LayoutOptions(
        seq_length=args.seq_length, resolution=args.resolution, und_patch=args.und_patch,
        gen_downsample=gen_downsample, gen_patch=gen_patch, system_prompt=args.system_prompt,
        und_question=args.und_question, image_marker=args.image_marker, image_format=args.image_format,
        jpeg_quality=args.jpeg_quality, seed=args.seed, max_pixels=args.max_pixels,
        min_image_side=args.min_image_side, max_decoded_bytes=args.max_decoded_mb << 20,
        max_text_chars=args.max_text_chars, family=args.family,
    )
    reader = ReaderOptions(
        wds_caption_ext=args.wds_caption_ext, json_caption_field=args.json_caption_field,
        parquet_image_column=args.parquet_image_column, parquet_caption_column=args.parquet_caption_column,
        parquet_key_column=args.parquet_key_column, text_field=args.text_field,
        llava_image_field=args.llava_image_field, llava_conversations_field=args.llava_conversations_field,
        image_marker=args.image_marker, max_member_bytes=args.max_member_mb << 20,
        wds_class_ext=args.wds_class_ext, json_class_field=args.json_class_field,
        class_names=_class_names(args.class_names),
    )
    return BuildConfig(
        out=args.out, inputs=inputs, tokenizer=absolute(args.tokenizer), layout=layout, reader=reader,
        begin_of_image=args.begin_of_image, end_of_image=args.end_of_image,
        image_placeholder=args.image_placeholder, pad_token=args.pad_token,
        chunk_records=args.chunk_records, shard_rows=args.shard_rows, pack_window=args.pack_window,
        text_fillers=args.text_fillers, min_filler=args.min_filler, text_reserve=args.text_reserve, vae=args.vae,
        vae_device=args.vae_device, vae_compute_dtype=args.vae_compute_dtype,
        latent_dtype=args.latent_dtype, vae_batch_size=args.vae_batch_size, family=args.family,
        codec=args.codec, codec_path=absolute(args.codec_path), codec_device=args.codec_device,
        codec_batch_size=args.codec_batch_size, workers=args.workers,
        quiet=args.quiet, keep_work=args.keep_work, overwrite=args.overwrite,
        command=["python", "-m", "data_tools", *argv], debug_kill_after=args.debug_kill_after,
        debug_kill_worker=args.debug_kill_worker, log_every=args.log_every,
    )


def _class_names(path: Optional[str]) -> Optional[dict]:
    if path is None:
        return None
    from .class_sources import load_class_names

    try:
        return load_class_names(path)
    except (OSError, ValueError) as e:
        raise ValueError(f"--class-names {path}: {getattr(e, 'strerror', None) or e}") from None


def _add_views(sub) -> None:
    root_help = "output root of a finished build (its --out: the folder holding manifest.json)"
    refusal = "Exit status 2, with one `error:` line, when ROOT is no finished build or cannot be read."
    p = sub.add_parser("stats", help="counts, fill and length histogram of a build", formatter_class=_ShowDefaults,
                       description="Counts, fill and length histograms per task, from the manifest and the shards. "
                       "A build with a missing, damaged or swapped shard is refused (exit status 2), naming the "
                       "file: `verify` lists every problem. " + refusal)
    p.add_argument("root", help=root_help)
    p.add_argument("--bins", type=_positive, default=16, help="histogram buckets")
    p.add_argument("--json", action="store_true", help="print JSON")
    p = sub.add_parser("inspect", help="decode one packed sequence to text and PNG files", formatter_class=_ShowDefaults,
                       description="Write sequence.txt (the documents as text, targets shown) and each image of one "
                       "packed sequence under --out, replacing the files an earlier inspect left there. " + refusal)
    p.add_argument("root", help=root_help)
    p.add_argument("--task", choices=("und", "gen", "text"), default="und",
                   help="which shards: sequences whose first document is understanding, generation or text")
    p.add_argument("--index", type=_index, default=0, help="sequence index within the task, from 0 (default: %(default)s)")
    p.add_argument("--tokenizer", help="tokenizer directory (default: the one in the manifest)")
    p.add_argument("--out", required=True, help="folder for sequence.txt and the PNG files (made if missing)")
    p = sub.add_parser("verify", help="check checksums and the invariants of every sequence", formatter_class=_ShowDefaults,
                       description="Check the manifest, every shard's checksum, rows and layout, and the invariants "
                       "of every sequence; print every problem found. Exit status 0: OK; 1: problems (listed); "
                       "2: nothing could be checked (ROOT is no build, or its manifest.json is not a JSON object).")
    p.add_argument("root", help=root_help)
    p.add_argument("--no-decode", action="store_true", help="skip decoding every image")
    from .tokenizer import MAX_VOCAB_SIZE, MIN_VOCAB_SIZE, vocab_size_arg

    p = sub.add_parser("make-tokenizer", help="build a small byte-level BPE tokenizer (tests, demos)",
                       formatter_class=_ShowDefaults,
                       description="Train a byte-level BPE tokenizer (any UTF-8 text encodes and decodes back "
                       "exactly) on built-in texts and the lines of --texts, and write tokenizer.json and "
                       "tokenizer_config.json to --out; the same inputs give the same files. Prints --out, and on "
                       "stderr what was made. Exit status 2, with one `error:` line, when an input cannot be used; "
                       "nothing is written then.")
    p.add_argument("--out", required=True,
                   help="folder for the tokenizer (made if missing; a tokenizer already there is replaced, whole)")
    p.add_argument("--texts", nargs="*", metavar="FILE",
                   help="UTF-8 text files, one text a line, to train on as well as the built-in texts (default: "
                   "the built-in texts only)")
    p.add_argument("--vocab-size", type=vocab_size_arg, default=512,
                   help=f"tokens at most ({MIN_VOCAB_SIZE} to {MAX_VOCAB_SIZE}): the 256 bytes, the special "
                   "tokens and as many merges as the texts give")


def _look(args) -> int:
    from . import views
    from .verify import verify

    if args.command == "stats":
        report = views.stats(args.root, args.bins)
        print(json.dumps(report, indent=1) if args.json else views.format_stats(report))
        return 0
    if args.command == "inspect":
        paths = views.inspect(args.root, args.task, args.index, args.out, args.tokenizer)
        print("\n".join(paths))
        return 0
    problems = verify(args.root, decode=not args.no_decode)
    for p in problems:
        print(p)
    print("OK" if not problems else f"{len(problems)} problem(s)")
    return 0 if not problems else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m data_tools", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_build(sub)
    _add_views(sub)
    from .synth_shapes import add_parser as _add_synth

    _add_synth(sub)
    from .fit_codec import add_parser as _add_fit_codec

    _add_fit_codec(sub, _ShowDefaults)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.command == "build":
        from .build import build
        from .errors import BuildError
        from .workers import UnitFailed

        from .build import useless_build_problems

        try:
            config = _build_config(args, argv)
        except ValueError as e:  # inconsistent layout options (LayoutOptions names the flags)
            print(f"error: {e}", file=sys.stderr)
            return 2
        try:
            manifest = build(config)
        except (BuildError, UnitFailed) as e:
            print(f"error: {e.message}", file=sys.stderr)
            return 2
        except OSError as e:  # read-only or full disk, permissions: name the file
            where = f"{e.filename}: " if e.filename else ""
            print(f"error: {where}{e.strerror or e} (check the free space and permissions of --out)", file=sys.stderr)
            return 2
        problems = useless_build_problems(manifest)
        for p in problems:
            print(f"error: {p}", file=sys.stderr)
        return 3 if problems else 0
    if args.command in ("stats", "inspect", "verify"):
        from datacontract.shards import ShardError

        from .views import LookError

        try:
            return _look(args)
        except (LookError, ShardError) as e:  # the message names the file or option and what to do
            print(f"error: {e}", file=sys.stderr)
            return 2
    if args.command == "make-tokenizer":
        from .tokenizer import TokenizerBuildError, make_tokenizer

        try:
            out = make_tokenizer(args.out, args.texts or [], args.vocab_size,
                                 log=lambda line: print(line, file=sys.stderr))
            print(out)
        except TokenizerBuildError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        return 0
    if args.command == "fit-codec":
        from .fit_codec import run as fit_codec

        return fit_codec(args)
    if args.command == "synth":
        from .synth_shapes import run

        return run(args)
    return 2
