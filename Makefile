# The two quickstart commands (README): `make demo` runs the built-in demo on the CPU (synthetic
# shapes data -> shards -> DeepSpeed training on 2 processes -> samples -> held-out evaluation);
# `make test` runs the whole test suite. Both create .venv on first use.
PY := .venv/bin/python

.PHONY: env env-run demo test
# env: everything, the test tools included; env-run: what training, sampling and the demo need.
env:
	@bash scripts/bootstrap.sh test

env-run:
	@bash scripts/bootstrap.sh run

demo: env-run
	$(PY) -m pretrain.demo

# Two pytest workers (pytest-xdist), a test file at a time each (its module fixtures are made once):
# most tests wait on child processes' imports and leave the second core idle.
test: env
	$(PY) -m pytest -q -n 2 --dist loadfile tests
