# The two commands of the README. Both create the environment first if it is missing (scripts/setup_env.sh).
PY := .venv/bin/python
# Holoscan asks for a 32 MB stack
STACK := ulimit -s 32768 2>/dev/null || true

.PHONY: env label-env system run test lint bench label

## .venv, then the TorchScript exports of the bundle's networks (bundle/models/*.ts; redone only when a .pt changes)
env:
	@bash scripts/setup_env.sh
	@$(PY) -m spinepath export --quiet > /dev/null

## MONAI Label server environment (.venv-label: monailabel 0.8.5 needs pydicom<3, numpy<2); idempotent
label-env:
	@bash scripts/setup_env.sh label

## Debian packages of the servers the tests start (PostgreSQL); idempotent
system:
	@bash scripts/setup_system.sh

## Run the MONAI Deploy app on the embedded default input (real example series if ../shared/data exists, else a phantom)
run: env
	@$(STACK); $(PY) app.py -o output

## Run the test suite
test: system env label-env
	@$(STACK); $(PY) -m pytest -q

lint: env
	@$(PY) -m ruff check spinepath operators tests app.py scripts label

## Start the MONAI Label app on a studies folder or DICOMweb URL: make label STUDIES=http://127.0.0.1:8042/dicom-web
label: label-env
	@test -n "$(STUDIES)" || { echo "usage: make label STUDIES=<studies folder or DICOMweb URL>" >&2; exit 2; }
	@.venv-label/bin/python -m monailabel.main start_server --app label --studies $(STUDIES) --host 127.0.0.1 --port 8000

bench: env
	@$(STACK); $(PY) scripts/benchmark.py
