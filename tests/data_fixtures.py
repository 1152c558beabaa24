"""Raw data, tokenizer and a finished build for the data tests.

Imported by tests/data/conftest.py and tests/data_tools/conftest.py: each folder gets its own
session-wide instances (some data_tools tests add bad records to their corpus).
"""

import pytest


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    from data_tools.synthetic import tiny_tokenizer

    return tiny_tokenizer(str(tmp_path_factory.mktemp("tokenizer")))


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    from datacontract.tokenizer import load_tokenizer

    return load_tokenizer(tokenizer_dir)


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    from data_tools.synthetic import make_corpus

    return make_corpus(str(tmp_path_factory.mktemp("raw")))


@pytest.fixture(scope="session")
def built(corpus, tokenizer_dir, tmp_path_factory):
    """A finished build of the clean corpus: (output root, manifest)."""
    from data_tools.cli import main
    from data_tools.synthetic import tiny_build_args
    from datacontract.shards import read_manifest

    out = str(tmp_path_factory.mktemp("built") / "out")
    assert main(tiny_build_args(corpus, tokenizer_dir, out)) == 0
    return out, read_manifest(out)


def build_tiny_recipe_shards(root, n_und: int, n_gen: int, n_llava: int, n_text: int):
    """Shards that fit ``recipes/tiny_cpu.yaml`` (32 px SigLIP patches of 8, 8x8 pixel-space latents
    patchified by 2), built by the real ``python -m data_tools build`` in a child process. -> folder."""
    import subprocess
    import sys

    from data_tools.synthetic import make_corpus, tiny_build_args, tiny_tokenizer
    from tests.launch_helpers import REPO, child_env

    paths = make_corpus(str(root / "raw"), n_und=n_und, n_gen=n_gen, n_llava=n_llava, n_text=n_text)
    tokenizer = tiny_tokenizer(str(root / "tok"))
    data = root / "shards"
    args = tiny_build_args(paths, tokenizer, str(data), "--und-patch", "8", "--gen-downsample", "4", "--gen-patch", "2")
    build = subprocess.run([sys.executable, "-m", "data_tools", *args], cwd=REPO, env=child_env(),
                           capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-3000:]
    return data


def foreign_tokenizer(own: str, out: str) -> str:
    """A tokenizer a build must not take for the one in ``own``: the same files with the ids of its
    ordinary tokens reversed, so it has as many tokens and the same special-token ids but gives every
    text other ids (what a tokenizer of the same size trained on other texts is to a build). -> out."""
    import json
    import os
    import shutil

    shutil.copytree(own, out)
    path = os.path.join(out, "tokenizer.json")
    with open(path, encoding="utf-8") as f:
        spec = json.load(f)
    vocab = spec["model"]["vocab"]
    first = len(spec["added_tokens"])  # the special tokens come first and keep their ids
    last = max(vocab.values())
    spec["model"]["vocab"] = {token: i if i < first else first + last - i for token, i in vocab.items()}
    with open(path, "w", encoding="utf-8") as f:
        json.dump(spec, f, ensure_ascii=False)
    return out
