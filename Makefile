# Genesis Pipeline. `make demo` runs the whole pipeline on sample data; `make test` runs the tests.
# Both install what they need into .venv first.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
DEMO := demo_output
STAMP := $(VENV)/.installed

.PHONY: install demo test clean-demo cluster-up cluster-down

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip setuptools wheel
	$(BIN)/pip install -q -e '.[test]'
	@touch $(STAMP)

demo: install
	$(BIN)/python -m pipeline.demo --out $(DEMO)

test: install
	$(BIN)/python -m pytest -q --durations=20

clean-demo:
	rm -rf $(DEMO)

# A Ray head and a second Ray node (token auth) and an authenticated MLflow server, all on 127.0.0.1, with pids and
# connection details in $(GENESIS_CLUSTER)/cluster.json; then `eval "$$(.venv/bin/python -m pipeline.services env)"` and
# `ray job submit --runtime-env runtime_env.yaml -- ...` (README "On a cluster"). cluster-down stops exactly those.
GENESIS_CLUSTER ?= cluster

cluster-up: install
	$(BIN)/python -m pipeline.services cluster-up --dir $(GENESIS_CLUSTER)

cluster-down:
	$(BIN)/python -m pipeline.services cluster-down --dir $(GENESIS_CLUSTER)
