"""Universal checkpoints: change tensor/pipeline/data parallelism (and ZeRO stage) between runs.

DeepSpeed's ``ds_to_universal`` merges a checkpoint's ZeRO fragments and tensor-parallel slices into
one file per parameter (weights, Adam moments, step), which any layout can load. Parameters are
recorded under their full-state names (``llm.decoder.layers.{global block}...``,
``pretrain.train.engine.use_full_model_names``), so the pipeline stage that holds a block in the new
layout finds it whatever stage held it before. To merge the slices DeepSpeed must know how each
megatron tensor is split; every checkpoint carries that as ``universal_checkpoint_info``
(``pretrain.convert.llama.deepspeed_sharding_patterns``). Convert with

  python -m pretrain.train.universal --run runs/stage2 [--tag step_00010000]

which writes ``checkpoints/<tag>_universal`` (with our per-run state, the EMA under full-state names,
and the source's own files, which export and ``train.init_from`` read) and points ``latest`` at it;
the next launch, in any layout, resumes from it. After a layout change the data stream restarts in
the new layout at the same step: the mix schedule is replayed exactly, the order of sequences within
the epoch follows the new number of data-parallel ranks.

The source is verified against its ``MANIFEST.json`` first, DeepSpeed's converter unpickles
weights-only (``safe_load``: a crafted file is refused, not run) and the result gets a manifest of
its own.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from safetensors.torch import save_file

from .checkpoint import _ANY_TAG, EMA_FULL_FILE, _atomic_write, _describe, latest_tag, quick_problems
from .offline_weights import checkpoint_ema
from .safe_load import (
    CheckpointError, hash_problems, hash_share, listed_files, read_manifest, weights_only_loading, write_manifest,
)

UNIVERSAL_SUFFIX = "_universal"


def convert(run: Path, tag: str | None = None) -> str:
    """Write ``checkpoints/<tag>_universal`` and point ``latest`` at it; returns the new tag."""
    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    ckpt = run / "checkpoints"
    if tag is not None and not _ANY_TAG.match(tag):
        # A path ("/x", "../x", "step_.../") would read another folder and write, delete and point
        # ``latest`` next to it (or inside the source checkpoint): only a folder name of this run.
        raise ValueError(f"--tag {tag!r}: not a checkpoint name; give a folder name of {ckpt} "
                         "(step_XXXXXXXX), or no --tag for the latest")
    tag = tag or latest_tag(ckpt)
    if tag is None:
        raise FileNotFoundError(f"{ckpt}: no complete checkpoint to convert")
    universal = tag.endswith(UNIVERSAL_SUFFIX)
    redo = f"convert its source again (--tag {tag.removesuffix(UNIVERSAL_SUFFIX)})" if universal else None
    source, target = ckpt / tag, ckpt / (tag + UNIVERSAL_SUFFIX)
    if not (source / "COMPLETE").exists():
        raise CheckpointError(f"{source}: not a complete checkpoint (no COMPLETE file); "
                              f"{redo or 'convert another --tag'}")
    manifest = read_manifest(source)
    problems = quick_problems(source) if manifest is None else hash_problems(source, manifest)
    if problems:
        raise CheckpointError(f"{_describe(problems)}; {redo or 'convert an earlier checkpoint with --tag'}")
    if universal:
        # Already converted (and verified): the next run resumes from it, as main() then says.
        _atomic_write(ckpt / "latest", tag)
        return tag
    cfg = None
    if any(source.glob("ema_mp*.safetensors")):  # read before anything is written or removed
        from ..recipe import load_recipe

        recipe = run / "recipe.yaml"
        if not recipe.is_file():
            raise FileNotFoundError(f"{recipe}: missing; the EMA's conversion needs the run's model: restore it")
        cfg = load_recipe(recipe).model
    if target.is_symlink() or (target.exists() and not target.is_dir()):
        raise CheckpointError(f"{target}: in the way of the conversion (not a checkpoint folder); move it away")
    if target.exists():
        # An earlier conversion's output, complete or interrupted: redone. Its COMPLETE goes first,
        # so that a removal interrupted in turn never leaves a folder a resume would trust.
        (target / "COMPLETE").unlink(missing_ok=True)
        shutil.rmtree(target)
    args = argparse.Namespace(
        input_folder=str(source), output_folder=str(target), num_extract_workers=1, num_merge_workers=1,
        keep_temp_folder=False, strict=True, inject_missing_state=False,
    )
    try:
        with weights_only_loading():  # in this process: one worker each (no process pool)
            ds_to_universal(args)
    except CheckpointError:
        raise
    except Exception as err:  # DeepSpeed asserts or fails on what the checks above cannot see
        if isinstance(err, OSError) and not isinstance(err, FileNotFoundError):
            raise  # the output's disk or permissions, not the source: main() names the path
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise CheckpointError(f"{source}: DeepSpeed cannot convert it ({type(err).__name__}: {reason}); "
                              "convert an earlier checkpoint with --tag") from None
    # The source's own weight files stay readable by export and train.init_from (in their layout).
    extras = ("ema_mp*.safetensors", "trainer_rank*.json", "layer_*-model_*-model_states.pt")
    for extra in [f for pattern in extras for f in source.glob(pattern)]:
        shutil.copy2(extra, target / extra.name)
    if cfg is not None:
        save_file({k: v.contiguous() for k, v in checkpoint_ema(ckpt, tag, cfg).items()}, target / EMA_FULL_FILE)
    files = hash_share(target, listed_files(target), 0, 1)
    write_manifest(target, files, {"tag": target.name, "finite": (manifest or {}).get("finite", True),
                                   "converted_from": tag})
    (target / "COMPLETE").write_text("ok\n")
    _atomic_write(ckpt / "latest", target.name)
    return target.name


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="pretrain.train.universal", description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, type=Path, help="the run's train.output_dir")
    parser.add_argument("--tag", default=None, help="checkpoint to convert (default: latest)")
    args = parser.parse_args(argv)
    try:
        tag = convert(args.run, args.tag)
    except (FileNotFoundError, ValueError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # a folder where a file belongs, permissions: the path, not a traceback
        print(f"error: {err.filename}: {err.strerror}; fix or move it and convert again", file=sys.stderr)
        return 2
    print(f"universal checkpoint {args.run / 'checkpoints' / tag}; the next run resumes from it in any layout")
    return 0


if __name__ == "__main__":
    sys.exit(main())
