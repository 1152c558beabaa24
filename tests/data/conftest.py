import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from data_tools.synthetic import make_corpus, tiny_build_args, tiny_tokenizer  # noqa: E402


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    return tiny_tokenizer(str(tmp_path_factory.mktemp("tokenizer")))


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    from data_tools.tokenizer import load_tokenizer

    return load_tokenizer(tokenizer_dir)


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    return make_corpus(str(tmp_path_factory.mktemp("raw")))


@pytest.fixture(scope="session")
def built(corpus, tokenizer_dir, tmp_path_factory):
    """A finished build of the clean corpus: (output root, manifest)."""
    from data_tools.cli import main
    from pretrain.data.shards import read_manifest

    out = str(tmp_path_factory.mktemp("built") / "out")
    assert main(tiny_build_args(corpus, tokenizer_dir, out)) == 0
    return out, read_manifest(out)
