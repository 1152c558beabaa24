# The two quickstart commands (README): `make demo` runs the built-in demo on the CPU (synthetic
# shapes data -> shards -> DeepSpeed training on 2 processes -> samples -> held-out evaluation);
# `make test` runs the whole test suite. Both create .venv on first use.
PY := .venv/bin/python

.PHONY: env demo test
env:
	@bash scripts/bootstrap.sh

demo: env
	$(PY) -m pretrain.demo

test: env
	$(PY) -m pytest -q tests
