# The two Quickstart commands: `make run` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test demo bench lint clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/voipbin-gateway serve --config config/gateway.yaml

test: $(STAMP)
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

# The offline demo: a stand-in VoIPBIN API and the gateway in front of it (README "Your first requests").
demo: $(STAMP)
	$(BIN)/voipbin-gateway demo $(DEMO_ARGS)

bench: $(STAMP)
	$(BIN)/python -m benchmarks $(BENCH_ARGS)

lint: $(STAMP)
	$(BIN)/python -m ruff check gateway tests benchmarks

clean:
	rm -rf $(VENV) build *.egg-info
