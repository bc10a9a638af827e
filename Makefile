# The two commands of the README. Both create the environment first if it is missing (scripts/setup_env.sh).
PY := .venv/bin/python
# Holoscan asks for a 32 MB stack
STACK := ulimit -s 32768 2>/dev/null || true

.PHONY: env system run test lint bench

env:
	@bash scripts/setup_env.sh

## Debian packages of the servers the tests start (PostgreSQL); idempotent
system:
	@bash scripts/setup_system.sh

## Run the MONAI Deploy app on the embedded default input (real example series if ../shared/data exists, else a phantom)
run: env
	@$(STACK); $(PY) app.py -o output

## Run the test suite
test: system env
	@$(STACK); $(PY) -m pytest -q

lint: env
	@$(PY) -m ruff check spinepath operators tests app.py scripts label

bench: env
	@$(STACK); $(PY) scripts/benchmark.py
