# Two commands do all the set-up on a fresh machine:
#   make run    install, then run the default experiment (configs/tiny-llama.yaml) end to end
#   make test   install, then lint and run the whole test suite
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
CONFIG ?= configs/tiny-llama.yaml

.PHONY: install run test lint format clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml scripts/install_llama_cpp.sh
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	bash scripts/install_llama_cpp.sh $(VENV)
	touch $@

run: install
	$(BIN)/ftd run $(CONFIG)

test: install lint
	$(BIN)/pytest -q

lint: install
	$(BIN)/ruff check .

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf artifacts/store artifacts/prefect artifacts/mlflow.db artifacts/mlflow-artifacts artifacts/tmp artifacts/locks
