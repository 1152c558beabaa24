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
