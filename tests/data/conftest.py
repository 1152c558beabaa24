from tests.data_fixtures import built, corpus, tokenizer, tokenizer_dir  # noqa: F401
