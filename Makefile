# Genesis Pipeline. `make demo` runs the whole pipeline on sample data; `make test` runs the tests.
# Both install what they need into .venv first.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
DEMO := demo_output
STAMP := $(VENV)/.installed

.PHONY: install demo test clean-demo

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip setuptools wheel
	$(BIN)/pip install -q -e '.[test]'
	@touch $(STAMP)

demo: install
	$(BIN)/python -m pipeline.demo --out $(DEMO)

test: install
	$(BIN)/python -m pytest -q

clean-demo:
	rm -rf $(DEMO)
