# The two quickstart commands (README): `make demo` runs the main job on the CPU with the tiny
# built-in recipe; `make test` runs the whole test suite. Both create .venv on first use.
PY := .venv/bin/python

.PHONY: env demo test
env:
	@bash scripts/bootstrap.sh

demo: env
	$(PY) -m pretrain.main --recipe recipes/tiny_cpu.yaml

test: env
	$(PY) -m pytest -q tests
