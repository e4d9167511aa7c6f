# streamrec: `make demo` and `make test` work on a fresh clone; nothing else needs installing by hand.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install demo test test-all test-slow lint typecheck bench quality lock clean

install: $(STAMP)

$(STAMP): requirements.lock pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements.lock
	$(BIN)/python -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

demo: install
	$(BIN)/streamrec demo

# Lint, import contracts, types, then unit tests, contracts and the integration suite against a real embedded
# broker; slow suites excluded.
test: install lint typecheck
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -m "not slow" -q

test-slow: install
	$(BIN)/python -m pytest -m slow -q

lint: install
	$(BIN)/ruff check streamrec streams models tests benchmarks
	$(BIN)/ruff format --check streamrec streams models tests benchmarks

typecheck: install
	$(BIN)/mypy streamrec streams models

bench: install
	$(BIN)/streamrec bench --json

quality: install
	$(BIN)/python benchmarks/quality.py

lock:
	$(BIN)/python -m pip freeze --exclude-editable | sed '1i # Versions resolved together on Python 3.11; regenerate with `make lock`.' > requirements.lock

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache
